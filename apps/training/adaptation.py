"""Adapting a model set to a lab's own cells (hemoweb/ml/adapt.py), from a folder/zip or a stored dataset.

The lab's labelled cells are split (by patient or slide when known) into cells to adapt on and cells kept aside;
the set is scored before and after on those kept aside and on its original test cells (the test split of the
dataset its cards name), and registered, never activated, only when it is better on the lab's cells and loses no
more than 1 point on the original ones. A refused or cancelled adaptation leaves nothing registered.
"""

import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage

from apps.cells.models import CellType, Dataset
from apps.cells.services import ImportError_, label_lookup, labelled_entries, load_label_map, resolve_label, upload_limits
from apps.classifiers.models import ModelSet
from apps.classifiers.services import register_model_set
from hemoweb.ml.adapt import MODES, AdaptConfig, AdaptError, LabCell, adapt_set, select_lab_cells, split_lab_cells
from hemoweb.ml.sources import BadImage, ImageSource, SourceError, open_rgb
from hemoweb.ml.train import Progress, TrainingCancelled
from hemoweb.ml.weights import read_card, read_set

from .services import EvaluationError, _loader, model_set_folder, set_folder_for


class AdaptationError(ValueError):
    """An adaptation cannot run or was refused; the message is for a lab user (with the numbers when refused)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lab_cells_from_source(source: Path | str, *, labels_csv: bytes | None = None,
                          label_map_csv: bytes | None = None) -> tuple[list[LabCell], dict[str, int]]:
    """A labelled folder or .zip (the import_cells layouts) as LabCells, and the labels no tree code fits (skipped).

    The images are read once here (for their sha256) and kept as bytes: a zip is closed after this."""
    lookup = label_lookup(CellType.objects.all())
    limits = upload_limits()
    try:
        label_map = load_label_map(label_map_csv)
        with ImageSource(source, limits) as image_source:
            entries, _ = labelled_entries(image_source, labels_csv)
            cells, unknown = [], Counter()
            for path, raw, extra in entries:
                code = resolve_label(raw, label_map, lookup)
                if code is None:
                    unknown[raw] += 1
                    continue
                data = image_source.read(path)
                group = (extra or {}).get("patient_id") or (extra or {}).get("slide_id") or ""
                cells.append(LabCell(_bytes_loader(data, limits.max_pixels, path), code, _sha256(data), group))
    except (SourceError, ImportError_) as error:
        raise AdaptationError(str(error)) from error
    return cells, dict(unknown)


def _bytes_loader(data: bytes, max_pixels: int, path: str):
    def load():
        try:
            return open_rgb(data, max_pixels)
        except BadImage as error:
            raise AdaptationError(f"{Path(path).name}: {error}") from error
    return load


def lab_cells_from_dataset(name: str) -> list[LabCell]:
    dataset = Dataset.objects.filter(name=name).first()
    if dataset is None:
        raise AdaptationError(f"No dataset named {name!r}.")
    rows = dataset.cells.order_by("pk").values_list("image", "cell_type__code", "sha256", "patient_id", "slide_id")
    return [LabCell(_loader(default_storage.path(image)), code, sha,
                    f"patient:{patient}" if patient else (f"slide:{slide}" if slide else ""))
            for image, code, sha, patient, slide in rows]


def original_cells(folder: Path) -> dict:
    """The set's own cells, from the dataset its cards name: train (replayed), val (familiarity threshold), test
    (scored before and after) and the sha256 of its train and val cells (left out of the lab's cells)."""
    set_card = read_set(folder)
    backbone = read_card(folder / set_card.backbone) if set_card.backbone else None
    name = (set_card.data or {}).get("dataset") or (backbone.data.get("dataset") if backbone else "")
    dataset = Dataset.objects.filter(name=name).first() if name else None
    found = {"dataset": name or "", "available": dataset is not None, "train": [], "val": [], "test": [],
             "training_sha256": set()}
    if dataset is None:
        return found
    for image, code, split, sha in dataset.cells.filter(split__in=("train", "val", "test")).values_list(
            "image", "cell_type__code", "split", "sha256").order_by("pk"):
        found[split].append((_loader(default_storage.path(image)), code))
        if split in ("train", "val"):
            found["training_sha256"].add(sha)
    return found


def adapt_model_set(*, from_set: str | None, name: str, source: Path | str | None = None,
                    dataset: str | None = None, labels_csv: bytes | None = None, label_map_csv: bytes | None = None,
                    mode: str = "heads", seed: int = 0, per_type: int = 0, fraction: float = 0.5,
                    work_dir: Path | None = None, callback: Callable[[Progress], None] | None = None,
                    ) -> tuple[ModelSet, dict]:
    """Adapt `from_set` to a lab's labelled cells and register the result as `name` (never activated).

    Raises AdaptationError with the numbers when the adapted set is refused; a cancel raised by `callback`
    (TrainingCancelled) leaves nothing behind."""
    name = name.strip()
    if not name:
        raise AdaptationError("Give the adapted set a name.")
    if mode not in MODES:
        raise AdaptationError(f"Unknown adaptation mode {mode!r}: use one of {', '.join(MODES)}.")
    target = set_folder_for(name)
    if ModelSet.objects.filter(name=name).exists() or target.exists():
        raise AdaptationError(f"A model set named {name!r} exists already: choose another name.")
    if bool(source) == bool(dataset):
        raise AdaptationError("Give either a folder or .zip of the lab's cells, or a stored dataset.")
    try:
        folder = model_set_folder(from_set)
    except EvaluationError as error:
        raise AdaptationError(str(error)) from error
    tree = CellType.objects.as_tree()
    unknown: dict[str, int] = {}
    if source:
        cells, unknown = lab_cells_from_source(source, labels_csv=labels_csv, label_map_csv=label_map_csv)
    else:
        cells = lab_cells_from_dataset(dataset)
    original = original_cells(folder)
    set_card = read_set(folder)
    known = {code for node in set_card.nodes for code in read_card(folder / set_card.nodes[node]).classes}
    try:
        selection = select_lab_cells(tree, cells, known, original["training_sha256"])
    except AdaptError as error:
        detail = f" Labels no tree code fits (skipped): {', '.join(sorted(unknown))}." if unknown else ""
        raise AdaptationError(f"{error}{detail}") from error
    selection.unknown_labels = {**unknown, **selection.unknown_labels}
    adapt, aside = split_lab_cells(selection.cells, per_type=per_type, fraction=fraction, seed=seed)
    work = Path(work_dir) if work_dir else settings.MODELS_DIR / ".adapting" / target.name
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    notes = [] if original["available"] else [
        f"the set's own dataset ({original['dataset'] or 'not named in its cards'}) is not in this database: its "
        "original test cells could not be scored and none of its training cells were replayed"]
    try:
        report = adapt_set(folder, work, tree, cells=adapt, aside=aside, unlabelled=selection.unlabelled,
                           replay=original["train"], replay_val=original["val"], original_test=original["test"],
                           config=AdaptConfig(mode=mode, seed=seed), name=name, callback=callback,
                           data_info={"selection": selection.as_dict(), "notes": notes,
                                      "lab_source": str(source or f"dataset {dataset}")})
    except AdaptError as error:
        raise AdaptationError(str(error)) from error
    if not report["accepted"]:
        shutil.rmtree(work, ignore_errors=True)
        raise AdaptationError("The adapted set was refused: " + "; ".join(report["reasons"]) + ".", report)
    os.replace(work, target)
    return register_model_set(target, name=name, activate=False), report


def describe(report: dict) -> list[str]:
    """The report's numbers as lines for a person (the command and the job log print them)."""
    lines = []
    for key, title in (("lab", "lab cells kept aside"), ("original_test", "original test cells")):
        b, a = report.get("before", {}).get(key), report.get("after", {}).get(key)
        if b and a:
            lines.append(f"{title} (n {a['n']}): balanced accuracy {b['balanced_accuracy']:.4f} -> "
                         f"{a['balanced_accuracy']:.4f}; forced 8 classes {b['forced_coarse8_balanced_accuracy']:.4f}"
                         f" -> {a['forced_coarse8_balanced_accuracy']:.4f}; coverage {b['coverage']:.3f} -> "
                         f"{a['coverage']:.3f}")
        elif key == "original_test":
            lines.append("original test cells: not scored (the set's dataset is not in this database)")
    selection = report.get("selection", {})
    if selection.get("unknown_labels"):
        lines.append("skipped, labels the tree does not know: " + ", ".join(
            f"{label} ({n})" for label, n in sorted(selection["unknown_labels"].items())))
    for code, info in (selection.get("too_few") or {}).items():
        lines.append(f"skipped type {code}: {info['reason']}")
    if selection.get("training_overlap"):
        lines.append(f"left out: {selection['training_overlap']} cells that are training cells of the set (sha256)")
    return lines


# --- as a background job on the training queue ------------------------------------------------------------

ADAPT = "adapt"  # TrainingJob.params["kind"] of an adaptation


def start_adaptation(*, dataset: Dataset, from_set: ModelSet, name: str, mode: str = "heads", per_type: int = 0,
                     seed: int = 0, user=None, enqueue: bool = True):
    """Validate an adaptation request and queue it as a TrainingJob on the training cluster."""
    from django.db import transaction

    from .models import TrainingJob
    from .services import _enqueue, detect_lost_jobs

    name = name.strip()
    if not name:
        raise AdaptationError("Give the adapted set a name.")
    if mode not in MODES:
        raise AdaptationError(f"Unknown adaptation mode {mode!r}: use one of {', '.join(MODES)}.")
    if ModelSet.objects.filter(name=name).exists() or set_folder_for(name).exists():
        raise AdaptationError(f"A model set named {name!r} exists already: choose another name.")
    detect_lost_jobs()
    if TrainingJob.objects.filter(name=name, status__in=TrainingJob.ACTIVE).exists():
        raise AdaptationError(f"A job for {name!r} is already queued or running.")
    if not (from_set.card or {}).get("backbone"):
        raise AdaptationError(f"{from_set.name} has one network per node: adaptation needs a set whose nodes share "
                              "one backbone.")
    if dataset.cells.values("cell_type").distinct().count() < 2:
        raise AdaptationError(f"The dataset {dataset.name} has fewer than two cell types: an adaptation needs two.")
    params = {"kind": ADAPT, "from_set": from_set.name, "mode": mode, "per_type": int(per_type), "seed": int(seed)}
    job = TrainingJob.objects.create(name=name, dataset=dataset, params=params, created_by=user)
    job.append_log(f"queued: adapt {from_set.name} ({mode} mode) to the cells of {dataset.name}")
    job.save(update_fields=["log"])
    if enqueue:
        transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def run_adaptation_job(job, recorder) -> None:
    """The adaptation of a claimed, running job (services.run_training_job calls this); records the outcome.

    It starts over when resumed (minutes); its work folder stays on cancel so that it can be resumed."""
    job.work_dir.mkdir(parents=True, exist_ok=True)
    params = job.params
    try:
        model_set, report = adapt_model_set(
            from_set=params["from_set"], name=job.name, dataset=job.dataset.name, mode=params.get("mode", "heads"),
            per_type=params.get("per_type", 0), seed=params.get("seed", 0), work_dir=job.work_dir / "set",
            callback=recorder)
    except TrainingCancelled:
        job.refresh_from_db(fields=["status"])
        job.mark_cancelled()
        job.append_log("nothing registered: resume the job to adapt again")
        job.save()
        return
    except AdaptationError as error:
        job.metrics = {**job.metrics, "adaptation": error.report}
        for line in describe(error.report):
            job.append_log(line)
        job.mark_failed(str(error))
        job.save()
        return
    job.metrics = {**job.metrics, "adaptation": report}
    for line in describe(report):
        job.append_log(line)
    shutil.rmtree(job.work_dir, ignore_errors=True)
    job.mark_succeeded(model_set)
    job.append_log(f"model set {model_set.name} registered at {model_set.folder} (not activated)")
    job.save()
