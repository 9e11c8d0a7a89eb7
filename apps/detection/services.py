"""Detection use cases: import annotated smears, train and register detectors, detect (and classify), evaluate."""

import base64
import hashlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from apps.operations.workers import lower_priority
from hemoweb.ml import detect as ml
from hemoweb.ml.sources import BadImage, ImageSource, SourceError
from hemoweb.ml.weights import ModelFileError

from .models import Box, DetectionDataset, DetectionImage, Detector, DetectorTrainingJob

log = logging.getLogger(__name__)
FORMATS = ("voc", "yolo")


class DetectionInputError(ValueError):
    """The request cannot be done; the message says why in words a lab user understands."""


def max_pixels() -> int:
    return settings.HEMOWEB_MAX_IMAGE_PIXELS


# ---------------------------------------------------------------------------------------------
# Import


@dataclass
class DetectionImportReport:
    dataset: str
    imported: int = 0
    duplicates: int = 0
    boxes: int = 0
    negatives: int = 0  # images kept without any box
    skipped_boxes: int = 0
    problems: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    per_split: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"Detection dataset {self.dataset}: imported {self.imported} images with {self.boxes} boxes "
                 f"({self.negatives} without boxes), duplicates {self.duplicates}, boxes skipped {self.skipped_boxes}."]
        if self.per_class:
            lines.append("Per class: " + ", ".join(f"{name} {n}" for name, n in sorted(self.per_class.items())))
        if self.per_split:
            lines.append("Per split: " + ", ".join(f"{name or 'unassigned'} {n}" for name, n in sorted(self.per_split.items())))
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def _unpack(upload, target: Path) -> Path:
    """A .zip (uploaded or on disk) extracted safely into `target` (paths and sizes checked by ImageSource)."""
    try:
        with ImageSource(upload) as source:
            for entry in source.files():
                destination = target / entry.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(entry.read())
    except SourceError as error:
        raise DetectionInputError(str(error)) from error
    return target


def import_detections(source, *, dataset: str, fmt: str, classes: list[str] | None = None,
                      source_description: str = "", licence: str = "") -> DetectionImportReport:
    """Import a VOC or YOLO folder (or .zip) into `dataset`; bad boxes and files are skipped and reported.

    Nothing is stored when the whole source is unusable; images already stored stay untouched.
    """
    if fmt not in FORMATS:
        raise DetectionInputError(f"Unknown format {fmt!r}: use voc or yolo.")
    with tempfile.TemporaryDirectory(prefix="detections-") as scratch:
        folder = Path(source) if isinstance(source, (str, Path)) and Path(source).is_dir() else None
        if folder is None:
            if isinstance(source, (str, Path)) and not Path(source).exists():
                raise DetectionInputError(f"{source} does not exist.")
            folder = _unpack(source, Path(scratch))
        existing = DetectionDataset.objects.filter(name=dataset).first()
        known = classes or (existing.classes if existing and existing.classes else None)
        try:
            result = ml.read_annotations(folder, fmt, known, max_pixels())
        except ml.DetectionError as error:
            raise DetectionInputError(str(error)) from error
        return _store(result, dataset, source_description, licence)


def _store(result: ml.ReadResult, dataset_name: str, description: str, licence: str) -> DetectionImportReport:
    report = DetectionImportReport(dataset_name, problems=list(result.problems), skipped_boxes=result.skipped_boxes)
    written: list[str] = []
    try:
        with transaction.atomic():
            dataset, created = DetectionDataset.objects.get_or_create(
                name=dataset_name, defaults={"classes": result.classes, "source": description, "licence": licence})
            if not created and not dataset.classes:
                dataset.classes = result.classes
                dataset.save(update_fields=["classes"])
            seen = set(dataset.images.values_list("sha256", flat=True))
            for item in result.images:
                data = Path(item.path).read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    report.duplicates += 1
                    continue
                seen.add(digest)
                suffix = Path(item.path).suffix.lower() or ".jpg"
                stored = default_storage.save(f"detection/{digest[:2]}/{digest}{suffix}", ContentFile(data))
                written.append(stored)
                image = DetectionImage.objects.create(
                    dataset=dataset, file=stored, original_name=item.name[:255], width=item.width,
                    height=item.height, split=item.split, sha256=digest)
                Box.objects.bulk_create([Box(image=image, label=b.label, x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2)
                                         for b in item.boxes])
                report.imported += 1
                report.boxes += len(item.boxes)
                report.negatives += not item.boxes
                report.per_split[item.split] = report.per_split.get(item.split, 0) + 1
                for b in item.boxes:
                    report.per_class[b.label] = report.per_class.get(b.label, 0) + 1
    except Exception:
        for name in written:
            default_storage.delete(name)
        raise
    log.info(report.summary().splitlines()[0])
    return report


