"""Hierarchical inference: every cell through ROOT, then each subset through the next node's classifier.

Batched per node (never one image at a time); models come from the per-process cache. In a set with
a shared backbone, every cell goes through the backbone once and the nodes are heads on its features,
so the tree costs one network pass per cell whatever its depth. A cell whose
top probability at a node is below that node's threshold stops there ("Myeloid, unresolved") and is
flagged for review; blasts and the abnormal branch are always flagged. Such a cell still gets a best
guess: the code reached by following the most probable child all the way down, thresholds ignored,
which the verification page offers and evaluation scores as the forced (no refusal) result.

A set may ask for a second look (`second_look` in set.json, chosen on validation cells when it was
trained): each cell left unsure goes down the tree again with its probabilities averaged over that many
turned and mirrored views, and stops only if it is still unsure.

A shared-backbone set with familiarity statistics (familiarity.py) scores every cell on the features its first
pass computed anyway: a cell unlike the training cells is flagged `unfamiliar`, is not resolved, and stops above
a leaf, keeping its best guess.

The networks run in PyTorch or, on the CPU, in ONNX Runtime (`engine`, see engine.py): the same predictions, several
times faster on a small CPU; everything around the networks is the same code either way.
"""

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .engine import EngineError, cached_onnx, resolve_engine
from .familiarity import FLAG as UNFAMILIAR, VALIDATION_RATE, Familiarity, cached_familiarity, site_shift
from .preprocess import model_input, resize_uint8
from .standardise import RBC_DIAMETER_UM, ScaleEstimate, ScaleReference, as_rgb, backgrounds, estimate_scale, measure, to_reference
from .tree import CellTree
from .weights import SET_CARD, ModelCard, cached_card, cached_model, load_backbone, load_head, load_model, read_set

log = logging.getLogger(__name__)

ALWAYS_FLAG = ("BLA", "ABN")  # codes whose cells (and descendants) always go to a human
VIEW_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)  # the 8 views of a cell (see `view`), most different first


def view(batch: torch.Tensor, k: int) -> torch.Tensor:
    """View k (0-7) of a (B, C, H, W) batch: turned k × 90° (k < 4), or mirrored and turned (k ≥ 4)."""
    turned = torch.rot90(batch, k % 4, dims=(2, 3)) if k % 4 else batch
    return turned.flip(3) if k >= 4 else turned


@dataclass
class Step:
    """At `node` the classifier chose `code` with `probability`."""

    node: str
    code: str
    probability: float
    second: str = ""  # the runner-up at this node (the second choice a reviewer compares with); "": one class
    second_probability: float = 0.0


@dataclass
class TreePrediction:
    code: str  # the deepest code reached
    path: list[Step] = field(default_factory=list)
    resolved: bool = False  # reached a leaf of the tree (or the deepest node with data)
    flags: list[str] = field(default_factory=list)
    guess: str = ""  # the code the most probable path reaches with thresholds ignored (= code when resolved)
    views: int = 1  # how many views of the cell its probabilities average (more than 1 after a second look)
    scale: dict = field(default_factory=dict)  # the scale used (standardise.ScaleEstimate) and this cell's own measure
    background: list[float] = field(default_factory=list)  # the image's background colour (RGB 0-255), before balancing
    familiarity: float | None = None  # distance to the training cells (familiarity.py); None: not measured

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def unsure(self) -> bool:
        """Stopped above a leaf because a probability fell below its node's threshold."""
        return any(flag.startswith("unsure") for flag in self.flags)

    @property
    def unfamiliar(self) -> bool:
        """Not like the cells the set was trained on (familiarity over the set's threshold)."""
        return any(flag.startswith(UNFAMILIAR) for flag in self.flags)

    @property
    def confidence(self) -> float:
        """Probability of the whole path (product of the steps)."""
        result = 1.0
        for step in self.path:
            result *= step.probability
        return result

    def as_dict(self) -> dict:
        return {
            "code": self.code,
            "path": [{"node": s.node, "code": s.code, "probability": round(s.probability, 5),
                      **({"second": s.second, "second_probability": round(s.second_probability, 5)}
                         if s.second else {})} for s in self.path],
            "resolved": self.resolved,
            "flags": self.flags,
            "guess": self.guess,
            "views": self.views,
            "scale": self.scale,
            "background": self.background,
            "familiarity": self.familiarity,
        }


