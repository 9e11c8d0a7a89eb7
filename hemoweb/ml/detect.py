"""Cell detection on whole smear images with ultralytics YOLO: read, export, train, save, load, predict, score.

Plain Python (no Django). Annotations are read from Pascal VOC (XML through defusedxml) or YOLO txt
layouts into `AnnotatedImage`s; training exports them to a YOLO folder, trains a model built from a
definition (`yolov8n.yaml`, `yolo11n.yaml`) or a local `.pt`, and keeps the best epoch's weights in
memory so that only safetensors + a JSON card are written (ultralytics' own .pt files stay in the
temporary run folder). Prediction letterboxes the image itself and, for images far larger than the
model's input, runs overlapping tiles at native scale and merges them with NMS.

ultralytics never reaches the network: `configure_ultralytics` points its settings, runs and fonts
at a folder of the project's before the first import.
"""

import io
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .infer import pick_device
from .sources import BadImage
from .weights import ModelFileError, as_half, mtime_cached, read_state, write_safetensors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
DEFAULT_MAX_PIXELS = 40_000_000
FONT_SOURCE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
LOGGER_SETTINGS = ("clearml", "comet", "dvc", "mlflow", "neptune", "raytune", "tensorboard", "wandb", "hub")


class DetectionError(ValueError):
    """A detection input or model cannot be used; the message is meant for a lab user."""


class ImageTooLarge(BadImage):
    """The image has more pixels than the configured limit (refused before decoding)."""


class TrainingCancelled(RuntimeError):
    """Training was stopped on request; no model was written."""


# ---------------------------------------------------------------------------------------------
# ultralytics, offline


_configured: Path | None = None


