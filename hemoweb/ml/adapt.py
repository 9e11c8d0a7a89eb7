"""Adapting a shared-backbone model set to another lab's cells: a new set, scored before and after.

`adapt_set` copies a set and fine-tunes it on a few of the lab's labelled cells, through the set's own
preprocessing (its scale and white balance, as classification prepares a run):

- `heads`: the backbone stays as it is; every node's head is trained on the backbone's features of the lab's
  cells (each in `views` turned and mirrored views) together with the set's own training cells (replay, so that
  the original cells keep their answers). Seconds on a CPU: the features are computed once.
- `norm`: first the backbone's BatchNorm statistics are estimated again, on the lab's cells (labelled or not)
  mixed half and half with the set's training cells (the lab's alone would move the original cells' features
  away); then the BatchNorm scales and shifts and the heads are trained.
- `full`: as `norm`, with every weight trained (a smaller learning rate).

The familiarity statistics are fitted again on the adapted features of the set's training cells and the lab's
labelled cells, so the lab's cells are no longer all "unfamiliar". The new set is scored before and after on the
lab's cells kept aside and on the set's original test cells; `accepted` is false (with the reasons) when it is
not better on the lab's cells or loses more than `max_loss` on the original ones. Deterministic for a seed.

The set is written into a hidden staging folder beside `out_dir` and moved into place only at the end: a
cancelled or failed adaptation leaves nothing behind. Plain torch, no Django.
"""

import copy
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .evaluate import evaluate_tree
from .familiarity import fit_familiarity, record_familiarity
from .infer import VIEW_ORDER, TreeClassifier, view
from .metrics import threshold_floor
from .preprocess import model_input
from .standardise import as_rgb, measure
from .train import BACKBONE, Progress
from .tree import CellTree
from .weights import ModelCard, load_backbone, read_card, read_set, save_state, write_json, write_set

MODES = ("heads", "norm", "full")
MIN_CELLS_PER_TYPE = 2
MAX_LOSS = 0.01  # on the original test cells, in balanced accuracy
Loader = Callable[[], Image.Image]
Callback = Callable[[Progress], None]


class AdaptError(ValueError):
    """The adaptation cannot start or go on; the message is meant for a lab user."""


@dataclass
class LabCell:
    """One of the lab's cells: its image (opened when needed), tree code ("" when unlabelled), sha256, slide."""

    load: Loader
    label: str = ""
    sha256: str = ""
    group: str = ""  # patient or slide: cells of one group stay on one side of the split


@dataclass
class AdaptConfig:
    mode: str = "heads"
    seed: int = 0
    views: int = 4  # turned/mirrored views of each lab cell the heads see (heads mode) or sample from
    steps: int = 300  # heads mode: full-batch AdamW steps on the features
    lr: float = 0.0  # 0: 3e-3 for heads, 1e-3 for norm, 1e-4 for full
    epochs: int = 4  # norm / full: passes over the lab's labelled cells
    batch_size: int = 16
    weight_decay: float = 1e-4
    replay: int = 400  # the set's training cells used beside the lab's (0: none)
    lab_weight: float = 0.5  # share of the loss that the lab's cells carry (the rest: the replayed cells)
    anchor: float = 0.01  # pull of the heads towards the source set's (L2-SP): the original cells keep their answers
    min_coverage: float = 0.98  # node thresholds chosen again, as a training does, on validation + adaptation cells
    threads: int = 0
    max_loss: float = MAX_LOSS

    @property
    def learning_rate(self) -> float:
        return self.lr or {"heads": 3e-3, "norm": 1e-3, "full": 1e-4}[self.mode]


@dataclass
class Selection:
    """The lab's labelled cells an adaptation uses and what it left out, with the reasons."""

    cells: list[LabCell]
    unlabelled: list[LabCell] = field(default_factory=list)
    unknown_labels: dict[str, int] = field(default_factory=dict)
    too_few: dict[str, int] = field(default_factory=dict)
    training_overlap: int = 0

    def as_dict(self) -> dict:
        return {"n": len(self.cells), "unlabelled": len(self.unlabelled), "unknown_labels": self.unknown_labels,
                "too_few": {code: {"n": n, "reason": f"only {n} cell{'s' if n != 1 else ''}: a type needs at least "
                                                     f"{MIN_CELLS_PER_TYPE}"} for code, n in self.too_few.items()},
                "training_overlap": self.training_overlap,
                "per_type": dict(Counter(cell.label for cell in self.cells))}


