"""Familiarity: does a cell look like the cells a model set was trained on?

A model is only as good as its training cells are like the cells it sees. In a set with a shared backbone
every cell already has its pooled backbone features (one pass, computed for the tree anyway). The score is
the cosine distance to the 10th nearest training cell (Sun et al., "Out-of-distribution detection with deep
nearest neighbors", ICML 2022), in the first 256 principal components of the training cells' features:
larger is less familiar. The threshold is the score that ~2 % of the validation cells exceed, so a cell over
it is as strange as the strangest few cells of the lab the set was trained on.

The statistics live beside the set: `familiarity.safetensors` (the training cells' projected, normalised
features, float16, and the projection) with its card `familiarity.json` (the backbone they belong to, the
threshold, the validation scores' histogram and how the set fared on them), named in set.json
(`familiarity`). They are tied to the backbone's weights: statistics of another backbone are refused, since
their distances would mean nothing.

Why nearest neighbours in principal components: measured on a set trained without basophils and
erythroblasts (benchmarks/familiarity_methods.py, results in benchmarks/results/familiarity_methods-*.md),
the types never seen are told from the set's own test cells with AUROC 0.88 / 0.94 against 0.62 / 0.93 for the
Mahalanobis distance to the nearest class mean with one shared covariance (Lee et al. 2018, the score shipped
before, still read from older sets' files), 0.66 / 0.95 for its relative form (Ren et al. 2021), 0.84 / 0.93 for
neighbours in all 1,280 features, and worse on several layers at once. Basophils look like granulocyte
precursors to a network that never saw one: no score flags most of them (the README says how many).

`site_shift` turns a run's scores, scale and white balance into one verdict for the whole run.

Plain torch/numpy, no Django.
"""

import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .weights import ModelFileError, ModelSetCard, card_path_for, mtime_cached, read_state, write_safetensors

if TYPE_CHECKING:
    from .infer import TreeClassifier

FAMILIARITY_FILE = "familiarity.safetensors"
FORMAT = "hemoweb-familiarity-1"
QUANTILE = 0.98  # validation cells under the threshold: ~2 % of a lab's own cells go to review as unfamiliar
VALIDATION_RATE = 1 - QUANTILE
# The shared covariance gets RIDGE × its mean variance (trace / D) on the diagonal. With fewer training cells
# than feature dimensions (small datasets; 1,024-1,280 features) the covariance is singular, and directions the
# training cells never varied in would dominate the distance; the ridge bounds their weight. Measured on the
# shipped set (2,000 PBC train cells; held-out PBC test cells against the same cells dimmed to 60 % and zoomed
# out to 0.75×), 1e-3, 1e-2 and 1e-1 separate alike (AUROC 0.79-0.80 and 0.75-0.76), 1.0 worse (0.77, 0.71).
RIDGE = 1e-2
HISTOGRAM_BINS = 30
FLAG = "unfamiliar"

NEIGHBOURS = 10  # the k-th nearest training cell
COMPONENTS = 256  # principal components the neighbours are searched in
SCALE_QUANTILE = 0.99  # each score over its validation cells' 99 % quantile before the larger is taken

# run-level verdict (site_shift)
MIN_RUN_CELLS = 10
WARN_FACTOR = 3.0  # a run with 3× the validation share of unfamiliar cells is not like the training lab
ALARM_SHARE = 0.20
SCALE_RANGE = (0.75, 1.33)
GAIN_RANGE = (0.6, 1.6)
SHIFT_MESSAGE = ("These cells differ from the cells this model set was trained on (stain, scale or camera): "
                 "verify the model on your lab's cells before relying on it")