def dataset_annotations(dataset: DetectionDataset) -> list[ml.AnnotatedImage]:
    """The dataset's images and boxes as the ML core's plain records."""
    images = dataset.images.prefetch_related("boxes")
    return [ml.AnnotatedImage(Path(default_storage.path(image.file.name)), image.width, image.height,
                              [ml.Box(b.label, b.x1, b.y1, b.x2, b.y2) for b in image.boxes.all()],
                              image.split, image.original_name) for image in images]


# ---------------------------------------------------------------------------------------------
# Detectors


def register_detector(weights_path: Path, *, name: str, activate: bool = False) -> Detector:
    """Register a detector file (loaded once to prove it works); files outside MODELS_DIR are copied in."""
    weights_path = Path(weights_path)
    try:
        ml.load_detector(weights_path)
        card = ml.read_detector_card(weights_path)
    except (ModelFileError, FileNotFoundError) as error:
        raise DetectionInputError(f"{weights_path} is not a usable detector: {error}") from error
    models_dir = Path(settings.MODELS_DIR).resolve()
    resolved = weights_path.resolve()
    if not resolved.is_relative_to(models_dir):
        target = models_dir / "detectors" / name / resolved.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(resolved, target)
        shutil.copyfile(resolved.with_suffix(".json"), target.with_suffix(".json"))
        resolved = target
    from dataclasses import asdict

    detector, _ = Detector.objects.update_or_create(name=name, defaults={
        "weights": resolved.relative_to(models_dir).as_posix(), "architecture": card.architecture,
        "classes": card.classes, "card": asdict(card), "metrics": card.metrics})
    if activate or not Detector.objects.filter(is_active=True).exists():
        detector.activate()
    return detector


def active_detector() -> Detector:
    detector = Detector.objects.active()
    if detector is None:
        raise DetectionInputError("No detector is active. A curator registers one (manage.py setup_demo registers "
                                  "the shipped default) or trains one on a detection dataset.")
    return detector


def _load(detector: Detector) -> ml.Detector:
    try:
        return ml.cached_detector(detector.path)
    except (ModelFileError, FileNotFoundError) as error:
        raise DetectionInputError(f"The detector {detector.name} cannot be loaded: {error}") from error


# ---------------------------------------------------------------------------------------------
# Detect, then classify the white cells


@dataclass
class CellResult:
    box: ml.Box
    tree: dict | None
    crop_png: bytes