def select_lab_cells(tree: CellTree, cells: Sequence[LabCell], known_codes: set[str],
                     training_sha256: set[str] | frozenset = frozenset()) -> Selection:
    """Leave out labels the tree (or the set) does not know, the set's own training cells (by sha256) and types with
    fewer than 2 cells; refuse when fewer than two types remain."""
    unlabelled = [cell for cell in cells if not cell.label]
    labelled = [cell for cell in cells if cell.label]
    unknown = Counter(cell.label for cell in labelled if cell.label not in tree
                      or not any(code in known_codes for code in tree.path(cell.label)))
    known = [cell for cell in labelled if cell.label not in unknown]
    fresh = [cell for cell in known if not (cell.sha256 and cell.sha256 in training_sha256)]
    per_type = Counter(cell.label for cell in fresh)
    too_few = {code: n for code, n in per_type.items() if n < MIN_CELLS_PER_TYPE}
    kept = [cell for cell in fresh if cell.label not in too_few]
    selection = Selection(kept, [c for c in unlabelled if not (c.sha256 and c.sha256 in training_sha256)],
                          dict(unknown), too_few, len(known) - len(fresh))
    types = sorted({cell.label for cell in kept})
    if len(types) < 2:
        reasons = []
        if selection.training_overlap:
            reasons.append(f"{selection.training_overlap} cells are training cells of the set and were left out")
        if too_few:
            reasons.append("too few cells of " + ", ".join(f"{code} ({n})" for code, n in sorted(too_few.items())))
        if unknown:
            reasons.append("labels the tree does not know: " + ", ".join(sorted(unknown)))
        having = f"only {types[0]} ({per_type[types[0]]} cells)" if types else "no labelled cells to use"
        raise AdaptError(f"An adaptation needs at least two cell types with at least {MIN_CELLS_PER_TYPE} cells each; "
                         f"these cells have {having}{'; ' + '; '.join(reasons) if reasons else ''}.")
    return selection


def split_lab_cells(cells: Sequence[LabCell], *, per_type: int = 0, fraction: float = 0.5, seed: int = 0,
                    ) -> tuple[list[LabCell], list[LabCell]]:
    """(cells to adapt on, cells kept aside to score): `per_type` cells of each type (or `fraction` of them), the
    rest aside; by patient or slide when the cells carry one (a group is never on both sides, except where all of a
    type's cells come from one group: they are split cell by cell). Every type keeps at least one cell on each side
    where it has two."""
    rng = random.Random(f"adapt-split:{seed}")
    by_type: dict[str, list[LabCell]] = {}
    for cell in cells:
        by_type.setdefault(cell.label, []).append(cell)
    adapt, aside = [], []
    for code in sorted(by_type):
        members = by_type[code]
        groups: dict[str, list[LabCell]] = {}
        for index, cell in enumerate(members):
            groups.setdefault(cell.group or f"#{index}", []).append(cell)
        keys = sorted(groups)
        rng.shuffle(keys)
        want = per_type if per_type else max(1, round(fraction * len(members)))
        want = min(want, len(members) - 1)
        taken = 0
        for key in keys:
            side = adapt if taken < want else aside
            side.extend(groups[key])
            if side is adapt:
                taken += len(groups[key])
        if not taken or len(members) == taken:  # one group holds every cell: it cannot be split by group
            adapt[:] = [c for c in adapt if c.label != code]
            aside[:] = [c for c in aside if c.label != code]
            shuffled = members[:]
            rng.shuffle(shuffled)
            adapt.extend(shuffled[:want])
            aside.extend(shuffled[want:])
    return adapt, aside


# --- preprocessing, as classification does it ------------------------------------------------------------