class TreeClassifier:
    """The node classifiers of one model set, used together down the tree."""

    def __init__(self, set_folder: Path, tree: CellTree, device: str | torch.device = "cpu",
                 thresholds: dict[str, float] | None = None, second_look: int | None = None,
                 engine: str = "torch", onnx_cache: Path | None = None):
        self.folder = Path(set_folder)
        self.tree = tree
        self.device = torch.device(device)
        self.set_card = read_set(self.folder)
        self.node_files = {node: self.folder / name for node, name in self.set_card.nodes.items()}
        self._thresholds = thresholds or {}
        self.second_look = self.set_card.second_look if second_look is None else second_look
        if not 0 <= self.second_look <= len(VIEW_ORDER):
            raise ValueError(f"A second look takes 0 to {len(VIEW_ORDER)} views, not {self.second_look}.")
        self._engine = resolve_engine(engine, self.device)
        self.onnx_cache = onnx_cache  # where exports go when the set folder is read-only
        self.engine_note = ""  # why the engine fell back to torch, when it did

    @property
    def network_threads(self) -> int:
        """The CPU threads a network pass uses (PyTorch's; ONNX Runtime is given as many)."""
        return torch.get_num_threads()

    @property
    def engine(self) -> str:
        """The engine running the set's networks: onnxruntime, or torch (also where an export failed)."""
        return self._engine

    @property
    def shared(self) -> bool:
        return bool(self.set_card.backbone)

    def model(self, node: str) -> tuple[torch.nn.Module, ModelCard]:
        """The node's whole classifier (images → logits), whichever way the set stores it."""
        return cached_model(self.node_files[node], self.device)

    def part(self, node: str) -> tuple[torch.nn.Module, ModelCard]:
        """What classify runs for a node: its whole model, or only its head on the shared backbone's features."""
        return cached_model(self.node_files[node], self.device, load_head if self.shared else None)

    def backbone(self) -> tuple[torch.nn.Module, ModelCard]:
        return cached_model(self.folder / self.set_card.backbone, self.device, load_backbone)

    def network(self, node: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """What runs a network of the set under the engine in use: the shared backbone (no node), or a node's whole
        model in a set with one network per node. An export that fails leaves PyTorch in charge, with a log line."""
        path, loader = ((self.folder / self.set_card.backbone, load_backbone) if node is None
                        else (self.node_files[node], load_model))
        if self._engine == "onnxruntime":
            try:
                return cached_onnx(path, loader, self.onnx_cache)
            except EngineError as error:
                log.warning("%s: PyTorch classifies with %s instead", error, self.folder.name)
                self._engine, self.engine_note = "torch", str(error)
        return cached_model(path, self.device, loader)[0]

    @property
    def familiarity_fitted(self) -> bool:
        """The set has familiarity statistics (only a shared-backbone set can: they describe its features)."""
        return self.shared and bool(self.set_card.familiarity)

    def familiarity(self) -> "Familiarity | Neighbours | None":
        """The set's familiarity statistics, checked against its backbone; None where it has none."""
        if not self.familiarity_fitted:
            return None
        return cached_familiarity(self.folder / self.set_card.familiarity, self.folder / self.set_card.backbone,
                                  self.feature_dimension, self.device)

    @property
    def feature_dimension(self) -> int:
        """The length of the shared backbone's pooled features: what every node's linear head takes."""
        return self.part(next(iter(self.node_files)))[0].in_features

    @property
    def input_card(self) -> ModelCard:
        """The card of the network that sees the images first (the shared backbone, else ROOT's)."""
        if self.shared:
            return cached_card(self.folder / self.set_card.backbone)
        return self.part(self.tree.root if self.tree.root in self.node_files else next(iter(self.node_files)))[1]

    @property
    def scale_reference(self) -> ScaleReference | None:
        """The scale the set was trained at (None: a set that takes images as they are)."""
        return ScaleReference.from_card(self.input_card.scale)

    def estimate_scale(self, images: Sequence[Image.Image], stated_um_per_px: float | None = None,
                       measured: list[dict] | None = None) -> ScaleEstimate:
        """One scale for images taken together (a run): see standardise.estimate_scale."""
        found = measured if measured is not None else [measure(as_rgb(image)) for image in images]
        return estimate_scale(found, self.scale_reference, stated_um_per_px)

    def threshold(self, node: str, card: ModelCard) -> float:
        return self._thresholds.get(node, card.threshold)

    def check(self) -> None:
        """Load every node model now, so that a missing or damaged file fails before any work."""
        if self.shared:
            if self.engine == "torch":  # ONNX Runtime reads the weights when it exports them
                self.backbone()
            self.familiarity()
        for node in self.node_files:
            self.part(node)
        for node in [None] if self.shared else self.node_files:  # the engine's networks (an export on first use)
            self.network(node)

    @torch.inference_mode()
    def classify(self, images: Sequence[Image.Image | torch.Tensor], batch_size: int = 64,
                 scale: ScaleEstimate | None = None, stated_um_per_px: float | None = None,
                 scales: Sequence[dict] | None = None) -> list[TreePrediction]:
        """Predict a tree path for every image (PIL, or uint8 (3, S, S) tensors already at the input size).

        A set trained with a scale resamples PIL images to it: with `scale` (a run's estimate), or with one
        estimated over these images together (they are taken to come from one set-up). Each cell keeps its own
        measure too. A cell left unsure gets a second look when the set asks for one: its probabilities averaged
        over `second_look` rotated and mirrored views (a cell has no up or down), the tree walked again.
        Images made ready by `prepare` come as tensors with their scale records in `scales`.
        """
        if scales is not None:
            images, scales = [_at_size(image, self.input_card) for image in images], list(scales)
        else:
            images, scales = self._prepare(images, scale, stated_um_per_px)
        features = self._features(images, batch_size) if self.shared and images else None
        predictions = self._walk(images, batch_size, views=1, features=features)
        if self.second_look > 1:
            unsure = [index for index, prediction in enumerate(predictions) if prediction.unsure]
            if unsure:
                again = self._walk([images[index] for index in unsure], batch_size, views=self.second_look)
                for index, prediction in zip(unsure, again, strict=True):
                    predictions[index] = prediction
        found = [backgrounds(torch.stack(images[start:start + 256]).float() / 255.0)
                 for start in range(0, len(images), 256)] if images else []
        colours = torch.cat(found).mul(255).round().tolist() if found else []
        statistics = self.familiarity() if features is not None else None
        scores = statistics.scores(features[0]).tolist() if statistics else [None] * len(images)
        for prediction, scale_info, colour, score in zip(predictions, scales, colours, scores, strict=True):
            prediction.scale, prediction.background = scale_info, colour
            if scale_info.get("flag"):
                prediction.flags.append(scale_info["flag"])
            if score is not None:
                self.judge_familiarity(prediction, score, statistics.threshold)
            self._finish(prediction)
        return predictions

    def site_shift(self, cells: Sequence, scale: dict | None, colour: dict | None) -> dict:
        """The verdict on cells classified together (familiarity.site_shift) with this set's statistics; "unknown"
        for a set without them."""
        statistics = self.familiarity()
        return site_shift(cells, scale, colour, threshold=statistics.threshold if statistics else None,
                          validation_rate=statistics.validation_rate if statistics else VALIDATION_RATE)

    def judge_familiarity(self, prediction: TreePrediction, score: float, threshold: float) -> None:
        """Record the cell's familiarity; an unfamiliar cell goes to review, stopped above a leaf.

        The tree's answers were learnt on cells like the training ones: for a cell unlike them, the deepest
        step (a leaf) is the least trustworthy, so it stops at the leaf's parent; its best guess is kept.
        """
        prediction.familiarity = round(score, 3)
        if score <= threshold:
            return
        prediction.flags.append(f"{UNFAMILIAR}: not like the cells this set was trained on "
                                f"(score {score:.1f} > {threshold:.1f})")
        code = prediction.code
        if code in self.tree and self.tree.is_leaf(code) and self.tree.parents[code] is not None:
            prediction.code = self.tree.parents[code]

    def _prepare(self, images: Sequence[Image.Image | torch.Tensor], scale: ScaleEstimate | None,
                 stated_um_per_px: float | None) -> tuple[list[torch.Tensor], list[dict]]:
        """uint8 tensors at the input size, at the set's scale where it has one, and each image's scale record."""
        card, reference = self.input_card, self.scale_reference
        pil = [index for index, image in enumerate(images) if isinstance(image, Image.Image)]
        scales: list[dict] = [{} for _ in images]
        if reference is None or not pil:
            return [_at_size(image, card) for image in images], scales
        rgb = {index: as_rgb(images[index]) for index in pil}
        found = {index: measure(rgb[index]) for index in pil}
        used = scale or estimate_scale(list(found.values()), reference, stated_um_per_px)
        tensors = []
        for index, image in enumerate(images):
            if index in rgb:
                scales[index] = _scale_record(used, found[index])
                image = to_reference(rgb[index], reference, used)
            tensors.append(_at_size(image, card))
        return tensors, scales

    def prepare(self, image: Image.Image, scale: ScaleEstimate | None, own: bool = True) -> tuple[torch.Tensor, dict]:
        """One image as `_prepare` makes it within a run of known `scale`: the uint8 input and its scale record.

        Per image, so that a pool of threads can make a run's next chunk ready while the network classifies this one
        (`classify(tensors, scales=records)` then gives the same predictions as `classify(images, scale=scale)`).
        `own=False` leaves out the cell's own red-cell measure (a third of a cell's cost on the CPU): a large run
        measures a sample of its cells, which says as much about how their scales fell."""
        card, reference = self.input_card, self.scale_reference
        if reference is None or scale is None:
            return _at_size(image, card), {}
        rgb = as_rgb(image)
        return _at_size(to_reference(rgb, reference, scale), card), _scale_record(scale, measure(rgb) if own else None)

    def _walk(self, images: Sequence[Image.Image | torch.Tensor], batch_size: int, views: int,
              features: list[torch.Tensor] | None = None) -> list[TreePrediction]:
        """Every image down the tree, node by node, with probabilities averaged over `views` views.

        `features`: the shared backbone's features of these images, when already computed (one per view)."""
        predictions = [TreePrediction(code=self.tree.root, guess=self.tree.root, views=views) for _ in images]
        stopped: set[int] = set()  # cells that stopped below a threshold and go on only for their best guess
        pending = {self.tree.root: list(range(len(images)))} if self.tree.root in self.node_files else {}
        resized: dict[int, dict[int, torch.Tensor]] = {}  # input size -> image index -> uint8 tensor
        if features is None and pending and self.shared:
            features = self._features(images, batch_size, views)
        while pending:
            node, indices = next(iter(pending.items()))
            del pending[node]
            model, card = self.part(node)
            if features is None:  # one network per node: this node's input, resized once per input size
                model = self.network(node)
                by_index = resized.setdefault(card.input_size, {})
                for index in indices:
                    if index not in by_index:
                        by_index[index] = _at_size(images[index], card)
            threshold = self.threshold(node, card)
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                if features is None:
                    batch = torch.stack([by_index[i] for i in chunk]).to(self.device)
                    logits = [self._forward(model, model_input(view(batch, k), card), batch_size)
                              for k in VIEW_ORDER[:views]]
                else:  # shared backbone: the node's head on the features computed once per view
                    logits = [model(view_features[chunk]) for view_features in features]
                probabilities = torch.stack([out.float().softmax(dim=1) for out in logits]).mean(dim=0).cpu()
                top_p, top_i = probabilities.topk(min(2, probabilities.shape[1]), dim=1)
                for index, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist(), strict=True):
                    p, code = ps[0], card.classes[ids[0]]
                    prediction = predictions[index]
                    if index not in stopped:
                        second = (card.classes[ids[1]], ps[1]) if len(ids) > 1 else ("", 0.0)
                        prediction.path.append(Step(node, code, p, *second))
                        if p < threshold:
                            looked = f" ({views} views)" if views > 1 else ""
                            prediction.flags.append(f"unsure at {node}: {p:.2f} < {threshold:.2f}{looked}")
                            stopped.add(index)
                    code = card.resolves_to.get(code, code)
                    prediction.guess = code
                    if index not in stopped:
                        prediction.code = code
                    if code in self.node_files:
                        pending.setdefault(code, []).append(index)
        return predictions

    def _features(self, images: Sequence[Image.Image | torch.Tensor], batch_size: int,
                  views: int = 1) -> list[torch.Tensor]:
        """The shared backbone's pooled features of every image, one (N, D) float tensor per view."""
        backbone, card = self.network(), self.input_card
        chunks: list[list[torch.Tensor]] = [[] for _ in range(views)]
        for start in range(0, len(images), batch_size):
            stacked = torch.stack([_at_size(image, card) for image in images[start:start + batch_size]])
            stacked = stacked.to(self.device)
            for out, k in zip(chunks, VIEW_ORDER[:views], strict=False):
                batch = model_input(view(stacked, k), card)
                out.append(self._forward(backbone, batch, batch_size).float())
        return [torch.cat(out) for out in chunks]

    def _forward(self, model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                 batch_size: int) -> torch.Tensor:
        """The model on a batch padded to a power of two rows (at most batch_size), the padding dropped after.

        A short batch (the end of an upload, a second look at a few cells) would otherwise bring a new input
        shape each time, and the CPU kernels cached per shape would keep taking memory.
        """
        n = len(batch)
        rows = min(1 << (n - 1).bit_length(), max(batch_size, n))
        if rows > n:  # the last image repeated: rows do not mix in eval mode
            batch = torch.cat([batch, batch[-1:].expand(rows - n, *batch.shape[1:])])
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(batch.contiguous(memory_format=torch.channels_last))[:n]
        return model(batch)[:n]

    def _finish(self, prediction: TreePrediction) -> None:
        code = prediction.code
        prediction.resolved = (not prediction.unsure and not prediction.unfamiliar and code in self.tree
                               and (self.tree.is_leaf(code) or code not in self.node_files))
        if code in self.tree:
            for marker in ALWAYS_FLAG:
                if marker in self.tree.path(code):
                    prediction.flags.append(f"{marker} is always reviewed")