@dataclass
class Familiarity:
    """A set's familiarity statistics, ready to score backbone features."""

    means: torch.Tensor  # (K, D) one mean per training class
    precision: torch.Tensor  # (D, D) inverse of the shared covariance (with its ridge)
    card: dict

    def __post_init__(self) -> None:
        # distances in whitened space: precision = L Lᵀ, so (x - μ)ᵀ P (x - μ) = |(x - μ) L|²
        factor = torch.linalg.cholesky(self.precision.double())
        self._factor = factor.float()
        self._centres = (self.means.double() @ factor).float()

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @property
    def validation_rate(self) -> float:
        """The share of a training lab's cells over the threshold by design (1 - quantile): the share measured on
        a few dozen validation cells (`validation_over`) can be 0, which would make every run look shifted."""
        return 1.0 - float(self.card.get("quantile", QUANTILE))

    @property
    def dimension(self) -> int:
        return int(self.means.shape[1])

    def to(self, device: str | torch.device) -> "Familiarity":
        return Familiarity(self.means.to(device), self.precision.to(device), self.card)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) the Mahalanobis distance of each feature row to its nearest class mean."""
        if not len(features):
            return torch.empty(0)
        whitened = features.float().to(self._factor.device) @ self._factor
        distances = torch.cdist(whitened, self._centres, compute_mode="donot_use_mm_for_euclid_dist")
        return distances.min(dim=1).values.cpu()


@dataclass
class Neighbours:
    """Statistics as the k-th nearest training cell in cosine distance, in principal components, and the
    Mahalanobis distance to the nearest class: a cell's score is the larger of the two, each over its scale."""

    mean: torch.Tensor  # (1, D) the training features' mean, taken off before projecting
    projection: torch.Tensor  # (D, C) onto the first C principal components
    bank: torch.Tensor  # (N, C) the training cells, projected and L2-normalised
    card: dict  # `scales`: {"knn": s, "mahalanobis": s}, each the 99 % quantile of its validation scores
    classes: Familiarity  # the Mahalanobis part

    threshold = Familiarity.threshold
    validation_rate = Familiarity.validation_rate

    def __post_init__(self) -> None:
        self.bank = self.bank.float()
        self.k = min(int(self.card.get("neighbours", NEIGHBOURS)), len(self.bank))

    @property
    def dimension(self) -> int:
        return int(self.mean.shape[1])

    def to(self, device: str | torch.device) -> "Neighbours":
        return Neighbours(self.mean.to(device), self.projection.to(device), self.bank.to(device), self.card,
                          self.classes.to(device))

    def nearest(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) 1 − the cosine similarity of each feature row to its k-th nearest training cell."""
        projected = (features.float().to(self.bank.device) - self.mean) @ self.projection
        similarity = torch.nn.functional.normalize(projected, dim=1) @ self.bank.T
        return (1 - similarity.topk(self.k, dim=1).values[:, -1]).cpu()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) the larger of the neighbour and the Mahalanobis score, each over its scale (1: as strange as the
        strangest 1 % of the validation cells by that score)."""
        if not len(features):
            return torch.empty(0)
        scales = self.card.get("scales") or {}
        return torch.maximum(self.nearest(features) / float(scales.get("knn", 1.0)),
                             self.classes.scores(features) / float(scales.get("mahalanobis", 1.0)))


def fit_neighbours(features: torch.Tensor, components: int = COMPONENTS) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """(mean (1, D), projection (D, C), bank (N, C)) from training features: principal components by SVD."""
    if len(features) < 2:
        raise ValueError(f"{len(features)} training cells: too few to compare cells with.")
    x = features.double().cpu()
    mean = x.mean(dim=0, keepdim=True)
    projection = torch.linalg.svd(x - mean, full_matrices=False).Vh[:min(components, len(x) - 1, x.shape[1])].T
    bank = torch.nn.functional.normalize((x - mean) @ projection, dim=1)
    return mean.float().contiguous(), projection.float().contiguous(), bank.half().contiguous()


def fit_statistics(features: torch.Tensor, labels: Sequence[str], ridge: float = RIDGE,
                   ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(means (K, D), precision (D, D), classes) from training features and their labels, in float64 then stored
    as float32. The covariance is pooled within classes, as in linear discriminant analysis."""
    if len(features) != len(labels):
        raise ValueError("features and labels differ in length")
    classes = sorted(set(labels))
    if len(features) <= len(classes):
        raise ValueError(f"{len(features)} training cells in {len(classes)} classes: too few for a covariance.")
    x = features.double().cpu()
    index = torch.tensor([classes.index(label) for label in labels])
    means = torch.stack([x[index == k].mean(dim=0) for k in range(len(classes))])
    centred = x - means[index]
    covariance = centred.T @ centred / (len(x) - len(classes))
    dimension = covariance.shape[0]
    covariance += ridge * float(covariance.trace()) / dimension * torch.eye(dimension, dtype=torch.float64)
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2  # exactly symmetric, for the Cholesky factor at load
    return means.float().contiguous(), precision.float().contiguous(), classes


def backbone_fingerprint(weights_path: Path) -> str:
    """sha256 of a backbone's tensors (names, shapes, values as float16), whatever precision the file stores.

    Not the file's bytes: a set's weights may be rewritten in float16 after training (train.store_half), which
    keeps the features its statistics describe.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(read_state(weights_path, "the shared backbone").items()):
        value = tensor.half() if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def histogram(values: Sequence[float], bins: int = HISTOGRAM_BINS) -> dict:
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"edges": [round(float(edge), 3) for edge in edges], "counts": [int(count) for count in counts]}


