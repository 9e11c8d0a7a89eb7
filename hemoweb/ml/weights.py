"""Model files: safetensors weights with a JSON card beside them, and the timm model factory.

Never a pickle: weights are safetensors, everything else is JSON. A model *set* is a folder with
`set.json` and one `<NODE>.safetensors` + `<NODE>.json` per classified tree node. A node file holds
the whole timm model, or, in a set trained with a shared backbone, only the node's linear head; its
card then names the set's `backbone.safetensors`, which every node of the set runs on.
"""

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SET_CARD = "set.json"


class ModelFileError(RuntimeError):
    """A weights file or card is missing, corrupt or does not match its architecture."""


@dataclass
class ModelCard:
    """Everything needed to rebuild, feed and judge one node classifier."""

    architecture: str
    node: str
    classes: list[str]  # tree codes in output-index order
    input_size: int
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bilinear"
    class_names: list[str] = field(default_factory=list)
    resolves_to: dict[str, str] = field(default_factory=dict)  # class code -> deeper code it implies
    threshold: float = 0.0  # below this top probability a cell stops at this node
    mode: str = "scratch"
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    split_seed: int = 0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    backbone: str = ""  # shared backbone file beside this one; empty: this file is the whole model
    colour: dict = field(default_factory=dict)  # white balance to the training background (standardise.py); {}: none
    scale: dict = field(default_factory=dict)  # the training scale (standardise.ScaleReference); {}: images as they are
    format: str = "hemoweb-node-1"

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def create_model(architecture: str, num_classes: int, pretrained_file: Path | None = None) -> torch.nn.Module:
    """A timm model built from its definition; weights only ever from a local file."""
    import timm

    if not timm.is_model(architecture):
        raise ModelFileError(f"Unknown architecture {architecture!r}: it is not a timm model name.")
    if pretrained_file is None:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    pretrained_file = Path(pretrained_file)
    if not pretrained_file.is_file():
        raise ModelFileError(f"Pretrained weights for {architecture} not found: expected the file {pretrained_file}.")
    return timm.create_model(
        architecture,
        pretrained=True,
        num_classes=num_classes,
        pretrained_cfg_overlay={"file": str(pretrained_file), "num_classes": 0},
    )


def classifier_key(model: torch.nn.Module) -> str:
    """Where a timm model keeps its classifier head (e.g. `classifier`, `fc`, `head.fc`)."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ModelFileError(f"{type(model).__name__} does not say where its classifier is.")


def card_path_for(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_model(model: torch.nn.Module, card: ModelCard, weights_path: Path) -> Path:
    """Write a model's weights (safetensors) and card (JSON) atomically; returns the weights path."""
    return save_state(model.state_dict(), card, weights_path)


def save_state(state: dict[str, torch.Tensor], card: ModelCard, weights_path: Path) -> Path:
    """Write a state dict (safetensors) and its card (JSON) atomically; returns the weights path."""
    state = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    return write_safetensors(weights_path, state, {"node": card.node, "architecture": card.architecture},
                             card=asdict(card))