def _scale_record(used: ScaleEstimate, own: dict | None) -> dict:
    """What a cell keeps of its scale: the one it was classified at, and its own red cells' measure (None: not
    measured)."""
    if own is None:
        return {**used.as_dict(), "own_px_per_um": None, "own_red_cells": None}
    return {**used.as_dict(), "own_px_per_um": round(own["red_cell_px"] / RBC_DIAMETER_UM, 3)
            if own["red_cell_px"] and own["red_cells"] >= 2 else None, "own_red_cells": own["red_cells"]}


def _at_size(item: "Image.Image | torch.Tensor", card: ModelCard) -> torch.Tensor:
    """A uint8 (3, S, S) tensor at the card's input size; a tensor already at that size is used as it is."""
    if isinstance(item, torch.Tensor):
        if tuple(item.shape) != (3, card.input_size, card.input_size):
            raise ValueError(f"A pre-resized cell must be (3, {card.input_size}, {card.input_size}) for node "
                             f"{card.node}, not {tuple(item.shape)}.")
        return item
    return resize_uint8(item, card.input_size, card.interpolation)


def input_sizes(classifier: "TreeClassifier") -> set[tuple[int, str]]:
    """The (input size, interpolation) pairs the set's node models need: one pair allows resizing at decode."""
    if classifier.shared:
        card = classifier.input_card
        return {(card.input_size, card.interpolation)}
    return {(card.input_size, card.interpolation)
            for card in (classifier.part(node)[1] for node in classifier.node_files)}


