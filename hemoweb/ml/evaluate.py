"""Whole-tree evaluation: every cell scored at its own label's level, plus the classic 8 classes.

A cell labelled NEU is right when the predicted path passes NEU (NGS and NGB both count); a cell
whose prediction stopped above its label's level (unresolved) is wrong. The 8-class view collapses
labels and predictions onto BAS EOS ERY MYI LYM MON NEU PLT; any other prediction counts as wrong,
and cells whose label has no 8-class equivalent are left out of that view.

`forced` scores the same cells on their best guesses (every cell pushed down its most probable path,
thresholds ignored): what the model alone achieves, comparable with published results that never
refuse a cell. The top-level figures are what a lab sees, refusals counted as wrong.

`selective_accuracy` is the accuracy on the cells a lab would take without looking (resolved and carrying no
flag at all), with the shares of flagged and unfamiliar cells beside it; `risk_coverage` the error of the best
guesses among the most confident cells (by path confidence), at 20 coverages from 5 % to 100 %.
"""

from collections.abc import Callable, Iterable, Sequence

import torch
from PIL import Image

from .infer import VIEW_ORDER, TreeClassifier, TreePrediction
from .metrics import classification_metrics
from .standardise import ScaleEstimate, as_rgb, colour_summary, measure, scale_summary
from .tree import COARSE8, CellTree
from .weights import ModelSetCard

UNRESOLVED = "(unresolved)"
OTHER = "(other)"


def prediction_at_level(tree: CellTree, label: str, predicted: str) -> str:
    """The code on the predicted path at the depth of `label` (or UNRESOLVED when the path stops above it)."""
    path = tree.path(predicted) if predicted in tree else []
    depth = len(tree.path(label)) - 1
    return path[depth] if depth < len(path) else UNRESOLVED


def _scores(tree: CellTree, labels: Sequence[str], predicted: Sequence[str]) -> tuple[dict, dict]:
    """(fine metrics at each label's level, metrics collapsed to the 8 classic classes)."""
    at_level = [prediction_at_level(tree, label, code) for label, code in zip(labels, predicted, strict=True)]
    codes = sorted(set(labels), key=lambda code: tree.order.index(code) if code in tree.order else 10**6)
    fine = classification_metrics(labels, at_level, codes)
    coarse_pairs = [(tree.coarse8(label), tree.coarse8(code) if code in tree else None)
                    for label, code in zip(labels, predicted, strict=True)]
    coarse_pairs = [(t, p or OTHER) for t, p in coarse_pairs if t is not None]
    coarse_classes = [code for code in COARSE8 if any(t == code for t, _ in coarse_pairs)]
    coarse = classification_metrics([t for t, _ in coarse_pairs], [p for _, p in coarse_pairs], coarse_classes)
    return fine, coarse


def _summary(metrics: dict) -> dict:
    return {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}


RISK_POINTS = 20


def _right(tree: CellTree, label: str, code: str) -> bool:
    return prediction_at_level(tree, label, code) == label


def risk_coverage(tree: CellTree, labels: Sequence[str], predictions: Sequence[TreePrediction],
                  points: int = RISK_POINTS) -> list[dict]:
    """[{coverage, risk}]: the cells ordered by path confidence, most confident first; at each coverage, the share
    of wrong best guesses among the cells kept. A confidence that ranks well gives a low risk at low coverage."""
    n = len(labels)
    if not n:
        return []
    order = sorted(range(n), key=lambda i: -predictions[i].confidence)
    wrong = [not _right(tree, labels[i], predictions[i].guess or predictions[i].code) for i in order]
    curve = []
    for k in range(1, points + 1):
        kept = max(1, round(k / points * n))
        curve.append({"coverage": round(kept / n, 4), "risk": round(sum(wrong[:kept]) / kept, 4)})
    return curve


def score_predictions(tree: CellTree, labels: Sequence[str], predictions: Sequence[TreePrediction]) -> dict:
    """The evaluate_tree JSON for predictions already made."""
    fine, coarse = _scores(tree, labels, [p.code for p in predictions])
    forced_fine, forced_coarse = _scores(tree, labels, [p.guess or p.code for p in predictions])
    n = len(labels)
    taken = [i for i, p in enumerate(predictions) if p.resolved and not p.flagged]
    return {
        "n": n,
        "accuracy": fine["accuracy"],
        "balanced_accuracy": fine["balanced_accuracy"],
        "macro_f1": fine["macro_f1"],
        "coverage": round(sum(p.resolved for p in predictions) / n, 4) if n else 0.0,
        "per_code": fine["per_class"],
        "confusion": fine["confusion"],
        "coarse8": {
            "n": coarse["n"],
            **_summary(coarse),
            "per_code": coarse["per_class"],
            "confusion": coarse["confusion"],
        },
        "forced": {**_summary(forced_fine), "coarse8": _summary(forced_coarse)},
        "selective_accuracy": round(sum(_right(tree, labels[i], predictions[i].code) for i in taken) / len(taken), 4)
        if taken else None,
        "selective_n": len(taken),
        "flagged_share": round(sum(p.flagged for p in predictions) / n, 4) if n else 0.0,
        "unfamiliar_share": round(sum(p.unfamiliar for p in predictions) / n, 4) if n else 0.0,
        "risk_coverage": risk_coverage(tree, labels, predictions),
    }