def configure_ultralytics(config_dir: Path | None = None) -> Path:
    """Keep ultralytics' settings, runs and fonts in `config_dir` and switch off every online feature."""
    global _configured
    if config_dir is None:
        config_dir = Path(os.environ.get("YOLO_CONFIG_DIR") or Path(__file__).resolve().parents[2] / "var" / "ultralytics")
    config_dir = Path(config_dir)
    if _configured == config_dir:
        return config_dir
    for name, value in {"YOLO_CONFIG_DIR": str(config_dir), "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0",
                        "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(name, value)
    fonts = config_dir / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    # Its plots look for Arial here and download it otherwise; DejaVuSans serves the same purpose.
    for font in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (fonts / font).exists() and FONT_SOURCE.exists():
            shutil.copyfile(FONT_SOURCE, fonts / font)
    from ultralytics.utils import SETTINGS

    updates = {"sync": False, "runs_dir": str(config_dir / "runs"), "weights_dir": str(config_dir / "weights"),
               "datasets_dir": str(config_dir / "datasets")}
    updates.update({name: False for name in LOGGER_SETTINGS if name in SETTINGS})
    if any(SETTINGS.get(key) != value for key, value in updates.items()):
        SETTINGS.update(updates)
    _configured = config_dir
    _undo_pil_patch()
    return config_dir


def _undo_pil_patch() -> None:
    """ultralytics replaces PIL.Image.open process-wide with a version that, on any file Pillow cannot
    identify, tries to install and import pi-heif: a non-image upload would then fail with
    ModuleNotFoundError instead of "not an image". Put Pillow's own function back."""
    import ultralytics.utils.patches as patches

    patches._pil_plugins_registered = True  # its wrapper, where still referenced, calls Pillow directly
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


# ---------------------------------------------------------------------------------------------
# Annotations


@dataclass
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    def as_dict(self) -> dict:
        return {"label": self.label, "x1": round(self.x1, 1), "y1": round(self.y1, 1), "x2": round(self.x2, 1),
                "y2": round(self.y2, 1), "score": round(self.score, 4)}


@dataclass
class AnnotatedImage:
    path: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    split: str = ""
    name: str = ""  # the image's name inside its source


@dataclass
class ReadResult:
    images: list[AnnotatedImage]
    classes: list[str]
    problems: list[str] = field(default_factory=list)
    skipped_boxes: int = 0


def image_size(path: Path | str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Width and height read from the header only; refuses unreadable files and images over `max_pixels`."""
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    try:
        with Image.open(source) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLarge(f"the image has {pixels}; the limit is {max_pixels:,} pixels. "
                            "Cut it into smaller fields or raise MAX_IMAGE_PIXELS.") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (the content is not a known image format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"the image is damaged or unreadable ({error})") from None
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}×{height} = {width * height:,} pixels; the limit is "
                            f"{max_pixels:,} pixels. Cut it into smaller fields or raise MAX_IMAGE_PIXELS.")
    return width, height


def load_image(source: Path | str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB after the size check on the header (nothing over the limit is ever decoded)."""
    image_size(source, max_pixels)
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(data) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"the image is damaged or truncated ({error})") from None


def _check_box(box: Box, width: int, height: int, classes: Sequence[str] | None, where: str) -> str | None:
    """Why `box` cannot be used, or None."""
    if classes is not None and box.label not in classes:
        return f"{where}: unknown class {box.label!r} (known: {', '.join(classes)})"
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        return f"{where}: {box.label} box ({box.x1:g},{box.y1:g})-({box.x2:g},{box.y2:g}) has zero size"
    if box.x1 < 0 or box.y1 < 0 or box.x2 > width or box.y2 > height:
        return (f"{where}: {box.label} box ({box.x1:g},{box.y1:g})-({box.x2:g},{box.y2:g}) lies outside "
                f"the {width}×{height} image")
    return None


def _splits_from_imagesets(root: Path) -> dict[str, str]:
    """Image stem -> split from ImageSets/Main/{train,val,test}.txt when present."""
    result: dict[str, str] = {}
    main = root / "ImageSets" / "Main"
    for split in SPLITS:
        listing = main / f"{split}.txt"
        if listing.is_file():
            for line in listing.read_text().split():
                result.setdefault(line.strip(), split)
    return result


def read_voc(folder: Path, classes: Sequence[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadResult:
    """Pascal VOC: Annotations/*.xml beside JPEGImages/, splits from ImageSets/Main when present."""
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    folder = Path(folder)
    candidates = sorted(p for p in folder.rglob("Annotations") if p.is_dir()) if folder.is_dir() else []
    if not candidates:
        raise DetectionError(f"{folder} has no Annotations/ folder: it is not a Pascal VOC dataset.")
    images: list[AnnotatedImage] = []
    problems: list[str] = []
    skipped = 0
    found_classes: set[str] = set()
    for annotations in candidates:
        root = annotations.parent
        splits = _splits_from_imagesets(root)
        for xml_path in sorted(annotations.glob("*.xml")):
            where = xml_path.name
            try:
                tree = ElementTree.parse(xml_path)
            except (ElementTree.ParseError, DefusedXmlException) as error:
                problems.append(f"{where}: not valid XML ({error}); skipped")
                continue
            node = tree.getroot()
            filename = (node.findtext("filename") or "").strip() or xml_path.stem + ".jpg"
            image_path = root / "JPEGImages" / Path(filename).name
            if not image_path.is_file():
                matches = [p for p in (root / "JPEGImages").glob(xml_path.stem + ".*")
                           if p.suffix.lower() in IMAGE_SUFFIXES]
                if not matches:
                    problems.append(f"{where}: names the image {filename}, which is missing; skipped")
                    continue
                image_path = matches[0]
            try:
                width, height = image_size(image_path, max_pixels)
            except BadImage as error:
                problems.append(f"{where}: {image_path.name}: {error}; skipped")
                continue
            boxes = []
            for obj in node.iter("object"):
                label = (obj.findtext("name") or "").strip()
                bndbox = obj.find("bndbox")
                try:
                    box = Box(label, *(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
                except (AttributeError, TypeError, ValueError):
                    problems.append(f"{where}: a {label or 'unnamed'} object has no readable box; skipped")
                    skipped += 1
                    continue
                reason = _check_box(box, width, height, classes, where)
                if reason:
                    problems.append(reason + "; skipped")
                    skipped += 1
                    continue
                boxes.append(box)
                found_classes.add(label)
            images.append(AnnotatedImage(image_path, width, height, boxes, splits.get(xml_path.stem, ""),
                                         name=image_path.name))
    if not images:
        raise DetectionError(f"No usable annotated image in {folder}." + (" " + problems[0] if problems else ""))
    return ReadResult(images, list(classes) if classes is not None else sorted(found_classes), problems, skipped)


def _yolo_names(folder: Path) -> list[str] | None:
    import yaml

    for name in ("data.yaml", "dataset.yaml"):
        path = folder / name
        if path.is_file():
            try:
                names = (yaml.safe_load(path.read_text()) or {}).get("names")
            except yaml.YAMLError as error:
                raise DetectionError(f"{path.name} is not valid YAML: {error}") from error
            if isinstance(names, dict):
                return [str(names[key]) for key in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    path = folder / "classes.txt"
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def read_yolo(folder: Path, classes: Sequence[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadResult:
    """YOLO txt layout: images/[split/]*.jpg with labels/[split/]*.txt; names from data.yaml or classes.txt."""
    folder = Path(folder)
    names = _yolo_names(folder) if folder.is_dir() else None
    if names is None:
        raise DetectionError(f"{folder} is not a YOLO dataset: it needs data.yaml (with names) or classes.txt.")
    images_root = folder / "images"
    if not images_root.is_dir():
        raise DetectionError(f"{folder} is not a YOLO dataset: the images/ folder is missing.")
    images: list[AnnotatedImage] = []
    problems: list[str] = []
    skipped = 0
    for image_path in sorted(p for p in images_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = image_path.relative_to(images_root)
        where = relative.as_posix()
        split = relative.parts[0] if len(relative.parts) > 1 and relative.parts[0] in SPLITS else ""
        try:
            width, height = image_size(image_path, max_pixels)
        except BadImage as error:
            problems.append(f"{where}: {error}; skipped")
            continue
        label_path = (folder / "labels" / relative).with_suffix(".txt")
        boxes = []
        lines = label_path.read_text().splitlines() if label_path.is_file() else []
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                index, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
                if len(parts) < 5:
                    raise ValueError
            except ValueError:
                problems.append(f"{where} line {number}: not 'class cx cy w h'; skipped")
                skipped += 1
                continue
            if not 0 <= index < len(names):
                problems.append(f"{where} line {number}: unknown class number {index}; skipped")
                skipped += 1
                continue
            box = Box(names[index], (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                      (cy + h / 2) * height)
            # Normalised coordinates lose a fraction of a pixel: allow that much at the border.
            box = Box(box.label, *(round(v, 3) for v in (box.x1, box.y1, box.x2, box.y2)))
            reason = _check_box(box, width, height, classes, f"{where} line {number}")
            if reason:
                problems.append(reason + "; skipped")
                skipped += 1
                continue
            boxes.append(box)
        images.append(AnnotatedImage(image_path, width, height, boxes, split, name=where))
    if not images:
        raise DetectionError(f"No image found under {images_root}.")
    return ReadResult(images, list(classes) if classes is not None else names, problems, skipped)


def read_annotations(folder: Path, fmt: str, classes: Sequence[str] | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadResult:
    if fmt == "voc":
        return read_voc(folder, classes, max_pixels)
    if fmt == "yolo":
        return read_yolo(folder, classes, max_pixels)
    raise DetectionError(f"Unknown annotation format {fmt!r}: use voc or yolo.")


# ---------------------------------------------------------------------------------------------
# Export and training


def export_yolo(images: Sequence[AnnotatedImage], classes: Sequence[str], folder: Path,
                train_splits: Sequence[str] = ("train",), val_split: str = "val") -> Path:
    """Write a YOLO dataset (links to the images, normalised txt labels) and return its data.yaml."""
    import yaml

    folder = Path(folder)
    index = {name: i for i, name in enumerate(classes)}
    chosen = {"train": [im for im in images if im.split in train_splits or (not im.split and "train" in train_splits)],
              "val": [im for im in images if im.split == val_split]}
    if not chosen["train"]:
        raise DetectionError("The dataset has no training images (split 'train').")
    if not chosen["val"]:
        # No validation split in the source: watch training on a tenth of it (at least one image).
        count = max(1, len(chosen["train"]) // 10)
        chosen["val"] = chosen["train"][-count:]
    for part, members in chosen.items():
        (folder / "images" / part).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / part).mkdir(parents=True, exist_ok=True)
        for number, image in enumerate(members):
            stem = f"{number:06d}"
            target = folder / "images" / part / (stem + Path(image.path).suffix.lower())
            try:
                target.symlink_to(Path(image.path).resolve())
            except OSError:
                shutil.copyfile(image.path, target)
            lines = []
            for box in image.boxes:
                if box.label not in index:
                    continue
                cx, cy = (box.x1 + box.x2) / 2 / image.width, (box.y1 + box.y2) / 2 / image.height
                lines.append(f"{index[box.label]} {cx:.6f} {cy:.6f} {box.width / image.width:.6f} "
                             f"{box.height / image.height:.6f}")
            (folder / "labels" / part / (stem + ".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
    data = {"path": str(folder.resolve()), "train": "images/train", "val": "images/val",
            "names": {i: name for i, name in enumerate(classes)}}
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


@dataclass
class DetectorCard:
    """Everything needed to rebuild and feed one detector."""

    architecture: str  # ultralytics model definition, e.g. yolov8n.yaml
    classes: list[str]
    imgsz: int
    tile: int = 640  # native tile side for large images (the training images' long side)
    cell_classes: list[str] = field(default_factory=lambda: ["WBC"])  # classes cropped for the tree
    reference: dict = field(default_factory=dict)  # its training fields' px_per_um and background (hemoweb.ml.fields)
    conf: float = 0.25
    iou: float = 0.5
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format: str = "hemoweb-detector-1"

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorCard":
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class TrainConfig:
    architecture: str = "yolov8n.yaml"
    epochs: int = 30
    imgsz: int = 416
    batch: int = 16
    device: str = "cpu"
    seed: int = 0
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    cell_classes: tuple[str, ...] = ("WBC",)
    extra: dict = field(default_factory=dict)  # further ultralytics train arguments


def resolve_device(device: str) -> str:
    """pick_device in ultralytics' spelling ('0' is the first GPU)."""
    try:
        picked = pick_device(device)
    except RuntimeError as error:
        raise DetectionError(str(error)) from None
    return "0" if picked == "cuda" else picked


def _metrics_from(validator_metrics, classes: Sequence[str]) -> dict:
    box = validator_metrics.box
    per_class = {name: 0.0 for name in classes}
    for i, class_index in enumerate(box.ap_class_index):
        per_class[classes[int(class_index)]] = round(float(box.ap50[i]), 4)
    return {"map50": round(float(box.map50), 4), "map50_95": round(float(box.map), 4),
            "precision": round(float(box.mp), 4), "recall": round(float(box.mr), 4), "per_class": per_class}


def train_detector(images: Sequence[AnnotatedImage], classes: Sequence[str], output: Path, config: TrainConfig,
                   workdir: Path, progress: Callable[[int, int, dict], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> tuple[Path, DetectorCard]:
    """Train a YOLO detector and write `output` (.safetensors) + card; raises TrainingCancelled when stopped.

    `progress(epoch, epochs, metrics)` is called after each epoch; `should_stop()` is asked after every
    batch. The best epoch's EMA weights are kept in memory, so nothing is read back from a pickle.
    """
    configure_ultralytics()
    from ultralytics import YOLO

    _undo_pil_patch()

    classes = list(classes)
    device = resolve_device(config.device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_root = Path(tempfile.mkdtemp(prefix="detector-", dir=workdir))
    try:
        data_yaml = export_yolo(images, classes, run_root.resolve() / "data", config.train_splits, config.val_split)
        source = config.architecture
        model, start_state = _starting_model(YOLO, source)
        state: dict = {"best": None, "in_epoch": False, "final": None, "epoch_metrics": None}

        def on_train_batch_end(trainer) -> None:
            if should_stop and should_stop():
                raise TrainingCancelled("Training was cancelled; no model was saved.")

        def on_train_epoch_end(trainer) -> None:
            state["in_epoch"] = True

        def on_fit_epoch_end(trainer) -> None:
            if not state["in_epoch"]:  # final_eval's call: metrics of the best epoch's weights
                state["final"] = _metrics_from(trainer.validator.metrics, classes)
                return
            state["in_epoch"] = False
            metrics = _metrics_from(trainer.validator.metrics, classes)
            if trainer.fitness is not None and trainer.best_fitness == trainer.fitness or state["best"] is None:
                ema = trainer.ema.ema if trainer.ema else trainer.model
                state["best"] = {k: v.detach().float().cpu().clone() for k, v in ema.state_dict().items()}
                state["epoch_metrics"] = dict(metrics, epoch=trainer.epoch + 1)
            if progress:
                progress(trainer.epoch + 1, trainer.epochs, metrics)
            if should_stop and should_stop():
                raise TrainingCancelled("Training was cancelled; no model was saved.")

        model.add_callback("on_train_batch_end", on_train_batch_end)
        model.add_callback("on_train_epoch_end", on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
        args = dict(data=str(data_yaml), epochs=config.epochs, imgsz=config.imgsz, batch=config.batch, device=device,
                    workers=0, project=str((run_root / "runs").resolve()), name="train", exist_ok=True,
                    pretrained=start_state is not None,
                    amp=device != "cpu", plots=False, verbose=False, seed=config.seed, val=True, cache=False,
                    patience=max(config.epochs, 50))
        args.update(config.extra)
        model.train(**args)
        if state["best"] is None:
            raise DetectionError("Training ended without a single finished epoch.")
        architecture = Path(source).name if source.endswith(".yaml") else start_state
        native = max(max(im.width, im.height) for im in images)
        counts = {name: 0 for name in classes}
        for im in images:
            for box in im.boxes:
                if box.label in counts:
                    counts[box.label] += 1
        card = DetectorCard(
            architecture=architecture, classes=classes, imgsz=config.imgsz, tile=int(native),
            cell_classes=[c for c in config.cell_classes if c in classes],
            metrics={"val": state["final"] or state["epoch_metrics"], "best_epoch": state["epoch_metrics"]},
            data={"images": len(images), "boxes": counts, "train_splits": list(config.train_splits),
                  "val_split": config.val_split},
            training={"epochs": config.epochs, "imgsz": config.imgsz, "batch": config.batch, "device": device,
                      "seed": config.seed, "start": Path(source).name},
        )
        save_detector(state["best"], card, output)
        return Path(output), card
    finally:
        shutil.rmtree(run_root, ignore_errors=True)


def _starting_model(yolo_class, source: str):
    """(ultralytics YOLO object, None for a from-scratch definition or the definition's name for a start file).

    A start file is a hemoweb detector (.safetensors + card): its weights go into the model built from
    its definition, and ultralytics carries over every tensor whose shape fits (all but the class head
    when the classes differ). Pickled .pt checkpoints are refused: unpickling runs code from the file.
    """
    if source.endswith(".yaml"):
        return yolo_class(source, task="detect"), None
    path = Path(source)
    if path.suffix == ".pt":
        raise DetectionError(
            f"{path.name} is a pickled checkpoint; hemoweb does not unpickle model files (that can run code). "
            "Start from a model definition (yolov8n.yaml, yolo11n.yaml) or from a hemoweb detector (.safetensors).")
    if path.suffix != ".safetensors" or not path.is_file():
        raise DetectionError(f"The starting point {source} is neither a model definition (.yaml) nor an existing "
                             "hemoweb detector (.safetensors); nothing is downloaded.")
    card = read_detector_card(path)
    model = yolo_class(card.architecture, task="detect")
    # The definition's default class count (80) would widen the class head; build it as the detector was built.
    network = detection_network(card.architecture, len(card.classes))
    try:
        network.load_state_dict(read_state(path, "the starting detector"))
    except RuntimeError as error:
        raise DetectionError(f"The starting detector {path.name} does not fit {card.architecture}: {error}") from None
    network.args, network.task = model.model.args, model.model.task
    model.model = network
    model.ckpt = {"source": str(path)}  # makes ultralytics build its training model from these weights
    return model, card.architecture


def detection_network(architecture: str, n_classes: int) -> torch.nn.Module:
    """The ultralytics network of a definition (yolov8n.yaml, ...) for `n_classes` classes, randomly initialised."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    definition = {**yaml_model_load(architecture), "nc": n_classes}  # no "overriding nc" log line
    return DetectionModel(cfg=definition, nc=n_classes, verbose=False)


def save_detector(state: dict[str, torch.Tensor], card: DetectorCard, weights_path: Path) -> Path:
    """Weights as float16 safetensors (half the size, no accuracy lost at inference) + JSON card."""
    tensors = {k: v.contiguous() for k, v in as_half(state).items()}
    return write_safetensors(weights_path, tensors, {"architecture": card.architecture, "format": card.format},
                             card=asdict(card))


def read_detector_card(weights_path: Path) -> DetectorCard:
    import json

    path = Path(weights_path).with_suffix(".json")
    if not path.is_file():
        raise ModelFileError(f"The detector card {path} is missing.")
    try:
        return DetectorCard.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ModelFileError(f"The detector card {path} is not valid: {error}") from error


@dataclass
class Detector:
    model: torch.nn.Module
    card: DetectorCard
    device: torch.device

    @property
    def stride(self) -> int:
        return int(max(self.model.stride.max().item(), 32))


def load_detector(weights_path: Path, device: str | torch.device = "cpu") -> Detector:
    """Rebuild the network from its definition and fill it from safetensors (never a pickle)."""
    configure_ultralytics()
    _undo_pil_patch()

    weights_path = Path(weights_path)
    card = read_detector_card(weights_path)
    state = read_state(weights_path, "the detector")
    model = detection_network(card.architecture, len(card.classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelFileError(f"{weights_path} does not fit {card.architecture}: {error}") from error
    model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
    device = torch.device(device)
    return Detector(model.to(device).eval(), card, device)


_cache: dict = {}
_cache_lock = threading.Lock()


def cached_detector(weights_path: Path, device: str = "cpu") -> Detector:
    """load_detector once per process, keyed by file and mtime."""
    return mtime_cached(_cache, _cache_lock, weights_path, device, load_detector)


# ---------------------------------------------------------------------------------------------
# Prediction


def _letterbox(image: np.ndarray, size: int, stride: int) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """Resize the long side to `size`, pad to a multiple of `stride` (grey 114, as in training)."""
    height, width = image.shape[:2]
    gain = size / max(height, width)
    new_w, new_h = max(1, round(width * gain)), max(1, round(height * gain))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)) if gain != 1 else image
    pad_w, pad_h = math.ceil(new_w / stride) * stride, math.ceil(new_h / stride) * stride
    canvas = np.full((pad_h, pad_w, 3), 114, dtype=np.uint8)
    left, top = (pad_w - new_w) // 2, (pad_h - new_h) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return torch.from_numpy(canvas).permute(2, 0, 1), gain, (left, top)


@torch.inference_mode()
def _predict_arrays(detector: Detector, arrays: Sequence[np.ndarray], conf: float, iou: float,
                    max_det: int = 1000) -> list[torch.Tensor]:
    """Boxes [n, 6] (x1, y1, x2, y2, score, class) in each array's own pixels."""
    from ultralytics.utils.nms import non_max_suppression

    results = []
    for array in arrays:  # one at a time: tiles of one image may differ in padded size
        tensor, gain, (left, top) = _letterbox(array, detector.card.imgsz, detector.stride)
        batch = tensor.unsqueeze(0).to(detector.device).float().div_(255)
        raw = detector.model(batch)
        raw = raw[0] if isinstance(raw, (list, tuple)) else raw
        found = non_max_suppression(raw, conf_thres=conf, iou_thres=iou, max_det=max_det,
                                    nc=len(detector.card.classes))[0].float().cpu()
        found[:, [0, 2]] = ((found[:, [0, 2]] - left) / gain).clamp(0, array.shape[1])
        found[:, [1, 3]] = ((found[:, [1, 3]] - top) / gain).clamp(0, array.shape[0])
        results.append(found)
    return results


def plan_tiles(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping windows (x0, y0, x1, y1) covering the image; the last row/column is flush with the edge."""
    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        step = max(1, tile - overlap)
        positions = list(range(0, length - tile, step)) + [length - tile]
        return sorted(set(positions))

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


def merge_tiles(parts: Sequence[tuple[tuple[int, int, int, int], torch.Tensor]], width: int, height: int,
                iou: float, edge: float = 3.0) -> torch.Tensor:
    """Shift tile boxes into the image, drop boxes cut by an inner tile edge, then NMS per class.

    A cell cut by a tile's inner edge lies whole in the overlapping neighbour (the overlap is wider
    than a cell), so the cut copy is dropped; what remains twice is merged by NMS.
    """
    from torchvision.ops import batched_nms

    kept = []
    for (x0, y0, x1, y1), boxes in parts:
        if not len(boxes):
            continue
        boxes = boxes.clone()
        cut = torch.zeros(len(boxes), dtype=torch.bool)
        if x0 > 0:
            cut |= boxes[:, 0] <= edge
        if y0 > 0:
            cut |= boxes[:, 1] <= edge
        if x1 < width:
            cut |= boxes[:, 2] >= (x1 - x0) - edge
        if y1 < height:
            cut |= boxes[:, 3] >= (y1 - y0) - edge
        boxes = boxes[~cut]
        boxes[:, [0, 2]] += x0
        boxes[:, [1, 3]] += y0
        kept.append(boxes)
    if not kept:
        return torch.zeros((0, 6))
    merged = torch.cat(kept)
    keep = batched_nms(merged[:, :4], merged[:, 4], merged[:, 5].long(), iou)
    return merged[keep]


@dataclass
class Detection:
    width: int
    height: int
    boxes: list[Box]
    tiles: int = 1

    def counts(self, classes: Iterable[str]) -> dict[str, int]:
        result = {name: 0 for name in classes}
        for box in self.boxes:
            result[box.label] = result.get(box.label, 0) + 1
        return result


def detect(detector: Detector, image: Image.Image, conf: float | None = None, iou: float | None = None,
           tile: int | None = None, overlap: float = 0.25, tile_above: float = 1.5) -> Detection:
    """Find cells; images over `tile_above` × the tile side are cut into overlapping native-scale tiles."""
    card = detector.card
    conf = card.conf if conf is None else conf
    iou = card.iou if iou is None else iou
    tile = tile or card.tile
    array = np.asarray(image.convert("RGB"))
    height, width = array.shape[:2]
    if max(width, height) <= tile * tile_above:
        found = _predict_arrays(detector, [array], conf, iou)[0]
        windows = 1
    else:
        windows_list = plan_tiles(width, height, tile, int(tile * overlap))
        parts = []
        for window in windows_list:
            x0, y0, x1, y1 = window
            parts.append((window, _predict_arrays(detector, [array[y0:y1, x0:x1]], conf, iou)[0]))
        found = merge_tiles(parts, width, height, iou)
        windows = len(windows_list)
    order = torch.argsort(found[:, 4], descending=True) if len(found) else []
    boxes = [Box(card.classes[int(row[5])], *(float(v) for v in row[:4]), score=float(row[4]))
             for row in (found[i] for i in order)]
    return Detection(width, height, boxes, windows)


def crop_cells(image: Image.Image, boxes: Sequence[Box], margin: float = 0.15) -> list[Image.Image]:
    """Square crops centred on each box (side = long side + margin), as single-cell images are taken."""
    crops = []
    for box in boxes:
        side = max(box.width, box.height) * (1 + 2 * margin)
        cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
        left, top = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
        right, bottom = min(image.width, round(cx + side / 2)), min(image.height, round(cy + side / 2))
        crops.append(image.crop((left, top, right, bottom)).convert("RGB"))
    return crops


PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
CLASS_COLOURS = {"RBC": "#d62728", "WBC": "#1f77b4", "Platelets": "#2ca02c"}


def class_colour(name: str, classes: Sequence[str]) -> str:
    if name in CLASS_COLOURS:
        return CLASS_COLOURS[name]
    index = list(classes).index(name) if name in classes else len(classes)
    return PALETTE[index % len(PALETTE)]


def draw_boxes(image: Image.Image, boxes: Sequence[Box], classes: Sequence[str]) -> Image.Image:
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 320))
    for box in boxes:
        colour = class_colour(box.label, classes)
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=colour, width=width)
        draw.text((box.x1 + 3, box.y1 + 2), f"{box.label} {box.score:.2f}", fill=colour)
    return canvas


# ---------------------------------------------------------------------------------------------
# Evaluation


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a, b)


def evaluate(detector: Detector, images: Sequence[AnnotatedImage], conf: float = 0.001,
             max_pixels: int = DEFAULT_MAX_PIXELS, sure: float = 0.5) -> dict:
    """mAP@0.5, mAP@0.5:0.95, AP@0.5 per class, precision and recall, as ultralytics' validator computes them.

    `unmatched_sure` lists the boxes scored at least `sure` that match no annotated box of their class
    (IoU < 0.5): false positives, or cells the annotation missed. They cost AP either way; a curator
    looks at them before trusting a low figure.
    """
    from ultralytics.utils.metrics import ap_per_class

    classes = detector.card.classes
    index = {name: i for i, name in enumerate(classes)}
    thresholds = torch.linspace(0.5, 0.95, 10)
    tps, confs, pred_cls, target_cls, unmatched = [], [], [], [], []
    for item in images:
        image = load_image(item.path, max_pixels)
        found = detect(detector, image, conf=conf, iou=0.7)
        truth = [b for b in item.boxes if b.label in index]
        t_boxes = torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in truth]).reshape(-1, 4)
        t_cls = torch.tensor([index[b.label] for b in truth], dtype=torch.long)
        p_boxes = torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in found.boxes]).reshape(-1, 4)
        p_cls = torch.tensor([index[b.label] for b in found.boxes], dtype=torch.long)
        p_conf = torch.tensor([b.score for b in found.boxes])
        tp = np.zeros((len(found.boxes), len(thresholds)), dtype=bool)
        if len(found.boxes) and len(truth):
            iou = _box_iou(t_boxes, p_boxes) * (t_cls[:, None] == p_cls[None, :])
            iou_np = iou.numpy()
            for k, threshold in enumerate(thresholds.tolist()):
                matches = np.nonzero(iou_np >= threshold)
                matches = np.array(matches).T
                if matches.shape[0]:
                    scores = iou_np[matches[:, 0], matches[:, 1]]
                    matches = matches[scores.argsort()[::-1]]
                    matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
                    matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
                    tp[matches[:, 1], k] = True
        unmatched += [{"image": item.name or item.path.name, **box.as_dict()}
                      for box, matched in zip(found.boxes, tp[:, 0]) if box.score >= sure and not matched]
        tps.append(tp)
        confs.append(p_conf.numpy())
        pred_cls.append(p_cls.numpy())
        target_cls.append(t_cls.numpy())
    tp = np.concatenate(tps) if tps else np.zeros((0, 10), bool)
    result = ap_per_class(tp, np.concatenate(confs), np.concatenate(pred_cls), np.concatenate(target_cls),
                          names=dict(enumerate(classes)))
    precision, recall, ap, unique = result[2], result[3], result[5], result[6]
    per_class = {name: 0.0 for name in classes}
    per_class_95 = {name: 0.0 for name in classes}
    for row, class_index in enumerate(unique):
        per_class[classes[int(class_index)]] = round(float(ap[row, 0]), 4)
        per_class_95[classes[int(class_index)]] = round(float(ap[row].mean()), 4)
    present = len(unique) or 1
    return {
        "map50": round(float(ap[:, 0].sum() / present) if len(unique) else 0.0, 4),
        "map50_95": round(float(ap.mean()) if len(unique) else 0.0, 4),
        "per_class": per_class,
        "per_class_map50_95": per_class_95,
        "precision": round(float(np.mean(precision)) if len(unique) else 0.0, 4),
        "recall": round(float(np.mean(recall)) if len(unique) else 0.0, 4),
        "n_images": len(images),
        "n_boxes": int(sum(len(t) for t in target_cls)),
        "unmatched_sure": sorted(unmatched, key=lambda box: -box["score"]),
    }