_classifiers: dict[tuple, TreeClassifier] = {}
_lock = threading.Lock()


def tree_classifier(set_folder: Path, tree: CellTree, device: str = "cpu",
                    thresholds: dict[str, float] | None = None, engine: str = "torch",
                    onnx_cache: Path | None = None) -> TreeClassifier:
    """One TreeClassifier per (folder, tree, device, thresholds, engine) in this process, renewed when set.json
    changes."""
    folder = Path(set_folder).resolve()
    card_time = (folder / SET_CARD).stat().st_mtime_ns if (folder / SET_CARD).is_file() else 0
    key = (str(folder), card_time, tuple(sorted(tree.parents.items(), key=str)), str(device),
           tuple(sorted((thresholds or {}).items())), engine, str(onnx_cache))
    with _lock:
        if key not in _classifiers:
            _classifiers[key] = TreeClassifier(set_folder, tree, device, thresholds, engine=engine,
                                               onnx_cache=onnx_cache)
        return _classifiers[key]


def pick_device(requested: str = "auto") -> str:
    """'auto' → cuda when present, else cpu; 'cuda' without a GPU, or an unknown name, is an error a user can read."""
    if requested not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"Unknown device {requested!r}: use auto, cpu or cuda.")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is available on this machine.")
    return requested