def classify_items(
    classifier: TreeClassifier,
    loaders: Sequence[Callable[[], Image.Image]],
    *,
    chunk: int = 128,
    progress: Callable[[int], None] | None = None,
    stated_um_per_px: float | None = None,
    scale_sample: int = 200,
) -> tuple[list[TreePrediction], ScaleEstimate | None]:
    """Classify cells whose images are opened lazily, in chunks; (predictions, the scale they were classified at).

    The cells are taken to come from one set-up: a set trained with a scale measures it once over up to
    `scale_sample` of them, spread evenly (a folder sorted by type would otherwise give each type its own).
    """
    predictions: list[TreePrediction] = []
    scale = None
    if classifier.scale_reference is not None and loaders:
        step = max(1, len(loaders) // scale_sample)
        scale = classifier.estimate_scale([], stated_um_per_px,
                                          measured=[measure(as_rgb(load())) for load in loaders[::step]])
    for start in range(0, len(loaders), chunk):
        images = [load() for load in loaders[start:start + chunk]]
        predictions.extend(classifier.classify(images, scale=scale, stated_um_per_px=stated_um_per_px))
        if progress:
            progress(len(predictions))
    return predictions, scale


def evaluate_tree(
    classifier: TreeClassifier,
    items: Iterable[tuple[Callable[[], Image.Image], str]],
    *,
    chunk: int = 128,
    progress: Callable[[int], None] | None = None,
    stated_um_per_px: float | None = None,
    scale_sample: int = 200,
) -> dict:
    """Classify (image loader, tree-code label) pairs in chunks and score them; images are opened lazily
    (see `classify_items`)."""
    items = list(items)
    labels = [label for _, label in items]
    predictions, scale = classify_items(classifier, [load for load, _ in items], chunk=chunk, progress=progress,
                                        stated_um_per_px=stated_um_per_px, scale_sample=scale_sample)
    colour = classifier.input_card.colour
    return {**score_predictions(classifier.tree, labels, predictions), "second_look": classifier.second_look,
            "scale": {**scale_summary([p.scale for p in predictions]), **({"run": scale.as_dict()} if scale else {})},
            "colour": {**colour_summary([p.background for p in predictions], colour.get("reference")),
                       "normalised": bool(colour)}}


SECOND_LOOKS = (0, 2, 4, len(VIEW_ORDER))  # the second looks a training compares (views; 0 = none)


def choose_second_look(classifier: TreeClassifier, images: Sequence[Image.Image | torch.Tensor],
                       labels: Sequence[str], options: Sequence[int] = SECOND_LOOKS) -> tuple[int, dict[int, float]]:
    """The second look (views) with the best whole-tree accuracy on labelled cells, fewer views on a tie.

    Meant for validation cells: accuracy counts a refused cell as wrong, so a second look wins only
    when the cells it resolves come out right more often than not. Returns (views, accuracy per option).
    """
    kept = classifier.second_look
    scores: dict[int, float] = {}
    try:
        classifier.second_look = 0
        first = classifier.classify(images)  # the first pass once; each option only looks again at its unsure cells
        unsure = [index for index, prediction in enumerate(first) if prediction.unsure]
        for views in options:
            predictions = list(first)
            if views > 1 and unsure:
                classifier.second_look = views
                for index, prediction in zip(unsure, classifier.classify([images[i] for i in unsure]), strict=True):
                    predictions[index] = prediction
            scores[views] = score_predictions(classifier.tree, labels, predictions)["accuracy"]
    finally:
        classifier.second_look = kept
    return max(options, key=lambda views: (scores[views], -views)), scores


def record_second_look(set_card: ModelSetCard, views: int, scores: dict[int, float], **where: str) -> None:
    """Put a second-look choice into a set's card: the views, and what each option scored (metrics.second_look_choice)."""
    set_card.second_look = views
    set_card.metrics["second_look_choice"] = {"views": views, "val_accuracy": {str(k): v for k, v in scores.items()},
                                              **where}
