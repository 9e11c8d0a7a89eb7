"""Turning decoded cell images into model input, the same way for training, inference and explanation."""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .sources import BadImage, Limits, decode_checked, read_header
from .standardise import ScaleReference, as_rgb, estimate_scale, measure, to_reference, white_balance
from .weights import ModelCard

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_uint8(image: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Image (any mode: greyscale, 16-bit, alpha) → uint8 RGB tensor (3, size, size); the field squeezed to a square."""
    image = as_rgb(image).resize((size, size), RESAMPLE.get(interpolation, Image.Resampling.BILINEAR))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(batch_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device → float normalised with the model's mean and std."""
    mean_t = torch.tensor(mean, device=batch_uint8.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch_uint8.device).view(1, 3, 1, 1)
    return (batch_uint8.float() / 255.0 - mean_t) / std_t


def model_input(batch_uint8: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """uint8 (N, 3, H, W) → what the card's network takes: white balanced to its training background when the
    card says so (`colour`), then normalised with its mean and std."""
    if not card.colour:
        return normalize(batch_uint8, card.mean, card.std)
    x, _ = white_balance(batch_uint8.float() / 255.0, card.colour["reference"], card.colour.get("quantile", 0.9))
    mean_t = torch.tensor(card.mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(card.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def one_cell_input(image: Image.Image, card: ModelCard) -> tuple[torch.Tensor, dict]:
    """One image on its own → uint8 (3, S, S) at the card's scale (estimated on this image alone) and the estimate."""
    rgb, reference = as_rgb(image), ScaleReference.from_card(card.scale)
    if reference is None:
        return resize_uint8(rgb, card.input_size, card.interpolation), {}
    estimate = estimate_scale([measure(rgb)], reference)
    return resize_uint8(to_reference(rgb, reference, estimate), card.input_size, card.interpolation), estimate.as_dict()


def batch_for(images: list[Image.Image], card: ModelCard) -> torch.Tensor:
    """Decoded images → one float batch at the card's input size, as its network takes it (no scale step)."""
    stacked = torch.stack([resize_uint8(image, card.input_size, card.interpolation) for image in images])
    return model_input(stacked, card)


def decode_resized_batch(datas: Sequence[bytes], size: int, interpolation: str = "bilinear",
                         device: str | torch.device = "cpu", max_pixels: int = Limits.max_pixels,
                         ) -> list[tuple[torch.Tensor, str, int, int] | BadImage]:
    """Image bytes → uint8 (3, size, size) tensors on `device`, JPEGs decoded together there.

    On a GPU torchvision hands the JPEGs to nvJPEG in one batch and they are resized on the GPU, so the
    CPU only reads headers. Every file's header is checked first (format, pixel limit) as on the CPU path;
    a JPEG without its end marker (truncated), other formats, and a batch the decoder rejects go through
    decode_checked one by one, so each image gets the same checks and the same reasons. Per file: the
    tensor with (format, width, height), or the BadImage that says why it was skipped.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    results: list = [None] * len(datas)
    batch: list[int] = []
    for i, data in enumerate(datas):
        try:
            image, fmt, width, height = read_header(data, max_pixels)
        except BadImage as error:
            results[i] = error
            continue
        if fmt == "JPEG" and image.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(b"\xff\xd9"):
            batch.append(i)
            results[i] = (None, fmt, width, height)
        else:
            results[i] = decode_one(data, max_pixels, (size, interpolation), device=device)
    decoded = []
    if batch:
        try:
            decoded = decode_jpeg([torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in batch],
                                  mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one damaged file fails the whole batch: each file on its own, with its reason
            for i in batch:
                results[i] = decode_one(datas[i], max_pixels, (size, interpolation), device=device)
            batch = []
    by_shape: dict[tuple, list[int]] = {}
    for position, i in enumerate(batch):
        by_shape.setdefault(tuple(decoded[position].shape), []).append(position)
    for positions in by_shape.values():  # one resize per image size (a dataset's cells usually share one)
        stacked = torch.stack([decoded[p] for p in positions]).float()
        resized = F.interpolate(stacked, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        for tensor, p in zip(resized, positions, strict=True):
            i = batch[p]
            results[i] = (tensor, *results[i][1:])
    return results


def decode_one(data: bytes, max_pixels: int = Limits.max_pixels, resize_to: tuple[int, str] | None = None,
               draft_size: int = 0, device: str | torch.device = "cpu") -> tuple | BadImage:
    """One image, checked and decoded on the CPU: (RGB image, or with `resize_to` = (size, interpolation) a
    uint8 (3, size, size) tensor on `device`; format, width, height), or the BadImage that says why not."""
    try:
        image, fmt, width, height = decode_checked(data, max_pixels, draft_size)
    except BadImage as error:
        return error
    if resize_to is None:
        return image, fmt, width, height
    return resize_uint8(image, *resize_to).to(device), fmt, width, height