def prepared(classifier: TreeClassifier, loaders: Sequence[Loader], chunk: int = 128) -> torch.Tensor:
    """uint8 (N, 3, S, S) inputs of cells taken as one run: at the set's scale (measured over them, as a run's) and
    input size. White balance and normalisation come later (model_input), as in classification."""
    if not loaders:
        size = classifier.input_card.input_size
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    scale = None
    if classifier.scale_reference is not None:
        step = max(1, len(loaders) // 200)
        scale = classifier.estimate_scale([], measured=[measure(as_rgb(load())) for load in loaders[::step]])
    out = []
    for start in range(0, len(loaders), chunk):
        images, _ = classifier._prepare([load() for load in loaders[start:start + chunk]], scale, None)
        out.append(torch.stack(images))
    return torch.cat(out)


def node_targets(tree: CellTree, cards: dict[str, ModelCard], labels: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per node: each cell's class index there, or -100 where the cell is no example of the node."""
    targets = {}
    for node, card in cards.items():
        rows = []
        for label in labels:
            path = tree.path(label) if label in tree else []
            rows.append(next((i for i, code in enumerate(card.classes) if code in path), -100))
        targets[node] = torch.tensor(rows, dtype=torch.long)
    return targets


def _loss(heads: torch.nn.ModuleDict, features: torch.Tensor, targets: dict[str, torch.Tensor],
          weights: torch.Tensor) -> torch.Tensor:
    losses = []
    for node, head in heads.items():
        y = targets[node]
        valid = y != -100
        if valid.any():
            per_cell = torch.nn.functional.cross_entropy(head(features[valid]), y[valid], reduction="none",
                                                         label_smoothing=0.1)
            w = weights[valid]
            losses.append((per_cell * w).sum() / w.sum())
    return torch.stack(losses).sum()


def _cell_weights(labels: Sequence[str], lab: Sequence[bool], lab_weight: float) -> torch.Tensor:
    """Each cell's loss weight: the lab's cells carry `lab_weight` of the whole, balanced over their types; the
    replayed cells the rest, balanced over theirs."""
    weights = torch.zeros(len(labels))
    for side, share in ((True, lab_weight), (False, 1 - lab_weight)):
        chosen = [i for i, flag in enumerate(lab) if flag == side]
        counts = Counter(labels[i] for i in chosen)
        for i in chosen:
            weights[i] = share / (len(counts) * counts[labels[i]])
    return weights * len(labels)


# --- the adaptation ---------------------------------------------------------------------------------------


def _heads_of(classifier: TreeClassifier) -> tuple[torch.nn.ModuleDict, dict[str, ModelCard]]:
    heads, cards = {}, {}
    for node in classifier.node_files:
        head, card = classifier.part(node)
        heads[node] = copy.deepcopy(head).float().train()
        cards[node] = card
    return torch.nn.ModuleDict(heads), cards


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_batchnorm(backbone: torch.nn.Module, card: ModelCard, batches: Sequence[torch.Tensor],
                         callback: Callback) -> None:
    """BatchNorm running statistics as the plain average over `batches` (uint8 inputs), everything else fixed."""
    layers = _batchnorms(backbone)
    kept = [(m.momentum) for m in layers]
    backbone.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    for index, batch in enumerate(batches, 1):
        backbone(model_input(batch, card))
        callback(Progress("step", node="batchnorm", node_index=1, node_count=1, epoch=1, epochs=1, step=index,
                          steps=len(batches)))
    for m, momentum in zip(layers, kept, strict=True):
        m.momentum = momentum
    backbone.eval()


def _features(backbone: torch.nn.Module, card: ModelCard, images: torch.Tensor, views: int,
              batch_size: int = 32) -> list[torch.Tensor]:
    """(N, D) features per view, in eval mode."""
    backbone.eval()
    out: list[list[torch.Tensor]] = [[] for _ in range(views)]
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            for chunks, k in zip(out, VIEW_ORDER[:views], strict=False):
                chunks.append(backbone(model_input(view(batch, k), card)).float())
    return [torch.cat(chunks) if chunks else torch.empty(0) for chunks in out]


def _anchor(heads: torch.nn.ModuleDict, start: list[torch.Tensor], weight: float) -> torch.Tensor:
    """weight × the squared distance of the heads from where they started (L2-SP, Li et al. 2018)."""
    return weight * sum(((p - p0) ** 2).sum() for p, p0 in zip(heads.parameters(), start, strict=True))


def choose_thresholds(backbone: torch.nn.Module, heads: torch.nn.ModuleDict, card: ModelCard, images: torch.Tensor,
                      labels: Sequence[str], tree: CellTree, cards: dict, min_coverage: float) -> dict[str, float]:
    """Each node's confidence threshold chosen again for the adapted heads (metrics.choose_threshold), on `images`."""
    from .metrics import choose_threshold

    if not len(images):
        return {}
    features = _features(backbone, card, images, 1)[0]
    targets = node_targets(tree, cards, labels)
    chosen = {}
    with torch.inference_mode():
        for node, head in heads.items():
            valid = targets[node] != -100
            if valid.sum() < 5:
                continue
            top, predicted = head.eval()(features[valid]).softmax(dim=1).max(dim=1)
            chosen[node] = choose_threshold(top.tolist(), (predicted == targets[node][valid]).tolist(), min_coverage,
                                            len(cards[node].classes))
    return chosen


def _train_heads_on_features(heads: torch.nn.ModuleDict, features: torch.Tensor, targets: dict, weights: torch.Tensor,
                             config: AdaptConfig, callback: Callback, cancel_every: int = 20) -> list[float]:
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    start = [p.detach().clone() for p in heads.parameters()]
    history = []
    for step in range(config.steps):
        for group in optimizer.param_groups:  # cosine decay: the heads move little at the end
            group["lr"] = config.learning_rate * 0.5 * (1 + torch.cos(torch.tensor(step / config.steps * 3.14159)).item())
        loss = _loss(heads, features, targets, weights) + _anchor(heads, start, config.anchor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(round(loss.item(), 5))
        if step % cancel_every == 0 or step == config.steps - 1:
            callback(Progress("step", node="heads", node_index=1, node_count=1, epoch=1, epochs=1, step=step + 1,
                              steps=config.steps, loss=loss.item()))
    return history


def _train_through_backbone(backbone: torch.nn.Module, heads: torch.nn.ModuleDict, card: ModelCard,
                            lab_images: torch.Tensor, lab_labels: list[str], replay_images: torch.Tensor,
                            replay_labels: list[str], tree: CellTree, cards: dict, config: AdaptConfig,
                            callback: Callback) -> list[float]:
    """norm / full: BatchNorm affine (or every weight) and the heads, with the BatchNorm statistics fixed."""
    for parameter in backbone.parameters():
        parameter.requires_grad_(config.mode == "full")
    if config.mode == "norm":
        for m in _batchnorms(backbone):
            for parameter in (m.weight, m.bias):
                if parameter is not None:
                    parameter.requires_grad_(True)
    trainable = [p for p in backbone.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in backbone.parameters() if p.requires_grad],
                                    "lr": config.learning_rate},
                                   {"params": list(heads.parameters()), "lr": config.learning_rate * 3}],
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    head_start = [p.detach().clone() for p in heads.parameters()]
    half = max(2, config.batch_size // 2)
    n_lab = len(lab_images)
    steps_per_epoch = max(1, -(-n_lab // half))
    total = steps_per_epoch * config.epochs
    history = []
    for epoch in range(config.epochs):
        order = torch.randperm(n_lab, generator=generator)
        for step in range(steps_per_epoch):
            lab_rows = order[step * half:(step + 1) * half]
            if len(lab_rows) < 2:
                lab_rows = torch.randint(0, n_lab, (2,), generator=generator)
            replay_rows = (torch.randint(0, len(replay_images), (half,), generator=generator)
                           if len(replay_images) else torch.empty(0, dtype=torch.long))
            k = VIEW_ORDER[int(torch.randint(0, len(VIEW_ORDER), (1,), generator=generator))]
            x = torch.cat([lab_images[lab_rows], replay_images[replay_rows]]) if len(replay_rows) else lab_images[lab_rows]
            labels = [lab_labels[i] for i in lab_rows.tolist()] + [replay_labels[i] for i in replay_rows.tolist()]
            lab_flags = [True] * len(lab_rows) + [False] * len(replay_rows)
            share = config.lab_weight if len(replay_rows) else 1.0
            weights = _cell_weights(labels, lab_flags, share)
            targets = node_targets(tree, cards, labels)
            done = epoch * steps_per_epoch + step
            for group, base in zip(optimizer.param_groups, (config.learning_rate, config.learning_rate * 3), strict=True):
                group["lr"] = base * 0.5 * (1 + torch.cos(torch.tensor(done / total * 3.14159)).item())
            features = backbone(model_input(view(x, k), card))  # BatchNorm in eval mode: the statistics stay
            loss = _loss(heads, features, targets, weights) + _anchor(heads, head_start, config.anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()
            history.append(round(loss.item(), 5))
            callback(Progress("step", node=config.mode, node_index=1, node_count=1, epoch=epoch + 1,
                              epochs=config.epochs, step=step + 1, steps=steps_per_epoch, loss=loss.item()))
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    backbone.eval()
    return history


def _score(classifier: TreeClassifier, cells: Sequence[tuple[Loader, str]]) -> dict | None:
    if not cells:
        return None
    result = evaluate_tree(classifier, list(cells))
    return {"n": result["n"], "balanced_accuracy": result["balanced_accuracy"], "accuracy": result["accuracy"],
            "coverage": result["coverage"], "unfamiliar_share": result["unfamiliar_share"],
            "forced_balanced_accuracy": result["forced"]["balanced_accuracy"],
            "coarse8_balanced_accuracy": result["coarse8"]["balanced_accuracy"],
            "forced_coarse8_balanced_accuracy": result["forced"]["coarse8"]["balanced_accuracy"],
            "per_code_recall": {code: v["recall"] for code, v in result["per_code"].items()}}


def judge(before: dict, after: dict, max_loss: float = MAX_LOSS) -> tuple[bool, list[str]]:
    """(accepted, reasons): better on the lab's kept-aside cells, and no more than `max_loss` lost on the original
    test cells (balanced accuracy down the tree, refusals counted as wrong)."""
    reasons = []
    lab_b, lab_a = before.get("lab"), after.get("lab")
    if lab_b and lab_a and not lab_a["balanced_accuracy"] > lab_b["balanced_accuracy"]:
        reasons.append(f"not better on the lab's {lab_a['n']} cells kept aside: balanced accuracy "
                       f"{lab_b['balanced_accuracy']:.3f} before, {lab_a['balanced_accuracy']:.3f} after")
    if not lab_a:
        reasons.append("no lab cells were kept aside to score the adaptation on")
    test_b, test_a = before.get("original_test"), after.get("original_test")
    if test_b and test_a and test_b["balanced_accuracy"] - test_a["balanced_accuracy"] > max_loss:
        reasons.append(f"loses {100 * (test_b['balanced_accuracy'] - test_a['balanced_accuracy']):.1f} points on "
                       f"the set's {test_a['n']} original test cells (balanced accuracy {test_b['balanced_accuracy']:.3f} "
                       f"before, {test_a['balanced_accuracy']:.3f} after; at most {100 * max_loss:.0f} allowed)")
    return not reasons, reasons


def adapt_set(
    source: Path,
    out_dir: Path,
    tree: CellTree,
    *,
    cells: Sequence[LabCell],
    aside: Sequence[LabCell] = (),
    unlabelled: Sequence[LabCell] = (),
    replay: Sequence[tuple[Loader, str]] = (),
    replay_val: Sequence[tuple[Loader, str]] = (),
    original_test: Sequence[tuple[Loader, str]] = (),
    config: AdaptConfig | None = None,
    name: str = "",
    data_info: dict | None = None,
    callback: Callback | None = None,
    score_before: dict | None = None,
) -> dict:
    """Write the adapted set into `out_dir` and return its report (before/after scores, `accepted`, `reasons`).

    `cells`: the lab's labelled cells to adapt on (selected: see select_lab_cells); `aside`: the lab's labelled
    cells kept aside to score on; `unlabelled`: more of the lab's cells, for the BatchNorm statistics; `replay`: the
    set's own training cells (loader, code), replayed and refitted into the familiarity statistics; `replay_val`:
    the set's validation cells, for the familiarity threshold; `original_test`: the set's test cells, scored before
    and after. `score_before` reuses scores of the source set already made (the same cells).
    """
    config = config or AdaptConfig()
    callback = callback or (lambda _: None)
    if config.mode not in MODES:
        raise AdaptError(f"Unknown adaptation mode {config.mode!r}: use one of {', '.join(MODES)}.")
    if config.threads:
        torch.set_num_threads(config.threads)
    source, out_dir = Path(source), Path(out_dir)
    classifier = TreeClassifier(source, tree)
    if not classifier.shared:
        raise AdaptError(f"{source.name} has one network per node: adaptation needs a set whose nodes share one "
                         "backbone (train it with --shared-backbone).")
    if out_dir.exists():
        raise AdaptError(f"{out_dir} exists already: choose another name.")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    lab_scores = [(cell.load, cell.label) for cell in aside]
    callback(Progress("log", message=f"Scoring {source.name} before: {len(lab_scores)} lab cells kept aside, "
                                     f"{len(original_test)} original test cells."))
    before = score_before or {"lab": _score(classifier, lab_scores), "original_test": _score(classifier, original_test)}

    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoints", "*.tmp", "*.onnx", "README.md"))
        report = _adapt_into(classifier, staging, tree, cells, unlabelled, replay, replay_val, config, callback)
        adapted = TreeClassifier(staging, tree)
        callback(Progress("log", message="Scoring the adapted set."))
        after = {"lab": _score(adapted, lab_scores), "original_test": _score(adapted, original_test)}
        accepted, reasons = judge(before, after, config.max_loss)
        report.update(source=source.name, name=name or out_dir.name, before=before, after=after, accepted=accepted,
                      reasons=reasons, seconds=round(time.perf_counter() - started, 1), config=asdict(config),
                      lab_cells={"adapt": len(cells), "aside": len(aside), "unlabelled": len(unlabelled),
                                 "per_type": dict(Counter(cell.label for cell in cells))},
                      **(data_info or {}))
        _record(staging, name or out_dir.name, source.name, report)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _adapt_into(classifier: TreeClassifier, folder: Path, tree: CellTree, cells: Sequence[LabCell],
                unlabelled: Sequence[LabCell], replay: Sequence[tuple[Loader, str]],
                replay_val: Sequence[tuple[Loader, str]], config: AdaptConfig, callback: Callback) -> dict:
    card = classifier.input_card
    heads, cards = _heads_of(classifier)
    rng = random.Random(f"adapt-replay:{config.seed}")
    replay = list(replay)
    if config.replay and len(replay) > config.replay:
        replay = [replay[i] for i in sorted(rng.sample(range(len(replay)), config.replay))]
    callback(Progress("log", message=f"Preparing {len(cells)} lab cells, {len(unlabelled)} unlabelled and "
                                     f"{len(replay)} of the set's training cells."))
    lab_images = prepared(classifier, [cell.load for cell in cells])
    lab_labels = [cell.label for cell in cells]
    replay_images = prepared(classifier, [load for load, _ in replay])
    replay_labels = [code for _, code in replay]
    backbone = copy.deepcopy(classifier.backbone()[0]).float()
    history: list[float] = []
    if config.mode == "heads":
        lab_features = _features(backbone, card, lab_images, config.views)
        replay_features = _features(backbone, card, replay_images, 1)[0] if len(replay_images) else torch.empty(0)
        features = torch.cat(lab_features + ([replay_features] if len(replay_images) else []))
        labels = lab_labels * config.views + replay_labels
        flags = [True] * (len(lab_labels) * config.views) + [False] * len(replay_labels)
        weights = _cell_weights(labels, flags, config.lab_weight if replay_labels else 1.0)
        history = _train_heads_on_features(heads, features, node_targets(tree, cards, labels), weights, config,
                                           callback)
    else:
        lab_all = torch.cat([lab_images, prepared(classifier, [cell.load for cell in unlabelled])])
        batches = []
        generator = torch.Generator().manual_seed(config.seed)
        lab_order = torch.randperm(len(lab_all), generator=generator)
        size = config.batch_size
        for start in range(0, len(lab_all), size):  # each lab batch paired with as many replayed cells
            batches.append(lab_all[lab_order[start:start + size]])
            if len(replay_images):
                batches.append(replay_images[torch.randint(0, len(replay_images), (size,), generator=generator)])
        callback(Progress("log", message=f"Re-estimating BatchNorm statistics on {len(lab_all)} lab cells and as "
                                         "many of the set's training cells."))
        reestimate_batchnorm(backbone, card, batches, callback)
        history = _train_through_backbone(backbone, heads, card, lab_images, lab_labels, replay_images,
                                          replay_labels, tree, cards, config, callback)
        backbone_card = read_card(folder / BACKBONE)
        save_state(backbone.state_dict(), backbone_card, folder / BACKBONE)
    val_images = prepared(classifier, [load for load, _ in replay_val])
    thresholds = choose_thresholds(backbone, heads, card, torch.cat([val_images, lab_images]),
                                   [code for _, code in replay_val] + lab_labels, tree, cards, config.min_coverage)
    for node, head in heads.items():
        node_card = read_card(folder / f"{node}.safetensors")
        kept = max(node_card.threshold, threshold_floor(len(node_card.classes)))  # a node too few cells reached
        node_card.threshold = thresholds.get(node, kept)
        save_state(head.eval().state_dict(), node_card, folder / f"{node}.safetensors")
    # familiarity: the adapted features of the set's training cells and the lab's labelled cells (every view)
    adapted = TreeClassifier(folder, tree)
    train_items = list(replay_images) + [image for k in VIEW_ORDER[:max(1, config.views)]
                                         for image in view(lab_images, k)]
    train_labels = replay_labels + lab_labels * max(1, config.views)
    familiarity = {}
    if len(val_images) and len(set(train_labels)) >= 2:
        callback(Progress("log", message=f"Fitting familiarity on {len(train_items)} cells."))
        card_f = fit_familiarity(adapted, train_items, train_labels, list(val_images),
                                 fitted_on="the set's training cells and the lab's adaptation cells",
                                 threshold_on="the set's validation cells")
        set_card = read_set(folder)
        record_familiarity(set_card, card_f)
        write_set(folder, set_card)
        familiarity = {"threshold": card_f["threshold"], "n_train": card_f["n_train"], "n_val": card_f["n_val"]}
    else:
        callback(Progress("log", message="Familiarity statistics not refitted (no validation cells given): kept."))
    return {"mode": config.mode, "loss_history": history[-5:], "familiarity": familiarity,
            "thresholds": {node: round(value, 4) for node, value in thresholds.items()},
            "thresholds_on": f"{len(val_images)} of the set's validation cells and the {len(lab_images)} adaptation cells"}


def _record(folder: Path, name: str, source: str, report: dict) -> None:
    """Both scores in set.json (`metrics.adaptation`), every node card (`metrics.adaptation`) and a README."""
    set_card = read_set(folder)
    set_card.name = name
    set_card.data = {**set_card.data, "adapted_from": source}
    summary = {key: report[key] for key in ("source", "mode", "before", "after", "accepted", "reasons", "seconds",
                                            "lab_cells") if key in report}
    set_card.metrics["adaptation"] = summary
    write_set(folder, set_card)
    for node in set_card.nodes:
        path = folder / f"{node}.json"
        card = read_card(folder / f"{node}.safetensors")
        card.metrics = {**card.metrics, "adaptation": {"before": report["before"], "after": report["after"]}}
        write_json(path, asdict(card))
    lines = [f"# {name}", "", f"Adapted from `{source}` ({report['mode']} mode) on {report['lab_cells']['adapt']} of the "
             f"lab's labelled cells in {report['seconds']} s.", "",
             "| cells | n | balanced accuracy before | after | forced 8-class before | after |", "|---|---|---|---|---|---|"]
    for key, title in (("lab", "the lab's cells kept aside"), ("original_test", "the set's original test cells")):
        b, a = report["before"].get(key), report["after"].get(key)
        if b and a:
            lines.append(f"| {title} | {a['n']} | {b['balanced_accuracy']:.3f} | {a['balanced_accuracy']:.3f} | "
                         f"{b['forced_coarse8_balanced_accuracy']:.3f} | {a['forced_coarse8_balanced_accuracy']:.3f} |")
    lines += ["", "Accepted." if report["accepted"] else "Refused: " + "; ".join(report["reasons"]) + ".", ""]
    (folder / "README.md").write_text("\n".join(lines))
