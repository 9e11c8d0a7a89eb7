"""Why the network decided: Captum attributions for one cell image, and the pictures that show them.

Three methods: Integrated Gradients (all steps batched), Occlusion (a patch slid over the cell, many patches
per forward pass) and Grad-CAM on the last spatial feature map (one forward and one backward pass). Plain
Python, no Django.

Integrated Gradients' baseline and Occlusion's patch are by default the image's own background colour (the
brightest pixels' mean, as white balance measures it: standardise.backgrounds). A black baseline on a light
slide made the background itself look like evidence (it is the part of the image furthest from black); from
the background colour, the slide contributes nothing and the evidence lies on the cell. A blurred copy, black
and the normalisation mean remain as options for comparison. Every explanation also gets deletion and insertion
curves (faithfulness.py) against the same background-coloured reference, so the methods can be compared on a cell.

The defaults are chosen to run within about a second on the project's 2-core CPU for the shipped 224 px set
when it is not busy (benchmarks/explain_fast.py): IG with 8 steps (the same picture as 50: Spearman 0.99),
Occlusion with a window of a quarter of the input and no overlap (17 passes).

Speed on CPU comes from batching (Captum's Occlusion default runs one perturbation per forward pass,
which is where "minutes per image" came from) with batches sized to the input (see default_batch),
and from `torch.no_grad()` wherever no gradient is needed (the prediction, Occlusion).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import faithfulness
from .preprocess import model_input, one_cell_input
from .standardise import backgrounds
from .weights import ModelCard

METHODS = {"ig": "Integrated Gradients", "occlusion": "Occlusion", "gradcam": "Grad-CAM"}
BASELINES = ("background", "blurred", "black", "mean")  # the first is the default
IG_STEPS = 8
OCCLUSION_WINDOW_SHARE = 4  # default window: the input's side / 4, stride = window (4 × 4 patches)
LIMITS = {"n_steps": (2, 1000), "internal_batch_size": (1, 1024), "window": (2, 1024), "stride": (1, 1024),
          "perturbations_per_eval": (1, 1024)}
MAX_FORWARD_PASSES = 200_000  # beyond this a request is refused whatever the hardware
CENTRAL_FRACTION = 0.5  # the central square, half the side (a quarter of the area), where the cell usually sits

Progress = Callable[[float], None]


class ExplainError(ValueError):
    """The explanation cannot be made as asked: a message a lab user understands."""


# --------------------------------------------------------------------------------------------- settings


def resolve_settings(method: str, input_size: int, **settings) -> dict:
    """Validated settings for `method` with every default filled in (also the cache key's settings).

    Unknown names and settings of other methods are dropped; out-of-range values raise ExplainError.
    """
    if method not in METHODS:
        raise ExplainError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    values = {key: value for key, value in settings.items() if value not in (None, "")}
    for key, (low, high) in LIMITS.items():
        if key in values:
            try:
                values[key] = int(values[key])
            except (TypeError, ValueError) as error:
                raise ExplainError(f"{key} must be a whole number, not {values[key]!r}.") from error
            if not low <= values[key] <= high:
                raise ExplainError(f"{key} must be between {low} and {high}; {values[key]} was given.")
    baseline = str(values.get("baseline", BASELINES[0]))
    if method in ("ig", "occlusion") and baseline not in BASELINES:
        raise ExplainError(f"Unknown baseline {baseline!r}: choose one of {', '.join(BASELINES)}.")
    if method == "ig":
        n_steps = values.get("n_steps", IG_STEPS)
        batch = values.get("internal_batch_size", default_batch(input_size))
        return {"baseline": baseline, "n_steps": n_steps, "internal_batch_size": min(batch, n_steps)}
    if method == "occlusion":
        window = values.get("window", max(2, input_size // OCCLUSION_WINDOW_SHARE))
        if window > input_size:
            raise ExplainError(
                f"The occlusion window ({window} px) is larger than the model's input ({input_size} px).")
        stride = values.get("stride", window)
        return {"baseline": baseline, "window": window, "stride": stride,
                "perturbations_per_eval": values.get("perturbations_per_eval", default_batch(input_size))}
    return {}


def default_batch(input_size: int) -> int:
    """Images per forward pass: about 32 at 128 px, 10 at 224 px (same pixels per batch).

    Measured on the CPU here: at 224 px batches of 8–16 run IG and Occlusion 1.5–2× faster than 50–64
    (the activations stay in cache); at 128 px the batch size hardly matters. Results do not depend
    on it (tests compare batched with one-at-a-time).
    """
    return max(4, min(1024, int(32 * (128 / max(input_size, 1)) ** 2)))


def forward_passes(method: str, settings: dict, input_size: int) -> int:
    """Images the method sends through the model (after the prediction itself)."""
    if method == "ig":
        return settings["n_steps"]
    if method == "occlusion":
        per_side = math.floor((input_size - settings["window"]) / settings["stride"]) + 1
        return 1 + per_side * per_side  # Captum evaluates the unoccluded image once more
    return 1


def backward_passes(method: str, settings: dict) -> int:
    return {"ig": settings.get("n_steps", 0), "gradcam": 1}.get(method, 0)


@dataclass
class CostEstimate:
    passes: int
    seconds: float  # expected on this machine (model_seconds measured, or a guess)

    def as_dict(self) -> dict:
        return {"passes": self.passes, "seconds": round(self.seconds, 3)}


_model_seconds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_model_seconds_lock = threading.Lock()


def model_seconds_per_image(model: torch.nn.Module, input_size: int, batch: int = 8) -> float:
    """Seconds one forward pass of one image takes here, measured once per model and size (batched)."""
    with _model_seconds_lock:
        known = _model_seconds.get(model, {})
        if input_size in known:
            return known[input_size]
    device = next(model.parameters()).device
    dummy = torch.zeros(batch, 3, input_size, input_size, device=device)
    with torch.no_grad():
        model(dummy[:1])  # warm-up (allocators, kernels)
        start = time.perf_counter()
        model(dummy)
        seconds = (time.perf_counter() - start) / batch
    with _model_seconds_lock:
        _model_seconds.setdefault(model, {})[input_size] = seconds
    return seconds


def estimate_cost(method: str, settings: dict, input_size: int, model_seconds: float) -> CostEstimate:
    """Forward passes × the measured cost of one pass at this input size (batched)."""
    passes = 1 + forward_passes(method, settings, input_size) + faithfulness.passes()  # the curves beside the picture
    # A backward pass costs about two forward passes; Captum's bookkeeping and the pictures a little.
    work = passes + 2 * backward_passes(method, settings)
    overhead = 0.02 if method == "gradcam" else 0.05
    return CostEstimate(passes=passes, seconds=work * model_seconds + overhead)


# --------------------------------------------------------------------------------------------- inputs


def prepare(image: Image.Image | torch.Tensor, card: ModelCard | None) -> tuple[torch.Tensor, Image.Image | None]:
    """A PIL image (any size or mode) or a tensor → normalised (1, 3, S, S) input, plus the RGB image."""
    if isinstance(image, Image.Image):
        if card is None:
            raise ExplainError("A model card (input size, mean, std) is needed to explain a PIL image.")
        cell, _ = one_cell_input(image, card)
        return model_input(cell.unsqueeze(0), card), Image.fromarray(cell.permute(1, 2, 0).numpy())
    if not isinstance(image, torch.Tensor):
        raise ExplainError(f"Cannot explain a {type(image).__name__}: give a PIL image or a tensor.")
    tensor = image.float()
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[0] != 1 or tensor.shape[1] != 3:
        raise ExplainError(f"Expected one RGB image tensor (1, 3, H, W); got shape {tuple(image.shape)}.")
    return tensor, None


def resolve_target(target: int | str | None, predicted: int, classes: list[str] | None, node: str = "") -> int:
    """None → the predicted class; a class code or an output index → that output (checked)."""
    if target is None or target == "":
        return predicted
    n_classes = len(classes) if classes else None
    where = f"the {node} classifier" if node else "this classifier"
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if not classes or target not in classes:
            listed = ", ".join(classes or [])
            raise ExplainError(f"Class {target!r} is not an output of {where}; its classes are: {listed}.")
        return classes.index(target)
    index = int(target)
    if n_classes is not None and not 0 <= index < n_classes:
        raise ExplainError(f"Output {index} does not exist: {where} has {n_classes} classes.")
    return index


# --------------------------------------------------------------------------------------------- layers


_gradcam_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_gradcam_lock = threading.Lock()


def gradcam_layer(model: torch.nn.Module, input_size: int = 64) -> torch.nn.Module:
    """The module that produces the last feature map with a spatial extent (> 1×1) in a forward pass.

    Works for any timm CNN (and plain ones): found by running the model once with hooks, so a 1×1
    conv head after global pooling (MobileNetV3) is skipped and the last stage or block is chosen.
    """
    with _gradcam_lock:  # hooks on a model that other threads may be running
        by_size = _gradcam_layers.setdefault(model, {})
        if input_size not in by_size:
            by_size[input_size] = _find_gradcam_layer(model, input_size)
        return by_size[input_size]


def _find_gradcam_layer(model: torch.nn.Module, input_size: int) -> torch.nn.Module:
    order: list[torch.nn.Module] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            order.append(module)

    handles = [module.register_forward_hook(hook) for module in model.modules() if module is not model]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ExplainError("Grad-CAM needs a convolutional feature map; this model has none.")
    return order[-1]


class CountingForward:
    """model as Captum's forward function, reporting how many of the planned passes are done."""

    def __init__(self, model: torch.nn.Module, planned: int, progress: Progress | None):
        self.model, self.planned, self.progress, self.done = model, max(1, planned), progress, 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(inputs)
        self.done += inputs.shape[0]
        if self.progress:
            self.progress(min(0.99, self.done / self.planned))
        return output


# --------------------------------------------------------------------------------------------- explain


@dataclass
class Attribution:
    """One explanation: the (H, W) attribution map at the model's input size and what it explains."""

    method: str
    settings: dict
    target: int
    target_code: str
    probabilities: list[float]
    classes: list[str]
    map: np.ndarray = field(repr=False)  # signed, float32, (input_size, input_size)
    seconds: float = 0.0
    passes: int = 0
    faithfulness: dict = field(default_factory=dict)  # deletion and insertion curves (faithfulness.Curves.as_dict)
    faithfulness_seconds: float = 0.0

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    def summary(self) -> dict:
        """Numbers beside the pictures: where the positive evidence lies and how strong it is."""
        values = self.map.astype(np.float64)
        positive = np.clip(values, 0, None)
        total = positive.sum()
        h, w = values.shape
        margin_y, margin_x = int(h * (1 - CENTRAL_FRACTION) / 2), int(w * (1 - CENTRAL_FRACTION) / 2)
        central = positive[margin_y:h - margin_y, margin_x:w - margin_x].sum()
        return {
            "method": self.method,
            "settings": self.settings,
            "target": self.target_code,
            "target_index": self.target,
            "target_probability": round(float(self.probabilities[self.target]), 5),
            "predicted": self.classes[self.predicted] if self.classes else str(self.predicted),
            "predicted_probability": round(float(self.probabilities[self.predicted]), 5),
            "probabilities": {
                (self.classes[i] if self.classes else str(i)): round(float(p), 5)
                for i, p in enumerate(self.probabilities)
            },
            "central_share": round(float(central / total), 4) if total > 0 else 0.0,
            "max": float(values.max()),
            "min": float(values.min()),
            "mean": float(values.mean()),
            "mean_abs": float(np.abs(values).mean()),
            "positive_sum": float(total),
            "negative_sum": float(np.clip(values, None, 0).sum()),
            "size": [h, w],
            "seconds": round(self.seconds, 4),
            "forward_passes": self.passes,
            "faithfulness": self.faithfulness,
            "faithfulness_seconds": round(self.faithfulness_seconds, 4),
            "faithfulness_passes": faithfulness.passes() if self.faithfulness else 0,
        }

    def region_share(self, top: int, left: int, height: int, width: int) -> float:
        """Share of the positive attribution inside a box (model-input pixels)."""
        positive = np.clip(self.map.astype(np.float64), 0, None)
        total = positive.sum()
        return float(positive[top:top + height, left:left + width].sum() / total) if total > 0 else 0.0


def baseline_input(inputs: torch.Tensor, kind: str, card: ModelCard | None) -> torch.Tensor:
    """The (1, 3, S, S) reference an attribution starts from (IG) or paints with (Occlusion, deletion), normalised.

    background: the image's own background colour everywhere; blurred: a blurred copy; black; mean: the
    normalisation mean (zero after normalising).
    """
    if kind == "mean":
        return torch.zeros_like(inputs)
    if kind == "blurred":
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(1.0, inputs.shape[-1] / 16)
        kernel = int(2 * round(3 * sigma) + 1)
        kernel = min(kernel, (inputs.shape[-1] // 2) * 2 - 1)
        return gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])
    mean = torch.tensor(card.mean if card else [0.485, 0.456, 0.406], device=inputs.device).view(1, 3, 1, 1)
    std = torch.tensor(card.std if card else [0.229, 0.224, 0.225], device=inputs.device).view(1, 3, 1, 1)
    if kind == "black":
        return ((torch.zeros_like(inputs) - mean) / std).detach()
    if kind != "background":
        raise ExplainError(f"Unknown baseline {kind!r}: choose one of {', '.join(BASELINES)}.")
    colour = backgrounds((inputs.detach() * std + mean).clamp(0, 1))  # (1, 3) RGB in [0, 1]
    return ((colour.view(1, 3, 1, 1) - mean) / std).expand_as(inputs).contiguous()


def explain(
    model: torch.nn.Module,
    image: Image.Image | torch.Tensor,
    method: str,
    target: int | str | None = None,
    *,
    card: ModelCard | None = None,
    progress: Progress | None = None,
    curves: bool = True,
    **settings,
) -> Attribution:
    """Attribute `model`'s score for `target` (default: its prediction) to the pixels of `image`.

    `image` is a PIL image of any size or mode (resized and converted as for classification, needs
    `card`) or an already normalised (1, 3, S, S) tensor. `target` is an output index or a class code
    of the card. Settings: ig → baseline, n_steps, internal_batch_size; occlusion → window, stride,
    perturbations_per_eval; gradcam → none. With `curves`, the deletion and insertion curves of the map
    (faithfulness.py, against the background-coloured reference) are measured too.
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    start = time.perf_counter()
    model.eval()
    inputs, _ = prepare(image, card)
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    size = inputs.shape[-1]
    resolved = resolve_settings(method, size, **settings)
    classes = list(card.classes) if card else []
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs).float(), dim=1)[0].cpu()
    index = resolve_target(target, int(probabilities.argmax()), classes or None, card.node if card else "")
    if index >= probabilities.numel():
        raise ExplainError(f"Output {index} does not exist: the model has {probabilities.numel()} outputs.")
    run = dict(resolved)
    if device.type == "cuda":  # a GPU wants big batches; the small CPU defaults would starve it
        if method == "ig" and not settings.get("internal_batch_size"):
            run["internal_batch_size"] = resolved["n_steps"]
        if method == "occlusion" and not settings.get("perturbations_per_eval"):
            run["perturbations_per_eval"] = 256
    planned = forward_passes(method, resolved, size)
    forward = CountingForward(model, planned, progress)

    # Weight gradients are computed but unused; switching them off measured no faster here and would
    # change a model that other threads share.
    if method == "ig":
        baseline = baseline_input(inputs, resolved["baseline"], card)
        with torch.enable_grad():
            attributions = IntegratedGradients(forward).attribute(
                inputs, baselines=baseline, target=index, n_steps=resolved["n_steps"],
                internal_batch_size=run["internal_batch_size"],
            )
        result = attributions.sum(dim=1)[0]
    elif method == "occlusion":
        window, stride = resolved["window"], resolved["stride"]
        with torch.no_grad():
            attributions = Occlusion(forward).attribute(
                inputs, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                baselines=baseline_input(inputs, resolved["baseline"], card), target=index,
                perturbations_per_eval=run["perturbations_per_eval"],
            )
        result = attributions.sum(dim=1)[0]
    else:
        layer = gradcam_layer(model, size)
        with torch.enable_grad():
            cam = LayerGradCam(forward, layer).attribute(inputs, target=index, relu_attributions=True)
        result = LayerAttribution.interpolate(cam.detach(), (size, size), interpolate_mode="bilinear")[0, 0]
    values = result.detach().float().cpu().numpy()
    measured, curves_started = {}, time.perf_counter()
    if curves:
        reference = baseline_input(inputs, BASELINES[0], card)
        measured = faithfulness.deletion_insertion(model, inputs, reference, values, index,
                                                   batch=default_batch(size) if device.type != "cuda" else 64).as_dict()
        measured["reference"] = BASELINES[0]
    if progress:
        progress(1.0)
    return Attribution(
        method=method,
        settings=resolved,
        target=index,
        target_code=classes[index] if classes else str(index),
        probabilities=[float(p) for p in probabilities],
        classes=classes,
        map=values,
        seconds=time.perf_counter() - start,
        passes=forward.done,
        faithfulness=measured,
        faithfulness_seconds=time.perf_counter() - curves_started if curves else 0.0,
    )


# --------------------------------------------------------------------------------------------- pictures


# A perceptually ordered map from dark blue through green to yellow (viridis-like), as control points.
_CONTROL = np.array([
    [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530], [0.207, 0.372, 0.553],
    [0.164, 0.471, 0.558], [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.267, 0.749, 0.441],
    [0.478, 0.821, 0.318], [0.741, 0.873, 0.150], [0.993, 0.906, 0.144],
])


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """(256, 3) uint8 colours: matplotlib's map when installed, else a built-in viridis-like ramp."""
    try:
        from matplotlib import colormaps

        return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    except (ImportError, KeyError):
        positions = np.linspace(0, 1, len(_CONTROL))
        steps = np.linspace(0, 1, 256)
        lut = np.stack([np.interp(steps, positions, _CONTROL[:, c]) for c in range(3)], axis=1)
        return (lut * 255).round().astype(np.uint8)


def normalised_heat(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Positive attribution scaled to 0..1 by its 99.5th percentile (one hot pixel does not wash out the rest)."""
    positive = np.clip(values.astype(np.float64), 0, None)
    scale = float(np.percentile(positive, 99.5)) if positive.any() else 0.0
    if scale <= 0:
        scale = float(positive.max()) or 1.0
    return np.clip(positive / scale, 0, 1), scale


def heat_image(values: np.ndarray, size: tuple[int, int],
               lut: np.ndarray | None = None) -> tuple[Image.Image, np.ndarray]:
    """Colour heat map at `size` (width, height), and the 0..1 intensities at that size."""
    heat, _ = normalised_heat(values)
    grey = Image.fromarray((heat * 255).round().astype(np.uint8), mode="L").resize(size, Image.Resampling.BILINEAR)
    level = np.asarray(grey)
    lut = colormap_lut() if lut is None else lut
    return Image.fromarray(lut[level], mode="RGB"), level.astype(np.float32) / 255.0


def overlay_image(original: Image.Image, values: np.ndarray, strength: float = 0.75) -> Image.Image:
    """The cell with the heat map laid over it where the attribution is strong (same size as the cell)."""
    original = original.convert("RGB")
    heat, level = heat_image(values, original.size)
    alpha = (strength * np.sqrt(level))[..., None]  # sqrt: medium evidence stays visible
    blended = np.asarray(original, dtype=np.float32) * (1 - alpha) + np.asarray(heat, dtype=np.float32) * alpha
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), mode="RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow without sizes
        return ImageFont.load_default()


def side_by_side(original: Image.Image, values: np.ndarray, title: str = "", panel: int = 256) -> Image.Image:
    """Original | heat map | overlay, each `panel` px square, with a colour bar and captions."""
    original = original.convert("RGB")
    lut = colormap_lut()
    square = original.resize((panel, panel), Image.Resampling.BILINEAR)
    heat, _ = heat_image(values, (panel, panel), lut)
    over = overlay_image(square, values)
    gap, bar_w, top, bottom = 12, 18, 30 if title else 8, 26
    width = gap + 3 * (panel + gap) + bar_w + 56
    height = top + panel + bottom
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(12)
    if title:
        draw.text((gap, 7), title, fill=(31, 36, 48), font=font)
    for i, (image, caption) in enumerate(((square, "Original"), (heat, "Attribution"), (over, "Overlay"))):
        x = gap + i * (panel + gap)
        canvas.paste(image, (x, top))
        draw.text((x, top + panel + 5), caption, fill=(91, 100, 117), font=small)
    bar_x = gap + 3 * (panel + gap)
    ramp = np.repeat(lut[::-1][np.linspace(0, 255, panel).astype(int)][:, None, :], bar_w, axis=1)
    canvas.paste(Image.fromarray(ramp, mode="RGB"), (bar_x, top))
    draw.rectangle((bar_x, top, bar_x + bar_w - 1, top + panel - 1), outline=(120, 120, 120))
    draw.text((bar_x + bar_w + 4, top - 2), "high", fill=(31, 36, 48), font=small)
    draw.text((bar_x + bar_w + 4, top + panel - 14), "none", fill=(31, 36, 48), font=small)
    return canvas


def tensor_to_image(inputs: torch.Tensor, card: ModelCard | None) -> Image.Image:
    """Undo the normalisation of a (1, 3, S, S) tensor for display."""
    mean = torch.tensor(card.mean if card else [0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor(card.std if card else [0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = ((inputs[0].detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def render(attribution: Attribution, original: Image.Image, title: str = "") -> tuple[Image.Image, Image.Image]:
    """(overlay at the cell's own size, side-by-side figure)."""
    return overlay_image(original, attribution.map), side_by_side(original, attribution.map, title)


def settings_label(method: str, settings: dict) -> str:
    """Short human text for a method and its settings."""
    if not settings:
        return METHODS[method]
    return METHODS[method] + " (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items()) + ")"


__all__ = [
    "METHODS", "BASELINES", "Attribution", "baseline_input", "CostEstimate", "ExplainError", "explain", "estimate_cost",
    "forward_passes", "gradcam_layer", "model_seconds_per_image", "overlay_image", "render", "resolve_settings",
    "resolve_target", "side_by_side",
]
