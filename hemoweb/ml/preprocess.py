"""Turning decoded cell images into model input, the same way for training, inference and explanation."""

import numpy as np
import torch
from PIL import Image

from .weights import ModelCard

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_uint8(image: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """RGB image → uint8 tensor (3, size, size); the whole field is squeezed to a square."""
    image = image.convert("RGB").resize((size, size), RESAMPLE.get(interpolation, Image.Resampling.BILINEAR))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(batch_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device → float normalised with the model's mean and std."""
    mean_t = torch.tensor(mean, device=batch_uint8.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch_uint8.device).view(1, 3, 1, 1)
    return (batch_uint8.float() / 255.0 - mean_t) / std_t


def batch_for(images: list[Image.Image], card: ModelCard) -> torch.Tensor:
    """Decoded images → one normalised float batch at the card's input size."""
    stacked = torch.stack([resize_uint8(image, card.input_size, card.interpolation) for image in images])
    return normalize(stacked, card.mean, card.std)