def as_half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors as float16 (half the size on disk); integer ones (BatchNorm counters) as they are."""
    return {key: value.half() if value.is_floating_point() else value for key, value in tensors.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, *,
                      card: dict | None = None) -> Path:
    """Write tensors as safetensors through a temporary file, so a reader never sees half a file.

    With `card`, the JSON card beside it (same name, .json) is written before the weights appear. The
    file is made readable by all (safetensors creates it owner-only): web and worker processes of an
    installation may run as different users on a shared models volume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    if card is not None:
        write_json(card_path_for(path), card)
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file so a reader never sees half a card."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_card(weights_path: Path) -> ModelCard:
    card_path = card_path_for(weights_path)
    if not card_path.is_file():
        raise ModelFileError(f"The model card {card_path} is missing.")
    try:
        return ModelCard.from_dict(json.loads(card_path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ModelFileError(f"The model card {card_path} is not valid: {error}") from error


def read_state(weights_path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors state dict in float32 (files may store float16); clear errors for missing or damaged files."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ModelFileError(f"The weights file {weights_path} for {what} is missing.")
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ModelFileError(f"The weights file {weights_path} for {what} is corrupt: {error}") from error
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def load_model(weights_path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a node classifier (the whole timm model) from its card and safetensors weights, in eval mode."""
    weights_path = Path(weights_path)
    card = read_card(weights_path)
    state = read_state(weights_path, f"node {card.node}")
    model = create_model(card.architecture, num_classes=len(card.classes))
    if card.backbone:
        key = classifier_key(model)
        state = {**read_state(weights_path.parent / card.backbone, f"the shared backbone of node {card.node}"),
                 **{f"{key}.{name}": value for name, value in state.items()}}
    _load_into(model, state, weights_path, card.architecture)
    return model.to(device).eval(), card


def _load_into(model: torch.nn.Module, state: dict, weights_path: Path, what: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelFileError(f"{weights_path} does not fit {what}: {error}") from error


def load_backbone(weights_path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """A shared backbone (timm model without classifier: images → pooled features), in eval mode."""
    card = read_card(weights_path)
    model = create_model(card.architecture, num_classes=0)
    _load_into(model, read_state(weights_path, "the shared backbone"), weights_path, f"{card.architecture} backbone")
    return model.to(device).eval(), card


def load_head(weights_path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """The linear head of a node in a shared-backbone set (features → logits), in eval mode."""
    card = read_card(weights_path)
    state = read_state(weights_path, f"node {card.node}")
    if set(state) != {"weight", "bias"} or state["weight"].shape[0] != len(card.classes):
        raise ModelFileError(f"{weights_path} is not a linear head for the {len(card.classes)} classes of its card.")
    head = torch.nn.Linear(state["weight"].shape[1], len(card.classes))
    head.load_state_dict(state)
    return head.to(device).eval(), card


def mtime_cached(cache: dict, lock: threading.Lock, weights_path: Path, device, loader):
    """loader(path, device) once per process for each (file, device), again when the file's or its card's mtime changes
    (a card's scale or threshold can change without new weights)."""
    weights_path = Path(weights_path).resolve()
    key = (str(weights_path), str(device))
    mtime = tuple(path.stat().st_mtime if path.is_file() else -1.0
                  for path in (weights_path, card_path_for(weights_path)))
    with lock:
        hit = cache.get(key)
        if hit and hit[0] == mtime:
            return hit[1]
        value = loader(weights_path, device)
        cache[key] = (mtime, value)
        return value


_cache: dict = {}
_cache_lock = threading.Lock()


def cached_model(weights_path: Path, device: str | torch.device = "cpu", loader=None) -> tuple[torch.nn.Module, ModelCard]:
    """loader (load_model by default, load_backbone or load_head) once per process, keyed by file and mtime."""
    loader = loader or load_model
    return mtime_cached(_cache, _cache_lock, weights_path, (str(device), loader.__name__),
                        lambda path, key: loader(path, key[0]))


_cards: dict = {}


def cached_card(weights_path: Path) -> ModelCard:
    """A weights file's card, read once per process and again when the file or its card changes (no model built)."""
    return mtime_cached(_cards, _cache_lock, weights_path, "card", lambda path, _: read_card(path))


@dataclass
class ModelSetCard:
    """A folder of node classifiers that together classify down the whole tree."""

    name: str
    nodes: dict[str, str]  # node code -> weights file name inside the folder
    architecture: str = ""
    mode: str = ""
    input_size: int = 0
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    backbone: str = ""  # the shared backbone's file when the nodes share one (one backbone pass per cell)
    second_look: int = 0  # views averaged for a cell left unsure by the first pass (0: no second look)
    familiarity: str = ""  # the familiarity statistics' file (familiarity.py) of a shared-backbone set; "": none
    format: str = "hemoweb-set-1"

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSetCard":
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


def read_set(folder: Path) -> ModelSetCard:
    path = Path(folder) / SET_CARD
    if not path.is_file():
        raise ModelFileError(f"{folder} is not a model set: {SET_CARD} is missing.")
    try:
        return ModelSetCard.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ModelFileError(f"{path} is not valid: {error}") from error


def write_set(folder: Path, card: ModelSetCard) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SET_CARD, asdict(card))
    return folder / SET_CARD
