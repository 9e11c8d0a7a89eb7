"""How faithful an attribution map is to the network: deletion and insertion curves. Plain Python, no Django.

Deletion paints over the most-attributed pixels first (10 %, 20 %, … of them) with a reference image and
follows the class probability: if the map found what the network needed, the probability falls at once
and the area under the curve is small. Insertion starts from the reference and puts back the same pixels
in the same order: the probability should climb at once, the area be large. The reference is the same
for every method (the slide's background colour by default), so the figures of Grad-CAM, Integrated
Gradients and Occlusion on one cell compare directly.

Pixels go in small squares (PATCHES × PATCHES of them over the image, ranked by their mean attribution), not
one by one: thousands of scattered single pixels painted over make an image unlike any slide, and the
network's probability collapses whatever the order, so a random order would look as good as any map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STEPS = 10  # 0 %, 10 %, … 100 % of the pixels: 20 images through the network in all
PATCHES = 28  # squares per side (8 px at 224 px, Grad-CAM's 7 × 7 cells split in 4 × 4)


@dataclass
class Curves:
    """Class probability after removing (deletion) or revealing (insertion) each fraction of the pixels."""

    fractions: list[float]
    deletion: list[float]
    insertion: list[float]

    @property
    def deletion_auc(self) -> float:
        return area(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        return area(self.fractions, self.insertion)

    def as_dict(self) -> dict:
        return {"fractions": [round(f, 3) for f in self.fractions],
                "deletion": [round(p, 4) for p in self.deletion], "insertion": [round(p, 4) for p in self.insertion],
                "deletion_auc": round(self.deletion_auc, 4), "insertion_auc": round(self.insertion_auc, 4)}


def area(fractions: list[float], values: list[float]) -> float:
    """Area under a curve over [0, 1] by the trapezoid rule (in [0, 1] for probabilities)."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())


def patch_means(values: np.ndarray, patch: int) -> np.ndarray:
    """The mean of `values` (H, W) over each patch × patch square (the last row and column of squares may be smaller)."""
    h, w = values.shape
    rows, cols = -(-h // patch), -(-w // patch)
    padded = np.full((rows * patch, cols * patch), np.nan)
    padded[:h, :w] = values
    return np.nanmean(padded.reshape(rows, patch, cols, patch), axis=(1, 3))


def masks(values: np.ndarray, steps: int = STEPS, patches: int = PATCHES) -> torch.Tensor:
    """(steps + 1, 1, H, W) float masks: mask k covers the top k/steps of the squares by mean attribution.

    Ties keep reading order."""
    h, w = values.shape
    patch = max(1, -(-max(h, w) // patches))
    means = patch_means(np.asarray(values, dtype=np.float64), patch)
    order = np.argsort(-means.ravel(), kind="stable")
    rank = np.empty(means.size, dtype=np.int64)
    rank[order] = np.arange(means.size)
    counts = np.round(np.linspace(0, means.size, steps + 1)).astype(np.int64)
    covered = (rank[None, :] < counts[:, None]).reshape(steps + 1, *means.shape)
    pixels = covered.repeat(patch, axis=1).repeat(patch, axis=2)[:, :h, :w]
    return torch.from_numpy(np.ascontiguousarray(pixels[:, None]).astype(np.float32))


def deletion_insertion(forward, inputs: torch.Tensor, reference: torch.Tensor, values: np.ndarray, target: int,
                       steps: int = STEPS, batch: int = 16) -> Curves:
    """Deletion and insertion curves of `values` (an (H, W) map at the input's size) for output `target`.

    `forward` maps a (N, 3, H, W) batch to logits; `inputs` is the (1, 3, H, W) image and `reference` what a
    removed pixel becomes (same shape), both as the network takes them (normalised).
    """
    if tuple(values.shape) != tuple(inputs.shape[-2:]):
        raise ValueError(f"The attribution map is {tuple(values.shape)}; the input is {tuple(inputs.shape[-2:])}.")
    kept = masks(values, steps).to(inputs.device, inputs.dtype)
    deleted = inputs * (1 - kept) + reference * kept  # step 0: the image, step `steps`: the reference
    inserted = reference * (1 - kept[1:-1]) + inputs * kept[1:-1]  # its two ends are deletion's two ends
    images = torch.cat([deleted, inserted])
    with torch.no_grad():
        probabilities = torch.cat([torch.softmax(forward(images[start:start + batch]).float(), dim=1)[:, target]
                                   for start in range(0, len(images), batch)]).cpu().tolist()
    deletion = probabilities[:steps + 1]
    insertion = [deletion[-1], *probabilities[steps + 1:], deletion[0]]
    return Curves(fractions=[k / steps for k in range(steps + 1)], deletion=deletion, insertion=insertion)


def passes(steps: int = STEPS) -> int:
    """Images the curves send through the network."""
    return 2 * steps