# --- features, the way classification computes them ----------------------------------------------


def cell_features(classifier: "TreeClassifier", items: Iterable, *, chunk: int = 256, batch_size: int = 64,
                  stated_um_per_px: float | None = None, scale_sample: int = 200) -> torch.Tensor:
    """The first-view backbone features (N, D) of cells, through the classifier's own preprocessing.

    `items` are PIL images, uint8 tensors at the input size, or loaders (callables) of either, read a chunk at
    a time. A set trained at a scale measures it once over up to `scale_sample` images, as an evaluation does.
    """
    from .standardise import as_rgb, measure

    if not classifier.shared:
        raise ValueError("Familiarity needs a set whose nodes share one backbone.")
    items = list(items)

    def load(item):
        return item() if callable(item) else item

    scale = None
    if classifier.scale_reference is not None and items:
        sample = [load(item) for item in items[::max(1, len(items) // scale_sample)]]
        measured = [measure(as_rgb(image)) for image in sample if not isinstance(image, torch.Tensor)]
        if measured:
            scale = classifier.estimate_scale([], stated_um_per_px, measured=measured)
    found = []
    with torch.inference_mode():
        for start in range(0, len(items), chunk):
            images, _ = classifier._prepare([load(item) for item in items[start:start + chunk]], scale,
                                            stated_um_per_px)
            found.append(classifier._features(images, batch_size)[0].cpu())
    return torch.cat(found) if found else torch.empty(0, classifier.feature_dimension)


def fit_familiarity(classifier: "TreeClassifier", train_items: Iterable, train_labels: Sequence[str],
                    val_items: Iterable, *, val_labels: Sequence[str] | None = None, quantile: float = QUANTILE,
                    ridge: float = RIDGE, progress: Callable[[str], None] | None = None, **where: str) -> dict:
    """Fit the statistics on training cells, choose the threshold on validation cells, and write both files
    into the set's folder. Returns the card; record it into set.json with `record_familiarity`.

    With `val_labels` the validation cells are also classified as a lab would see them (thresholds, second look,
    the new familiarity flag): the card's `validation` keeps their coverage, selective accuracy and risk-coverage
    curve (the model set page draws it)."""
    if not classifier.shared:
        raise ValueError("Familiarity needs a set whose nodes share one backbone: this set has one network per node.")
    train = cell_features(classifier, train_items)
    if progress:
        progress(f"familiarity: features of {len(train)} training cells")
    val_items = list(val_items)
    val = cell_features(classifier, val_items)
    if not len(val):
        raise ValueError("Familiarity needs validation cells to choose its threshold.")
    mean, projection, bank = fit_neighbours(train)
    means, precision, classes = fit_statistics(train, train_labels, ridge)
    statistics = Neighbours(mean, projection, bank, {"threshold": 0.0},
                            Familiarity(means, precision, {"threshold": 0.0}))
    scales = {"knn": float(torch.quantile(statistics.nearest(val).double(), SCALE_QUANTILE)),
              "mahalanobis": float(torch.quantile(statistics.classes.scores(val).double(), SCALE_QUANTILE))}
    statistics.card["scales"] = scales
    val_scores = statistics.scores(val)
    threshold = float(torch.quantile(val_scores.double(), quantile))
    backbone = classifier.folder / classifier.set_card.backbone
    card = {
        "format": FORMAT,
        "method": "knn or mahalanobis",
        "about": f"the larger of: 1 - cosine similarity to the {NEIGHBOURS}th nearest training cell in the first "
                 f"{projection.shape[1]} principal components of the backbone's features (Sun et al. 2022), and the "
                 "Mahalanobis distance to the nearest class mean with one shared covariance (Lee et al. 2018); "
                 f"each over its scale (the {SCALE_QUANTILE:.0%} quantile of its validation scores)",
        "scales": {key: round(value, 6) for key, value in scales.items()},
        "backbone": classifier.set_card.backbone,
        "backbone_fingerprint": backbone_fingerprint(backbone),
        "dimension": int(mean.shape[1]),
        "components": int(projection.shape[1]),
        "neighbours": NEIGHBOURS,
        "classes": classes,
        "ridge": ridge,
        "quantile": quantile,
        "threshold": round(threshold, 4),
        "validation_over": round(float((val_scores > threshold).double().mean()), 4),
        "n_train": len(train),
        "n_val": len(val),
        "train_median": round(float(statistics.scores(train).median()), 4),
        "val_median": round(float(val_scores.median()), 4),
        "histogram": histogram(val_scores.tolist()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **where,
    }
    if val_labels is not None:
        card["validation"] = _validation(classifier, val_items, val_labels, val_scores, threshold)
    write_safetensors(classifier.folder / FAMILIARITY_FILE,
                      {"mean": mean, "projection": projection, "bank": bank, "means": means, "precision": precision},
                      {"format": FORMAT, "backbone": card["backbone"]}, card=card)
    return card


def _validation(classifier: "TreeClassifier", items: list, labels: Sequence[str], scores: torch.Tensor,
                threshold: float) -> dict:
    """The validation cells classified with the new statistics: what evaluate_tree would report of them."""
    from .evaluate import score_predictions

    predictions = []
    for start in range(0, len(items), 256):
        chunk = [item() if callable(item) else item for item in items[start:start + 256]]
        predictions.extend(classifier.classify(chunk))
    for prediction, score in zip(predictions, scores.tolist(), strict=True):
        classifier.judge_familiarity(prediction, score, threshold)
    scored = score_predictions(classifier.tree, list(labels), predictions)
    keys = ("n", "accuracy", "balanced_accuracy", "coverage", "selective_accuracy", "selective_n", "flagged_share",
            "unfamiliar_share", "risk_coverage")
    return {key: scored[key] for key in keys}


def record_familiarity(set_card: ModelSetCard, card: dict) -> None:
    """Name the statistics in a set's card and keep their summary (the model set page shows it)."""
    set_card.familiarity = FAMILIARITY_FILE
    set_card.metrics["familiarity"] = summary(card)


def summary(card: dict) -> dict:
    """What set.json keeps of a familiarity card (the model set page reads it from the registry)."""
    keys = ("threshold", "quantile", "validation_over", "n_train", "n_val", "val_median", "histogram", "created",
            "validation", "method")
    return {key: card[key] for key in card if key in keys or key.endswith("_on")}


# --- loading ---------------------------------------------------------------------------------------


def load_familiarity(path: Path, backbone_path: Path, dimension: int, device: str | torch.device = "cpu",
                     ) -> "Familiarity | Neighbours":
    """A set's statistics, checked against its backbone (feature dimension and weights): another backbone's
    statistics are refused."""
    path, backbone_path = Path(path), Path(backbone_path)
    card_path = card_path_for(path)
    again = "Fit them again with `python manage.py fit_familiarity --dataset NAME --models SET`."
    if not card_path.is_file():
        raise ModelFileError(f"The familiarity card {card_path} is missing. {again}")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelFileError(f"The familiarity card {card_path} is not valid: {error}") from error
    state = read_state(path, "the familiarity statistics")
    means, precision = state.get("means"), state.get("precision")
    mean, projection, bank = state.get("mean"), state.get("projection"), state.get("bank")
    if means is None or precision is None or means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
        raise ModelFileError(f"{path} does not hold familiarity statistics (class means and a square precision). "
                             f"{again}")
    found = means.shape[1]
    if bank is not None and (mean is None or projection is None or bank.ndim != 2 or mean.shape != (1, found)
                             or projection.shape != (found, bank.shape[1])):
        raise ModelFileError(f"{path}: its training cells, mean and projection do not match (damaged). {again}")
    if found != dimension or card.get("dimension") != dimension:
        raise ModelFileError(f"The familiarity statistics {path} are for {found} features, but the backbone "
                             f"{backbone_path.name} gives {dimension}: they belong to another backbone. {again}")
    if card.get("backbone_fingerprint") != backbone_fingerprint(backbone_path):
        raise ModelFileError(f"The familiarity statistics {path} were fitted on another backbone than "
                             f"{backbone_path.name} (its weights changed since): their scores would mean nothing. "
                             f"{again}")
    try:
        classes = Familiarity(means, precision, card)
        return (Neighbours(mean, projection, bank, card, classes) if bank is not None else classes).to(device)
    except RuntimeError as error:  # a precision that is not positive definite: damaged
        raise ModelFileError(f"The familiarity statistics {path} are damaged: {error} {again}") from error


_cache: dict = {}
_lock = threading.Lock()


def cached_familiarity(path: Path, backbone_path: Path, dimension: int, device: str | torch.device = "cpu",
                       ) -> "Familiarity | Neighbours":
    """load_familiarity once per process, again when the statistics, their card or the backbone file change."""
    backbone_path = Path(backbone_path)
    backbone_time = backbone_path.stat().st_mtime_ns if backbone_path.is_file() else -1
    return mtime_cached(_cache, _lock, path, (str(device), str(backbone_path), backbone_time, dimension),
                        lambda where, _: load_familiarity(where, backbone_path, dimension, device))


# --- the run's verdict -------------------------------------------------------------------------------


def _score(item) -> float | None:
    value = item.get("familiarity") if isinstance(item, dict) else getattr(item, "familiarity", item)
    return None if value is None else float(value)


def site_shift(cells: Sequence, scale: dict | None, colour: dict | None, *, threshold: float | None,
               validation_rate: float = VALIDATION_RATE) -> dict:
    """One verdict for a run: are its cells like the ones the set was trained on?

    `cells` are predictions, their dicts, or familiarity scores; `scale` and `colour` the run's scale and colour
    summaries (standardise.scale_summary, colour_summary); `threshold` and `validation_rate` come from the set's
    statistics (None: the set has none). Levels: ok, warn (3× the validation share of unfamiliar cells, a scale
    ratio outside 0.75-1.33, or a white-balance gain outside 0.6-1.6 on any channel), alarm (20 % unfamiliar),
    none (fewer than 10 cells), unknown (no statistics).
    """
    scores = [_score(cell) for cell in cells]
    n = len(scores)
    result: dict = {"level": "", "score": None, "unfamiliar_share": None, "n": n, "reasons": [], "message": ""}
    if threshold is None:
        return {**result, "level": "unknown",
                "message": "This model set has no familiarity statistics: run `python manage.py fit_familiarity` "
                           "to compare a run's cells with its training cells."}
    if n < MIN_RUN_CELLS:
        return {**result, "level": "none", "message": "Too few cells for a run-level verdict."}
    measured = [value for value in scores if value is not None]
    share = sum(value > threshold for value in measured) / n
    result.update(threshold=round(threshold, 4), validation_rate=round(validation_rate, 4),
                  unfamiliar_share=round(share, 4),
                  # the median cell's distance against the threshold: 1.0 or more, the typical cell is as strange
                  # as the strangest few validation cells
                  score=round(float(np.median(measured)) / threshold, 3) if measured and threshold > 0 else None)
    reasons = []
    if share >= WARN_FACTOR * validation_rate:
        reasons.append(f"{share:.0%} of the cells are unfamiliar ({validation_rate:.0%} of the validation cells)")
    ratio = (scale or {}).get("ratio") or ((scale or {}).get("run") or {}).get("ratio")
    if ratio and not SCALE_RANGE[0] <= ratio <= SCALE_RANGE[1]:
        reasons.append(f"the scale is {ratio:.2f}× the training scale")
    gains = (colour or {}).get("gain") or []
    if any(not GAIN_RANGE[0] <= gain <= GAIN_RANGE[1] for gain in gains):
        reasons.append("the white balance needs a gain of " + ", ".join(f"{gain:.2f}" for gain in gains) +
                       " (red, green, blue)")
    level = "alarm" if share >= ALARM_SHARE else "warn" if reasons else "ok"
    message = SHIFT_MESSAGE if level != "ok" else "These cells look like the cells this model set was trained on."
    return {**result, "level": level, "reasons": reasons, "message": message}
