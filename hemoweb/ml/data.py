"""Training data for the node classifiers: splits, per-node sets, balancing, a decoded image cache, augmentation.

Plain Python + torch. Images are decoded once into a uint8 tensor at the training size; every epoch
and every node reads from that tensor, and augmentation runs batched on the training device.
"""

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .preprocess import RESAMPLE
from .standardise import ScaleReference, backgrounds, reference_from
from .tree import CellTree, NodePlan, node_examples, plan_nodes

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class DataError(ValueError):
    """The data cannot train anything (one class, no images, unreadable files)."""


# --- splits -------------------------------------------------------------------------------------


def assign_splits(
    keys: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[str] | None = None,
    existing: Sequence[str] | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> list[str]:
    """train/val/test for every cell, deterministic by seed, never splitting a group (patient or slide).

    `keys` identify cells stably (e.g. sha256), so the result does not depend on row order. Cells that
    already have a split keep it. Units (a group, or a single ungrouped cell) are stratified by their
    most common label and cut 8/1/1 within each stratum.
    """
    n = len(keys)
    existing = list(existing) if existing is not None else [""] * n
    groups = list(groups) if groups is not None else [""] * n
    result = [split if split in SPLITS else "" for split in existing]
    units: dict[str, list[int]] = {}
    for index in range(n):
        if result[index]:
            continue
        unit = f"group:{groups[index]}" if groups[index] else f"cell:{keys[index]}"
        units.setdefault(unit, []).append(index)
    strata: dict[str, list[str]] = {}
    for unit, members in units.items():
        label = Counter(labels[i] for i in members).most_common(1)[0][0]
        strata.setdefault(label, []).append(unit)
    bounds = (fractions[0], fractions[0] + fractions[1])
    for label in sorted(strata):
        unit_names = sorted(strata[label])
        random.Random(f"{seed}:{label}").shuffle(unit_names)
        count = len(unit_names)
        for position, unit in enumerate(unit_names):
            where = (position + 0.5) / count
            split = "train" if where < bounds[0] else "val" if where < bounds[1] else "test"
            for index in units[unit]:
                result[index] = split
    return result


# --- per-node sets and balancing ------------------------------------------------------------------


@dataclass
class NodeSet:
    """Everything one node classifier learns from: indices into the cell list and class targets."""

    node: str
    classes: list[str]
    train: list[tuple[int, int]]  # (cell index, class index), after balancing
    val: list[tuple[int, int]]
    test: list[tuple[int, int]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> n (train after balancing)
    available: dict[str, int] = field(default_factory=dict)  # class -> train cells before balancing
    class_weights: list[float] | None = None


def balance_per_level(
    examples: Sequence[tuple[int, str]], seed: int = 0, threshold: int = 1000
) -> list[tuple[int, str]]:
    """Cap every class at the smallest class's size, but never below `threshold` (the thesis' rule)."""
    per_class: dict[str, list[int]] = {}
    for index, code in examples:
        per_class.setdefault(code, []).append(index)
    if not per_class:
        return []
    cap = max(min(len(v) for v in per_class.values()), threshold)
    kept = []
    for code in sorted(per_class):
        indices = sorted(per_class[code])
        if len(indices) > cap:
            indices = sorted(random.Random(f"{seed}:balance:{code}").sample(indices, cap))
        kept.extend((index, code) for index in indices)
    return kept


def class_weights_for(counts: dict[str, int], classes: Sequence[str]) -> list[float]:
    """Inverse-frequency weights (mean 1) for a weighted loss instead of capping."""
    total = sum(counts[c] for c in classes)
    return [total / (len(classes) * counts[c]) for c in classes]


def build_node_sets(
    tree: CellTree,
    labels: Sequence[str],
    splits: Sequence[str],
    *,
    nodes: Sequence[str] | None = None,
    min_images: int = 10,
    balance: str = "cap",
    balance_threshold: int = 1000,
    seed: int = 0,
) -> tuple[list[NodeSet], list[NodePlan]]:
    """One NodeSet per trainable inner node (top-down) and the plans of the nodes skipped, with reasons."""
    if not labels:
        raise DataError("The dataset has no images.")
    if len(set(labels)) < 2:
        raise DataError(f"The dataset has only one cell type ({labels[0]}): a classifier needs at least two.")
    if balance not in ("cap", "weights", "none"):
        raise DataError(f"Unknown balancing {balance!r}: use cap, weights or none.")
    plans = plan_nodes(tree, labels, min_images=min_images)
    if nodes:
        unknown = [code for code in nodes if code not in tree or tree.is_leaf(code)]
        if unknown:
            raise DataError(f"Not inner nodes of the tree: {', '.join(unknown)}.")
        plans = [plan for plan in plans if plan.node in nodes]
    sets, skipped = [], []
    for plan in plans:
        if not plan.trained:
            skipped.append(plan)
            continue
        classes = list(plan.classes)
        by_split: dict[str, list[tuple[int, str]]] = {name: [] for name in SPLITS}
        for index, code in node_examples(tree, labels, plan.node):
            if splits[index] in by_split:
                by_split[splits[index]].append((index, code))
        available = Counter(code for _, code in by_split["train"])
        missing = [code for code in classes if not available.get(code)]
        if missing:
            skipped.append(NodePlan(plan.node, plan.classes, plan.counts,
                                    skipped=f"no training images for {', '.join(missing)} after the split"))
            continue
        train = by_split["train"]
        weights = None
        if balance == "cap":
            train = balance_per_level(train, seed=seed, threshold=balance_threshold)
        elif balance == "weights":
            weights = class_weights_for(available, classes)
        position = {code: i for i, code in enumerate(classes)}

        def encode(items: list[tuple[int, str]]) -> list[tuple[int, int]]:
            return [(index, position[code]) for index, code in items]

        sets.append(NodeSet(
            node=plan.node,
            classes=classes,
            train=encode(train),
            val=encode(by_split["val"]),
            test=encode(by_split["test"]),
            counts={name: dict(Counter(code for _, code in (train if name == "train" else by_split[name])))
                    for name in SPLITS},
            available=dict(available),
            class_weights=weights,
        ))
    return sets, skipped


# --- decoding -----------------------------------------------------------------------------------


def decode_one(path: Path | str, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """One image file → uint8 (3, size, size); JPEGs are decoded at reduced scale first (much faster)."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size * 2, size * 2))
        image = image.convert("RGB").resize((size, size), RESAMPLE.get(interpolation, Image.Resampling.BILINEAR))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_cache(
    paths: Sequence[Path | str],
    size: int,
    interpolation: str = "bilinear",
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """All images decoded once into a uint8 tensor (N, 3, size, size); a bad file names itself."""
    cache = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def load(index: int) -> int:
        try:
            cache[index] = decode_one(paths[index], size, interpolation)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"Cannot read the image {paths[index]}: {error}") from error
        return index

    chunk = 256
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), chunk):
            list(pool.map(load, range(start, min(start + chunk, len(paths)))))
            if progress:
                progress(min(start + chunk, len(paths)), len(paths))
    return cache


def training_scale(paths: Sequence[Path | str], sample: int = 400, seed: int = 0) -> ScaleReference:
    """The training images' scale (red cells, field, white cells), measured on up to `sample` of them."""
    chosen = sorted(random.Random(f"{seed}:scale").sample(list(paths), min(sample, len(paths))))
    images = []
    for path in chosen:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    try:
        return reference_from(images)
    except ValueError as error:
        raise DataError(str(error)) from error


# --- augmentation -------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """The thesis' augmentation (rotation, gamma/contrast, blur/sharpness) plus flips, scale and stain jitter."""

    rotation: float = 180.0  # degrees either way; cells have no up
    scale: tuple[float, float] = (0.85, 1.15)
    flips: bool = True
    gamma: tuple[float, float] = (0.8, 1.25)
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.08
    sharpness: tuple[float, float] = (-1.0, 1.0)  # <0 blurs, >0 sharpens
    stain: float = 0.06  # per-channel gain/offset jitter, a cheap stand-in for stain colour variation


class Augmenter:
    """Random, batched augmentation on uint8 or [0,1] float tensors on any device; returns float in [0,1]."""

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0):
        self.config = config or AugmentConfig()
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) * (high - low) + low

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        n, device = x.shape[0], x.device
        # rotation + scale + flips in one resampling
        angle = self._uniform(n, -c.rotation, c.rotation) * math.pi / 180
        scale = self._uniform(n, *c.scale)
        flip_x = torch.where(torch.rand(n, generator=self.generator) < 0.5, -1.0, 1.0) if c.flips else torch.ones(n)
        flip_y = torch.where(torch.rand(n, generator=self.generator) < 0.5, -1.0, 1.0) if c.flips else torch.ones(n)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([
            torch.stack([cos * flip_x, -sin * flip_y, torch.zeros(n)], dim=1),
            torch.stack([sin * flip_x, cos * flip_y, torch.zeros(n)], dim=1),
        ], dim=1).to(device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # blur or sharpen: x + s * (x - blur(x))
        kernel = torch.tensor([1.0, 2.0, 1.0], device=device)
        kernel = (kernel[:, None] * kernel[None, :]) / 16
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        s = self._uniform(n, *c.sharpness).to(device).view(n, 1, 1, 1)
        x = (x + s * (x - blurred)).clamp(0, 1)
        # gamma, contrast, brightness
        x = x.clamp_min(1e-4) ** self._uniform(n, *c.gamma).to(device).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * self._uniform(n, *c.contrast).to(device).view(n, 1, 1, 1) + mean
        x = x + self._uniform(n, -c.brightness, c.brightness).to(device).view(n, 1, 1, 1)
        # stain colour: per-channel gain and offset
        gain = (1 + (torch.rand(n, 3, generator=self.generator) * 2 - 1) * c.stain).to(device).view(n, 3, 1, 1)
        offset = ((torch.rand(n, 3, generator=self.generator) * 2 - 1) * c.stain / 2).to(device).view(n, 3, 1, 1)
        return (x * gain + offset).clamp(0, 1)


# --- augmentation that expects other labs ---------------------------------------------------------

# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB) as rows: optical density per RGB channel
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


@dataclass
class LabShiftConfig:
    """What changes from lab to lab, drawn at random per cell before the colour normalisation.

    Applied after the geometric augmentation, in the order light meets the camera: the field (a tighter
    crop), the stain (haematoxylin/eosin amounts and hues), the optics (defocus, a lower resolution), the lamp
    and exposure (tint, dim, gamma), the sensor (noise, 8-bit levels at that exposure) and the file (JPEG).
    """

    tight_crop: float = 0.4  # share of cells shown through a smaller window (background beyond it) ...
    tight_range: tuple[float, float] = (0.33, 0.9)  # ... of this fraction of the field's side
    stain_scale: float = 0.25  # each stain's amount × U(1 ± this)
    stain_shift: float = 0.05  # ... plus U(± this) optical density
    blur: float = 0.3  # share of cells defocused, with sigma up to blur_sigma px
    blur_sigma: float = 1.6
    low_resolution: float = 0.25  # share of cells taken down to 1/3-2/3 resolution and back
    tint: float = 0.25  # lamp/white-balance gain per channel, U(1 - this, 1)
    dim: float = 0.5  # share of cells exposed at 15-100 %, quantised and noisy there
    gamma: tuple[float, float] = (0.65, 1.5)
    noise: float = 0.03  # Gaussian sensor noise up to this (of full scale)
    jpeg: float = 0.2  # share of cells saved as JPEG at quality 30-90


class LabShift:
    """Random other-lab looks for a float (N, 3, H, W) batch in [0, 1] (CPU or GPU); returns float in [0, 1]."""

    def __init__(self, config: LabShiftConfig | None = None, seed: int = 0):
        self.config = config or LabShiftConfig()
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def _chosen(self, n: int, share: float, device) -> torch.Tensor:
        return (self._rand(n) < share).to(device).view(n, 1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, (n, _, h, w), device = self.config, x.shape, x.device
        # a tighter crop: the field beyond a centred window is the slide's background
        background = backgrounds(x)
        side = (self._rand(n) * (c.tight_range[1] - c.tight_range[0]) + c.tight_range[0]).to(device)
        ys = (torch.arange(h, device=device).float() + 0.5) / h - 0.5
        xs = (torch.arange(w, device=device).float() + 0.5) / w - 0.5
        inside = (ys.abs().view(1, h, 1) <= side.view(n, 1, 1) / 2) & (xs.abs().view(1, 1, w) <= side.view(n, 1, 1) / 2)
        tight = self._chosen(n, c.tight_crop, device)
        x = torch.where(tight & ~inside[:, None], background.view(n, 3, 1, 1), x)
        # stain: amounts and offsets of haematoxylin, eosin and the rest, in optical density
        od = -torch.log(x.clamp_min(1 / 255))
        rgb_from_hed = RGB_FROM_HED.to(device)
        hed = od.permute(0, 2, 3, 1) @ torch.linalg.inv(rgb_from_hed)
        scale = (1 + (self._rand(n, 1, 1, 3) * 2 - 1) * c.stain_scale).to(device)
        shift = ((self._rand(n, 1, 1, 3) * 2 - 1) * c.stain_shift).to(device)
        x = torch.exp(-((hed * scale + shift) @ rgb_from_hed).permute(0, 3, 1, 2)).clamp(0, 1)
        # optics: defocus and lower resolution
        sigma = float(self._rand(1)) * c.blur_sigma + 0.3
        radius = max(1, int(round(2.5 * sigma)))
        taps = torch.exp(-(torch.arange(-radius, radius + 1, device=device).float() ** 2) / (2 * sigma ** 2))
        taps = taps / taps.sum()
        padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        blurred = F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3),
                           taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        x = torch.where(self._chosen(n, c.blur, device), blurred, x)
        factor = 1.5 + float(self._rand(1)) * 1.5
        small = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
        coarse = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        x = torch.where(self._chosen(n, c.low_resolution, device), coarse, x)
        # lamp and exposure: a tint, a gamma, a dim exposure
        x = x * (1 - self._rand(n, 3, 1, 1) * c.tint).to(device)
        gamma = (self._rand(n, 1, 1, 1) * (c.gamma[1] - c.gamma[0]) + c.gamma[0]).to(device)
        x = x.clamp_min(1e-4) ** gamma
        exposure = torch.where(self._rand(n, 1, 1, 1) < c.dim, 0.15 + self._rand(n, 1, 1, 1) * 0.85,
                               torch.ones(n, 1, 1, 1)).to(device)
        # the sensor: noise and 8-bit levels at that exposure
        noise = torch.randn(x.shape, generator=self.generator).to(device) * (self._rand(n, 1, 1, 1) * c.noise).to(device)
        x = ((x * exposure + noise).clamp(0, 1) * 255).round() / 255
        return _jpeg(x, self._rand(n) < c.jpeg, (30 + self._rand(n) * 60).round().int().tolist())


def _jpeg(x: torch.Tensor, chosen: torch.Tensor, qualities: list[int]) -> torch.Tensor:
    """The chosen images saved as JPEG at their quality and read back (its 8×8 blocks and colour subsampling)."""
    import io

    if not chosen.any():
        return x
    x = x.clone()
    for index in chosen.nonzero().flatten().tolist():
        array = (x[index].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=qualities[index])
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
        x[index] = torch.from_numpy(decoded).permute(2, 0, 1).to(x.device)
    return x
