"""Taking the lab out of the picture: scale from the red cells, colour from the slide's background.

Every blood film carries a ruler and a white reference. Red cells are about 7.5 µm across, whatever the
microscope and camera; the bright background between the cells is the light source seen through the
slide, whatever the lamp, filter and exposure. A model set records the scale and background of the
cells it was trained on (its card's `scale` and `colour`); every image it sees later, in training and in
use alike, is resampled to that scale (a window of the same size in µm, centred on the cell) and white
balanced to that background, so that the network sees every lab's cells as it saw its own.

Scale is measured over the images taken the same way (a run, a dataset): the red cells, or on tight
single-cell crops whose red cells the edges cut, the white cells against the training cells' (see
`estimate_scale`); else a stated pixel size (µm per pixel, or the field a crop was cut from); else
"unknown" (the image is used as it is, squeezed to the input size, and flagged).

Plain numpy/scipy/torch, no Django.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

RBC_DIAMETER_UM = 7.5
ANALYSIS_SIDE = 160  # images are measured at most this many pixels across (fast, and enough for red cells)
ABSURD = (0.3, 3.0)  # an estimate further than this from the training scale is not believed
CLOSE = 0.15  # within this of the training scale an image is used as it is (the scale augmentation covers more)
FEW = 10  # fewer images than this: one white cell is no ruler (a lymphocyte is half a monocyte)
SCALE_SOURCES = ("red cells", "stated", "white cell", "unknown")


@dataclass
class ScaleEstimate:
    """An image's scale and where it came from."""

    px_per_um: float | None  # None: unknown
    source: str  # one of SCALE_SOURCES
    red_cells: int = 0  # red cells measured
    ratio: float | None = None  # px_per_um against the training scale (1.0: the training scale)
    applied: float = 1.0  # the resampling factor used (1.0 where the scale was unknown or not believed)
    flag: str = ""  # why the estimate was not used, when it was not

    def as_dict(self) -> dict:
        data = asdict(self)
        for key in ("px_per_um", "ratio", "applied"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


@dataclass(frozen=True)
class ScaleReference:
    """The scale a model set was trained at: the training images' pixels per µm and their field (px)."""

    px_per_um: float
    field_px: int  # side of the window the network sees, in training-image pixels
    white_cell_um: float = 0.0  # the training cells' median white-cell diameter (the last fallback)

    @property
    def field_um(self) -> float:
        return self.field_px / self.px_per_um

    @classmethod
    def from_card(cls, data: dict | None) -> "ScaleReference | None":
        if not data or not data.get("px_per_um"):
            return None
        return cls(float(data["px_per_um"]), int(data["field_px"]), float(data.get("white_cell_um") or 0.0))

    def as_card(self) -> dict:
        return {"px_per_um": round(self.px_per_um, 4), "field_px": self.field_px,
                "field_um": round(self.field_um, 2), "white_cell_um": round(self.white_cell_um, 2),
                "method": f"red cells ({RBC_DIAMETER_UM} µm), then stated pixel size, then the white cell"}


# --- reading an image ---------------------------------------------------------------------------


def as_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: greyscale and 16-bit scaled to 8 bits, alpha laid on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) or 1.0
        image = Image.fromarray((array * (255.0 / (65535.0 if top > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / (float(array.max()) or 1.0) * 255).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _small(image: Image.Image) -> tuple[np.ndarray, float]:
    """The image at most ANALYSIS_SIDE across as float RGB in [0, 1], and the factor it was shrunk by."""
    factor = min(1.0, ANALYSIS_SIDE / max(image.size))
    if factor < 1.0:
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                             Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0, factor


def background_of(rgb: np.ndarray, quantile: float = 0.9) -> np.ndarray:
    """The slide's background colour: the mean of the brightest pixels (above the luminance quantile)."""
    lum = rgb.mean(axis=2)
    sample = lum.ravel()[::7]  # a quantile of every 7th pixel: the same background, a fraction of the sort
    bright = lum >= np.partition(sample, int(quantile * (len(sample) - 1)))[int(quantile * (len(sample) - 1))]
    return rgb[bright].mean(axis=0).clip(1 / 255, 1.0)


def measure(image: Image.Image) -> dict:
    """Red-cell diameter (px, median over the red cells seen), their number, and the central white cell's diameter.

    The image is white balanced on its background; a pixel belongs to a cell where it absorbs green
    (red cells and nuclei both do), to a nucleus where it also absorbs red. Each cell region's holes are
    filled (a red cell's pale centre), and its largest inscribed circle gives its radius (touching red
    cells still give one red cell's radius). Regions with nucleus pixels are white cells or platelets.
    """
    from scipy import ndimage

    rgb, factor = _small(image)
    rgb = ndimage.uniform_filter(rgb, size=(3, 3, 1))  # a dim, noisy camera's grain
    transmission = (rgb / background_of(rgb)).clip(0, 1)
    absorbs_green = 1.0 - transmission[..., 1]
    threshold = max(0.12, _otsu(absorbs_green))
    cells = ndimage.binary_opening(absorbs_green > threshold, iterations=1)
    nucleus = (1.0 - transmission[..., 0] > max(0.35, threshold + 0.15)) & cells
    cells = ndimage.binary_fill_holes(cells)
    labels, count = ndimage.label(cells)
    result = {"red_cell_px": None, "red_cells": 0, "white_cell_px": None, "factor": factor}
    if not count:
        return result
    index = np.arange(1, count + 1)
    distance = ndimage.distance_transform_edt(cells)
    area = np.asarray(ndimage.sum(cells, labels, index))
    nuclear = np.asarray(ndimage.sum(nucleus, labels, index)) / np.maximum(area, 1)
    # the centres of the red cells: local maxima of the distance to the background, in regions without a
    # nucleus; their depth is a red cell's radius, also where red cells touch or overlap or the edge cuts one
    red_region = np.concatenate([[False], nuclear < 0.05])[labels]
    peaks = (distance == ndimage.maximum_filter(distance, size=5)) & (distance >= 2) & red_region
    depth = distance[peaks]
    if len(depth):
        # platelets, fragments and noise give many shallow peaks: the red cells are the deep ones
        depth = depth[depth >= 0.5 * np.percentile(depth, 90)]
        radius = float(np.median(depth))
        result["red_cell_px"] = (2 * radius + 1) / factor  # the inscribed radius runs about a pixel short
        result["red_cells"] = int(ndimage.label(peaks & (distance >= 0.7 * radius))[1])
    h, w = cells.shape
    central = labels[h // 2, w // 2]
    if central and nuclear[central - 1] >= 0.05:
        result["white_cell_px"] = float(2 * np.sqrt(area[central - 1] / np.pi)) / factor
    return result


def _otsu(values: np.ndarray) -> float:
    histogram, edges = np.histogram(values, bins=64, range=(0.0, 1.0))
    weights = histogram.astype(np.float64) / max(1, histogram.sum())
    centres = (edges[:-1] + edges[1:]) / 2
    omega, mu = np.cumsum(weights), np.cumsum(weights * centres)
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(centres[int(np.argmax(between))])


def estimate_scale(found: list[dict], reference: ScaleReference | None = None,
                   stated_um_per_px: float | None = None) -> ScaleEstimate:
    """One scale for images taken the same way (a run, a dataset, or one image), from their `measure` results.

    Two rulers: the red cells (7.5 µm; the median over the images where at least two were measured, if a
    third of the images have them) and, on single-cell crops, the central white cell (the median diameter
    against the training cells' median: a mix of types evens out over a run, one cell alone is good to about
    ±30 %, so it needs FEW images at least). The red cells decide when the white cells agree within 25 % or there are none (fields); where they
    disagree, the red cells are cut by a tight crop's edges and the white cells decide. Then a stated pixel size,
    else unknown. An estimate further than ABSURD from the training scale is not believed.
    """
    red = [f["red_cell_px"] for f in found if f.get("red_cell_px") and f.get("red_cells", 0) >= 2]
    white = [f["white_cell_px"] for f in found if f.get("white_cell_px")]
    counted = int(sum(f.get("red_cells", 0) for f in found))
    by_red = float(np.median(red)) / RBC_DIAMETER_UM if red and len(red) >= len(found) / 3 else None
    by_white = (float(np.median(white)) / reference.white_cell_um if white and reference and
                reference.white_cell_um and len(found) >= FEW and len(white) >= len(found) / 2 else None)
    if by_red and (by_white is None or 0.8 <= by_red / by_white <= 1.25):
        estimate = ScaleEstimate(by_red, "red cells", counted)
    elif by_white:
        estimate = ScaleEstimate(by_white, "white cell", counted)
    elif stated_um_per_px:
        estimate = ScaleEstimate(1.0 / stated_um_per_px, "stated", counted)
    else:
        return ScaleEstimate(None, "unknown", counted, flag="scale unknown: no red cells and no stated pixel size; "
                                                            "classified at the default scale")
    if reference:
        estimate.ratio = estimate.px_per_um / reference.px_per_um
        if not ABSURD[0] <= estimate.ratio <= ABSURD[1]:
            estimate.flag = (f"scale not believed: {estimate.ratio:.2f}× the training scale ({estimate.source}); "
                             "classified at the default scale")
        elif abs(estimate.ratio - 1) > CLOSE:
            estimate.applied = 1.0 / estimate.ratio
    return estimate


def to_reference(image: Image.Image, reference: ScaleReference | None, estimate: ScaleEstimate) -> Image.Image:
    """The image's central window of the training field's size in µm (padded with its background where the image
    is smaller). Without a believed estimate, the whole image, as before."""
    if reference is None or estimate.flag or estimate.px_per_um is None or estimate.applied == 1.0:
        return image
    side = max(8, round(reference.field_px / estimate.applied))
    return centred_window(image, side)


def centred_window(image: Image.Image, side: int, centre: tuple[float, float] | None = None) -> Image.Image:
    """A side × side window centred on the image (or on `centre`); beyond its edges, the image's background colour."""
    rgb, _ = _small(image)
    fill = tuple(int(round(v * 255)) for v in background_of(rgb))
    window = Image.new("RGB", (side, side), fill)
    cx, cy = centre or (image.width / 2, image.height / 2)
    left, top = round(cx - side / 2), round(cy - side / 2)
    window.paste(image.crop((max(0, left), max(0, top), min(image.width, left + side),
                             min(image.height, top + side))), (max(0, -left), max(0, -top)))
    return window


def reference_from(images: list[Image.Image], field_px: int | None = None) -> ScaleReference:
    """A training set's scale: the median red-cell and white-cell diameters of its images."""
    found = [measure(as_rgb(image)) for image in images]
    red = [f["red_cell_px"] for f in found if f["red_cell_px"] and f["red_cells"] >= 2]
    white = [f["white_cell_px"] for f in found if f["white_cell_px"]]
    if not red:
        raise ValueError("No red cells were found on the training images: their scale cannot be measured.")
    px_per_um = float(np.median(red)) / RBC_DIAMETER_UM
    white_um = float(np.median(white)) / px_per_um if white else 0.0
    return ScaleReference(px_per_um, int(field_px or np.median([max(image.size) for image in images])), white_um)


# --- colour ---------------------------------------------------------------------------------------


def backgrounds(x: torch.Tensor, quantile: float = 0.9) -> torch.Tensor:
    """Each image's background colour (N, 3) from a float (N, 3, H, W) batch: the mean of its brightest pixels."""
    lum = x.mean(dim=1).flatten(1)
    cut = torch.quantile(lum[:, ::7], quantile, dim=1, keepdim=True)  # every 7th pixel: the same cut, faster
    bright = (lum >= cut).to(x.dtype)
    return ((x.flatten(2) * bright[:, None]).sum(dim=2) / bright.sum(dim=1, keepdim=True).clamp_min(1)).clamp_min(1 / 255)


def white_balance(x: torch.Tensor, reference: list[float] | torch.Tensor, quantile: float = 0.9,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (N, 3, H, W) in [0, 1] → each image's background moved to `reference` (RGB in [0, 1]), and the
    backgrounds found (N, 3). A per-channel gain: a dim exposure, a tinted lamp or a yellow slide cancel out."""
    background = backgrounds(x, quantile)
    target = torch.as_tensor(reference, dtype=x.dtype, device=x.device).view(1, 3)
    return (x * (target / background).view(*background.shape, 1, 1)).clamp(0, 1), background


def colour_reference(batch_uint8: torch.Tensor, quantile: float = 0.9) -> list[float]:
    """A training set's background colour: the median of its images' backgrounds."""
    _, backgrounds = white_balance(batch_uint8.float() / 255.0, [1.0, 1.0, 1.0], quantile)
    return [round(float(v), 4) for v in backgrounds.median(dim=0).values]


def colour_card(reference: list[float], quantile: float = 0.9) -> dict:
    return {"method": "background", "reference": reference, "quantile": quantile}


# --- summaries (a run, an evaluation) ---------------------------------------------------------------


def scale_summary(scales: list[dict]) -> dict:
    """What scale a group of cells was classified at: sources, the scale used against the training one, own measures."""
    if not any(scales):
        return {"measured": False}
    sources: dict[str, int] = {}
    for scale in scales:
        sources[scale.get("source", "unknown")] = sources.get(scale.get("source", "unknown"), 0) + 1
    used = [s["px_per_um"] for s in scales if s.get("px_per_um")]
    ratios = [s["ratio"] for s in scales if s.get("ratio")]
    own = [s["own_px_per_um"] for s in scales if s.get("own_px_per_um")]
    return {
        "measured": True,
        "sources": sources,
        "px_per_um": round(float(np.median(used)), 3) if used else None,
        "ratio": round(float(np.median(ratios)), 3) if ratios else None,
        "resampled": sum(1 for s in scales if s.get("applied", 1.0) != 1.0),
        "flagged": sum(1 for s in scales if s.get("flag")),
        "own_px_per_um_median": round(float(np.median(own)), 3) if own else None,
        "own_measured": len(own),
    }


def colour_summary(background: list[list[float]], reference: list[float] | None = None) -> dict:
    """The cells' slide background (RGB 0-255, before balancing): median, spread, and against the training one."""
    if not background:
        return {}
    values = np.asarray(background, dtype=np.float64)
    median = np.median(values, axis=0)
    result = {"background_median": [round(float(v), 1) for v in median],
              "background_iqr": [round(float(v), 1) for v in np.subtract(*np.percentile(values, [75, 25], axis=0))]}
    if reference:
        target = np.asarray(reference, dtype=np.float64) * 255
        result["training_background"] = [round(float(v), 1) for v in target]
        result["gain"] = [round(float(v), 3) for v in target / np.maximum(median, 1)]
    return result