@dataclass
class DetectionResult:
    detector: str
    classes: list[str]
    detection: ml.Detection
    cells: list[CellResult]
    image: "object"  # the decoded PIL image
    model_set: str = ""
    tree_note: str = ""
    site_shift: dict = field(default_factory=dict)  # the classified white cells against the set's training cells
    site: str = ""  # the lab set-up whose model set classified the white cells

    @property
    def counts(self) -> dict[str, int]:
        return self.detection.counts(self.classes)

    @property
    def tree_counts(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for cell in self.cells:
            if cell.tree:
                result[cell.tree["code"]] = result.get(cell.tree["code"], 0) + 1
        return result

    def as_dict(self) -> dict:
        return {
            "detector": self.detector,
            "model_set": self.model_set,
            "width": self.detection.width,
            "height": self.detection.height,
            "tiles": self.detection.tiles,
            "classes": self.classes,
            "counts": self.counts,
            "boxes": [box.as_dict() for box in self.detection.boxes],
            "cells": [{"box": cell.box.as_dict(), "tree": cell.tree} for cell in self.cells],
            "tree_counts": self.tree_counts,
            "tree_note": self.tree_note,
            "site_shift": self.site_shift,
            "site": self.site,
        }

    def annotated_png(self) -> bytes:
        buffer = io.BytesIO()
        ml.draw_boxes(self.image, self.detection.boxes, self.classes).save(buffer, format="PNG")
        return buffer.getvalue()


def _read_upload(upload) -> bytes:
    if isinstance(upload, (bytes, bytearray)):
        return bytes(upload)
    if isinstance(upload, (str, Path)):
        path = Path(upload)
        if not path.is_file():
            raise DetectionInputError(f"{path} does not exist.")
        return path.read_bytes()
    if getattr(upload, "size", 0) > settings.HEMOWEB_ZIP_MAX_ENTRY_BYTES:
        raise DetectionInputError(f"The file is larger than {settings.HEMOWEB_ZIP_MAX_ENTRY_BYTES:,} bytes.")
    return upload.read()


def detect_image(upload, *, detector: Detector | None = None, classify: bool = True, site=None) -> DetectionResult:
    """Find every cell on a smear image, count per class, and classify each white cell down the tree with the
    site's set (`site`: default the default site; its set, else the active one)."""
    from apps.sites.models import Site

    site = site or Site.objects.default()
    data = _read_upload(upload)
    try:
        image = ml.load_image(data, max_pixels())
    except BadImage as error:
        raise DetectionInputError(f"This file cannot be analysed: {error}.") from error
    detector = detector or active_detector()
    model = _load(detector)
    detection = ml.detect(model, image)
    white = [box for box in detection.boxes if box.label in model.card.cell_classes]
    crops = ml.crop_cells(image, white)
    trees: list[dict | None] = [None] * len(white)
    set_name, note, shift = "", "", {}
    if classify and white:
        trees, set_name, note, shift = _classify(crops, image, white, site.set_in_use(), site.um_per_pixel)
    cells = []
    for box, crop, tree in zip(white, crops, trees, strict=True):
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        cells.append(CellResult(box, tree, buffer.getvalue()))
    return DetectionResult(detector.name, list(model.card.classes), detection, cells, image, set_name, note, shift,
                           site.name)


def _classify(crops, field, boxes, model_set, um_per_pixel: float | None = None,
              ) -> tuple[list[dict | None], str, str, dict]:
    """The white cells down the tree with `model_set`. A set trained at a scale gets each cell as a window of its
    training field (in µm) cut from the smear around the cell, at the smear's scale (its many red cells: the best
    ruler; the site's stated pixel size when they cannot be measured)."""
    from apps.cells.models import CellType
    from hemoweb.ml.infer import TreeClassifier
    from hemoweb.ml.standardise import colour_summary

    if model_set is None:
        return ([None] * len(crops), "", "No classifier model set is active: white cells are found but not classified.",
                {})
    try:
        classifier = TreeClassifier(model_set.path, CellType.objects.as_tree())
        scale = classifier.estimate_scale([field], um_per_pixel) if classifier.scale_reference else None
        crops = white_cell_crops(field, boxes, classifier.scale_reference, scale, crops)
        predictions = classifier.classify(crops, scale=scale)
        shift = classifier.site_shift(predictions, scale.as_dict() if scale else None,
                                      colour_summary([p.background for p in predictions],
                                                     classifier.input_card.colour.get("reference")))
    except (ModelFileError, FileNotFoundError, KeyError) as error:
        return [None] * len(crops), model_set.name, f"The model set {model_set.name} cannot classify: {error}", {}
    return [p.as_dict() for p in predictions], model_set.name, "", shift


def white_cell_crops(field, boxes, reference, scale, crops=None) -> list:
    """The white cells as a model set expects them: a set trained at a scale (`reference`) gets a window of its
    training field (in µm) cut from the smear around each cell at the smear's `scale`; otherwise (no reference, or a
    scale that could not be trusted) a square crop around each box (`crops`, when already cut)."""
    from hemoweb.ml.standardise import centred_window

    if reference is not None and scale is not None and not scale.flag:
        side = max(8, round(reference.field_px / scale.applied))
        return [centred_window(field, side, ((b.x1 + b.x2) / 2, (b.y1 + b.y2) / 2)) for b in boxes]
    return crops if crops is not None else ml.crop_cells(field, boxes)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------------------------------
# Training


def start_training(*, dataset: DetectionDataset, name: str = "", architecture: str = "yolov8n.yaml", epochs: int = 30,
                   imgsz: int = 416, device: str = "auto", activate: bool = False, user=None,
                   queue: bool = True, train_splits: tuple[str, ...] = ("train",)) -> DetectorTrainingJob:
    """Create the job row and queue it on the training cluster (or leave it for the caller to run).

    `train_splits` are the dataset's splits trained on (validation is always on "val"); the test split
    is never trained on, so that evaluate_detector's test numbers stay honest.
    """
    train_splits = tuple(dict.fromkeys(train_splits))
    if not train_splits or set(train_splits) - {"train", "val"}:
        raise DetectionInputError("Train on the train split, or on train and val; the test split stays unseen.")
    if epochs < 1 or imgsz < 32 or imgsz % 32:
        raise DetectionInputError("Epochs must be at least 1 and the image size a multiple of 32 (e.g. 416, 640).")
    if device not in {"auto", "cpu", "cuda"}:
        raise DetectionInputError(f"Unknown device {device!r}: use auto, cpu or cuda.")
    if architecture.endswith(".pt"):
        raise DetectionInputError("Pickled .pt checkpoints are not loaded (unpickling can run code): start from a model "
                                  "definition (yolov8n.yaml, yolo11n.yaml) or a registered detector (.safetensors).")
    if architecture.endswith(".safetensors") and not Path(architecture).is_file():
        raise DetectionInputError(f"The starting detector {architecture} does not exist on this machine.")
    if not architecture.endswith((".yaml", ".safetensors")):
        raise DetectionInputError("The model definition must be a .yaml name (yolov8n.yaml, yolo11n.yaml) or a "
                                  "detector's .safetensors file.")
    if not dataset.images.filter(split__in=["train", ""]).exists():
        raise DetectionInputError(f"The dataset {dataset.name} has no training images.")
    job = DetectorTrainingJob.objects.create(
        dataset=dataset, name=name or f"{dataset.name} {Path(architecture).stem}", architecture=architecture,
        epochs=epochs, imgsz=imgsz, device=device, activate=activate, created_by=user, epochs_total=epochs,
        train_splits=",".join(train_splits))
    if queue:
        from django_q.tasks import async_task

        transaction.on_commit(lambda: async_task("apps.detection.tasks.train_detector_task", job.pk,
                                                 task_name=f"detector training {job.pk}",
                                                 cluster=settings.HEMOWEB_TRAINING_CLUSTER))
    return job


def run_training(job: DetectorTrainingJob) -> DetectorTrainingJob:
    """Train, record progress on the row, and register the detector; a cancelled job registers nothing."""
    if job.cancel_was_requested():
        job.mark_cancelled()
        return job
    job.mark_running()
    lower_priority(settings.HEMOWEB_TRAINING_NICE)
    config = ml.TrainConfig(architecture=job.architecture, epochs=job.epochs, imgsz=job.imgsz, device=job.device,
                            train_splits=tuple(job.train_splits.split(",")), val_split="val")
    name = _unique_detector_name(job.name)
    output = Path(settings.MODELS_DIR) / "detectors" / _slug(name) / "detector.safetensors"
    try:
        images = dataset_annotations(job.dataset)
        _, card = ml.train_detector(images, job.dataset.classes, output, config, Path(settings.VAR_DIR) / "detector-runs",
                                    progress=job.record_epoch, should_stop=job.alive_unless_cancelled)
    except ml.TrainingCancelled:
        shutil.rmtree(output.parent, ignore_errors=True)
        job.mark_cancelled()
        return job
    except (ml.DetectionError, DetectionInputError, ModelFileError, RuntimeError, ValueError, OSError) as error:
        shutil.rmtree(output.parent, ignore_errors=True)
        log.exception("Detector training job %s failed", job.pk)
        job.mark_failed(str(error))
        return job
    detector = register_detector(output, name=name, activate=job.activate)
    job.mark_done(detector, card.metrics.get("val") or {})
    return job


def detect_lost_training_jobs() -> list[DetectorTrainingJob]:
    """Fail running detector trainings whose worker is gone (dead process on this host, or silent too long)."""
    lost = []
    for job in DetectorTrainingJob.objects.filter(status=DetectorTrainingJob.Status.RUNNING):
        if not job.is_lost(settings.HEMOWEB_TRAINING_STALE_SECONDS):
            continue
        error = (f"The training stopped after {job.epoch} of {job.epochs_total or job.epochs} epochs: "
                 f"{job.worker_label} running it is gone (it was killed or its machine restarted). "
                 "No model was saved or activated; start the training again.")
        if DetectorTrainingJob.objects.filter(pk=job.pk, status=DetectorTrainingJob.Status.RUNNING).update(
                status=DetectorTrainingJob.Status.FAILED, error=error, finished=timezone.now()):
            log.warning("detector training job %s: %s", job.pk, error)
            lost.append(job)
    return lost


def cancel_training(job: DetectorTrainingJob) -> DetectorTrainingJob:
    """Ask a running job to stop after the current batch; a queued job is cancelled at once."""
    job._set(cancel_requested=True)
    if job.status == DetectorTrainingJob.Status.QUEUED:
        job.mark_cancelled()
    return job


def _slug(name: str) -> str:
    from django.utils.text import slugify

    return slugify(name) or "detector"


def _unique_detector_name(base: str) -> str:
    name, number = base[:90], 2
    while Detector.objects.filter(name=name).exists():
        name, number = f"{base[:85]} ({number})", number + 1
    return name


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_detector(detector: Detector, source: Path, *, fmt: str, split: str | None = None) -> dict:
    """mAP@0.5, mAP@0.5:0.95 and AP@0.5 per class of `detector` on an annotated folder (or one split of it)."""
    model = _load(detector)
    try:
        result = ml.read_annotations(Path(source), fmt, model.card.classes, max_pixels())
    except ml.DetectionError as error:
        raise DetectionInputError(str(error)) from error
    images = [im for im in result.images if split is None or im.split == split]
    if not images:
        raise DetectionInputError(f"No annotated image{' in split ' + split if split else ''} in {source}.")
    metrics = ml.evaluate(model, images, max_pixels=max_pixels())
    metrics.update({"detector": detector.name, "source": str(source), "split": split or "all",
                    "skipped": result.problems})
    return metrics


DEFAULT_DETECTOR = Path("detector") / "bccd-yolov8n.safetensors"


def setup_demo_detection(demo_folder: Path) -> list[str]:
    """For `setup_demo`: the demo smears as dataset 'Demo BCCD'."""
    if DetectionDataset.objects.filter(name="Demo BCCD").exists():
        return []
    report = import_detections(demo_folder, dataset="Demo BCCD", fmt="voc",
                               source_description="BCCD (10 smears)", licence="MIT")
    return [report.summary().splitlines()[0]]


def install_shipped_detector() -> str:
    """Register the detector shipped in the repository (copied into MODELS_DIR when that lives elsewhere)."""
    weights = Path(settings.BASE_DIR) / "models" / DEFAULT_DETECTOR
    if not weights.is_file():
        return f"No shipped detector at {weights}."
    name = "BCCD YOLOv8n (default)"
    activate = not Detector.objects.filter(is_active=True).exclude(name=name).exists()
    detector = register_detector(weights, name=name, activate=activate)
    return f"Detector {detector.name} registered{' and active' if detector.is_active else ''}."
