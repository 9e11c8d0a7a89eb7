"""Training jobs: start, run (in the worker or the foreground), cancel, resume, detect lost workers; evaluation."""

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from apps.cells.models import Cell, CellType, Dataset
from apps.cells.services import (
    ImportError_,
    label_lookup,
    labelled_entries,
    load_label_map,
    resolve_label,
    upload_limits,
)
from apps.classifiers.models import ModelSet
from apps.classifiers.services import RegistryError, register_model_set
from apps.operations.queue import TRAINING_COMMAND, no_worker_hint
from apps.operations.workers import lower_priority
from hemoweb.ml.data import DataError, assign_splits, training_scale
from hemoweb.ml.evaluate import choose_second_look, evaluate_tree, record_second_look
from hemoweb.ml.familiarity import fit_familiarity, record_familiarity
from hemoweb.ml.infer import TreeClassifier, pick_device
from hemoweb.ml.sources import BadImage, ImageSource, SourceError, open_rgb
from hemoweb.ml.train import (CHECKPOINTS, CellRecord, Progress, TrainConfig, TrainingCancelled, TrainingError,
                              check_config, train_tree)
from hemoweb.ml.weights import SET_CARD, ModelFileError, read_set, write_json, write_set

from .models import TrainingJob

log = logging.getLogger(__name__)
SAVE_EVERY_SECONDS = 2.0
PARAM_NAMES = {f.name for f in fields(TrainConfig)} - {"pretrained_dir"}


class TrainingRequestError(ValueError):
    """A training cannot be started or changed; the message is for the user."""


class EvaluationError(ValueError):
    """An evaluation cannot run (no model set, unreadable source, labels that fit no tree code)."""


def pretrained_dir() -> Path:
    return settings.MODELS_DIR / "pretrained"


def training_config(params: dict) -> TrainConfig:
    """The ML config from a job's params (unknown keys are ignored); pretrained files live under MODELS_DIR."""
    config = TrainConfig(**{key: value for key, value in params.items() if key in PARAM_NAMES})
    config.pretrained_dir = str(pretrained_dir())
    if config.pretrained_file and not Path(config.pretrained_file).is_absolute():
        config.pretrained_file = str(settings.MODELS_DIR / config.pretrained_file)
    return config


def set_folder_for(name: str) -> Path:
    return settings.MODELS_DIR / (slugify(name) or "model-set")


@transaction.atomic
def assign_dataset_splits(dataset: Dataset, *, seed: int = 0) -> dict[str, int]:
    """Give every unassigned cell of `dataset` a split (8/1/1, grouped by patient, else slide); stored on Cell.split.

    Cells that already have a split keep it, so the test cells of earlier trainings stay test cells.
    """
    rows = list(dataset.cells.values_list("pk", "sha256", "cell_type__code", "patient_id", "slide_id", "split"))
    splits = assign_splits(
        keys=[row[1] for row in rows],
        labels=[row[2] for row in rows],
        groups=[f"patient:{row[3]}" if row[3] else (f"slide:{row[4]}" if row[4] else "") for row in rows],
        existing=[row[5] for row in rows],
        seed=seed,
    )
    changed = [Cell(pk=row[0], split=split) for row, split in zip(rows, splits, strict=True) if row[5] != split]
    Cell.objects.bulk_update(changed, ["split"], batch_size=500)
    return dict(Counter(splits))


def cell_records(dataset: Dataset) -> list[CellRecord]:
    cells = dataset.cells.values_list("image", "cell_type__code", "split").order_by("pk")
    return [CellRecord(path=default_storage.path(image), label=code, split=split) for image, code, split in cells]


def start_training(*, dataset: Dataset, name: str, params: dict, user=None, enqueue: bool = True) -> TrainingJob:
    """Validate a training request and queue it on the training cluster."""
    name = name.strip()
    if not name:
        raise TrainingRequestError("Give the model set a name.")
    if ModelSet.objects.filter(name=name).exists() or set_folder_for(name).exists():
        raise TrainingRequestError(f"A model set named {name!r} exists already: choose another name.")
    detect_lost_jobs()
    if TrainingJob.objects.filter(name=name, status__in=TrainingJob.ACTIVE).exists():
        raise TrainingRequestError(f"A training for {name!r} is already queued or running.")
    params = {key: value for key, value in params.items() if key in PARAM_NAMES | {"activate"}}
    try:
        check_config(training_config(params))
        pick_device(params.get("device", "auto"))
    except (TrainingError, RuntimeError) as error:
        raise TrainingRequestError(str(error)) from error
    types = dataset.cells.values("cell_type").distinct().count()
    if types == 0:
        raise TrainingRequestError(f"The dataset {dataset.name} has no images.")
    if types == 1:
        raise TrainingRequestError(f"The dataset {dataset.name} has only one cell type: a classifier needs two.")
    job = TrainingJob.objects.create(name=name, dataset=dataset, params=params, created_by=user)
    job.append_log(f"queued: {params.get('architecture', TrainConfig.architecture)}, "
                   f"mode {params.get('mode', TrainConfig.mode)}, {params.get('epochs', TrainConfig.epochs)} epochs")
    job.save(update_fields=["log"])
    if enqueue:
        transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def _enqueue(job_id: int) -> None:
    from django_q.tasks import async_task

    task_id = async_task("apps.training.tasks.run_training_task", job_id,
                         cluster=settings.HEMOWEB_TRAINING_CLUSTER, task_name=f"training-job-{job_id}")
    TrainingJob.objects.filter(pk=job_id).update(task_id=task_id)


class _Recorder:
    """The training loop's callback: progress, metrics and log onto the job row; raises when cancelled."""

    def __init__(self, job: TrainingJob, echo: Callable[[str], None] | None):
        self.job, self.echo, self.last_save = job, echo, 0.0

    def __call__(self, event: Progress) -> None:
        job = self.job
        if event.message and event.kind != "step":
            job.append_log(event.message)
            if self.echo:
                self.echo(event.message)
        if event.kind == "decode":
            job.progress = {"phase": "decoding images", "step": event.step, "steps": event.steps, "percent": 0}
        elif event.kind in ("step", "epoch"):
            done = (event.epoch - 1 + event.step / max(1, event.steps)) / max(1, event.epochs)
            percent = 100 * (event.node_index - 1 + done) / max(1, event.node_count)
            job.progress = {"phase": "training", "node": event.node, "node_index": event.node_index,
                            "node_count": event.node_count, "epoch": event.epoch, "epochs": event.epochs,
                            "step": event.step, "steps": event.steps, "percent": round(min(percent, 99.0), 1),
                            "loss": round(event.loss, 4) if event.loss is not None else None}
        if event.kind == "epoch":
            history = job.metrics.setdefault("history", {}).setdefault(event.node, [])
            history[:] = [h for h in history if h.get("epoch") != event.epoch] + [event.metrics]
            job.metrics["latest"] = {"node": event.node, **event.metrics}
        elif event.kind == "node":
            job.metrics.setdefault("nodes", {})[event.node] = event.metrics
        now = time.monotonic()
        if event.kind != "step" or now - self.last_save >= SAVE_EVERY_SECONDS:
            self.last_save = now
            self.save()

    def save(self) -> None:
        job = self.job
        job.beat()
        job.save(update_fields=["progress", "metrics", "log", "heartbeat"])
        state = TrainingJob.objects.filter(pk=job.pk).values_list("cancel_requested", "status").first()
        if state is None or state[0] or state[1] == TrainingJob.Status.CANCELLED:
            raise TrainingCancelled()


def run_training_job(job_id: int, *, echo: Callable[[str], None] | None = None) -> TrainingJob:
    """Run a queued job to its end (the worker's task and the CLI both call this); never raises for training errors."""
    # Claim the job with one conditional UPDATE: a second worker (or a cancelled job) finds nothing to do.
    claimed = TrainingJob.claim(job_id, status=TrainingJob.Status.QUEUED, to=TrainingJob.Status.RUNNING)
    job = TrainingJob.objects.select_related("dataset").get(pk=job_id)
    if not claimed:
        log.info("training job %s is %s, not queued: nothing to do", job_id, job.status)
        return job
    job.mark_running()
    niceness = lower_priority(settings.HEMOWEB_TRAINING_NICE)
    job.append_log(f"running on {job.worker_host} (pid {job.worker_pid}, CPU niceness {niceness})")
    job.save()
    recorder = _Recorder(job, echo)
    try:
        if job.params.get("kind") == "adapt":  # an adaptation of a trained set (adaptation.py), on the same queue
            from .adaptation import run_adaptation_job

            run_adaptation_job(job, recorder)
            return job
        config = training_config(job.params)
        splits = assign_dataset_splits(job.dataset, seed=config.seed)
        job.append_log("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
        tree = CellType.objects.as_tree()
        data_info = {"dataset": job.dataset.name, "split_seed": config.seed, "job": job.pk}
        train_tree(tree, cell_records(job.dataset), config, job.work_dir, name=job.name, callback=recorder,
                   data_info=data_info)
        recorder(Progress("log", message="evaluating the whole tree on the test cells"))
        _evaluate_into_set(job.work_dir, job.dataset, tree)
        model_set = _publish(job)
    except TrainingCancelled:
        job.refresh_from_db(fields=["status"])
        job.mark_cancelled()
        job.append_log("checkpoints kept: the job can be resumed")
        job.save()
        return job
    except (TrainingError, RegistryError, ModelFileError, EvaluationError) as error:
        job.mark_failed(str(error))
        job.save()
        return job
    except torch_oom() as error:
        job.mark_failed(f"The GPU ran out of memory ({error}). Lower the batch size or the image size, then resume.")
        job.save()
        return job
    except Exception as error:  # the worker must record every failure on the row a curator reads
        log.exception("training job %s failed", job_id)
        job.mark_failed(f"Unexpected error: {type(error).__name__}: {error}")
        job.save()
        return job
    job.mark_succeeded(model_set)
    job.append_log(f"model set {model_set.name} registered at {model_set.folder}")
    job.save()
    if echo:
        echo(f"Model set {model_set.name} written to {model_set.path}.")
    return job


def torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError


def _evaluate_into_set(folder: Path, dataset: Dataset, tree) -> dict:
    """Whole-tree metrics on the dataset's test cells, stored at the top of set.json's metrics."""
    set_card = read_set(folder)
    items = _dataset_items(dataset, "test")
    if not items:
        return {}
    result = evaluate_tree(TreeClassifier(folder, tree), items)
    set_card.metrics = {**set_card.metrics, **result, "evaluated_on": f"test split of {dataset.name}"}
    write_set(folder, set_card)
    return result


def _dataset_items(dataset: Dataset, split: str) -> list:
    """(image loader, tree code) for the dataset's cells of one split."""
    cells = dataset.cells.filter(split=split).order_by("pk").values_list("image", "cell_type__code")
    return [(_loader(default_storage.path(image)), code) for image, code in cells]


def evaluate_dataset(name: str, *, split: str = "test", models: str | None = None,
                     second_look: int | None = None, um_per_pixel: float | None = None) -> dict:
    """Whole-tree evaluation on a stored dataset's cells of one split (the test cells trainings left out)."""
    dataset = Dataset.objects.filter(name=name).first()
    if dataset is None:
        raise EvaluationError(f"No dataset named {name!r}.")
    folder = model_set_folder(models)
    items = _dataset_items(dataset, split)
    if not items:
        raise EvaluationError(f"Dataset {name} has no {split} cells yet: splits are assigned when a training starts.")
    classifier = _evaluation_classifier(folder, second_look)
    result = evaluate_tree(classifier, items, stated_um_per_px=um_per_pixel)
    result.update(model_set=str(folder), evaluated_on=f"{split} split of {name}")
    return result


def fit_dataset_scale(name: str, *, models: str | None = None) -> tuple[Path, dict]:
    """Measure a set's training scale on a dataset's training cells (its red cells, field and white cells) and write
    it into every card of the set: from then on the set resamples other labs' images to it.

    Cross-lab trainings do this themselves; this serves sets trained before, and re-measures after the
    measurement itself improves. Returns (set folder, the scale card).
    """
    dataset = Dataset.objects.filter(name=name).first()
    if dataset is None:
        raise EvaluationError(f"No dataset named {name!r}.")
    folder = model_set_folder(models)
    paths = [default_storage.path(image) for image in dataset.cells.filter(split="train").values_list("image", flat=True)]
    if not paths:
        raise EvaluationError(f"Dataset {name} has no train cells yet: splits are assigned when a training starts.")
    try:
        scale = training_scale(paths).as_card()
    except DataError as error:
        raise EvaluationError(str(error)) from error
    for card_path in sorted(folder.glob("*.json")):
        data = json.loads(card_path.read_text())
        if card_path.name != SET_CARD and data.get("format", "").startswith("hemoweb-node"):
            write_json(card_path, {**data, "scale": scale})
    set_card = read_set(folder)
    set_card.data = {**set_card.data, "scale": {**scale, "measured_on": f"train split of {name}"}}
    write_set(folder, set_card)  # a new set.json: running servers renew the set
    return folder, scale


def choose_dataset_second_look(name: str, *, models: str | None = None) -> tuple[Path, int, dict[int, float]]:
    """Choose a set's second look on a dataset's validation cells and store it in set.json (and the registry).

    For sets trained before trainings chose it themselves. Returns (set folder, views, accuracy per option).
    """
    dataset = Dataset.objects.filter(name=name).first()
    if dataset is None:
        raise EvaluationError(f"No dataset named {name!r}.")
    folder = model_set_folder(models)
    items = _dataset_items(dataset, "val")
    if not items:
        raise EvaluationError(f"Dataset {name} has no val cells yet: splits are assigned when a training starts.")
    classifier = _evaluation_classifier(folder, None)
    views, scores = choose_second_look(classifier, [load() for load, _ in items], [code for _, code in items])
    set_card = read_set(folder)
    record_second_look(set_card, views, scores, chosen_on=f"val split of {name}")
    write_set(folder, set_card)
    for model_set in ModelSet.objects.all():
        if model_set.path.resolve() == folder.resolve():
            model_set.card = {**model_set.card, "second_look": views}
            model_set.metrics = {**model_set.metrics, "second_look_choice": set_card.metrics["second_look_choice"]}
            model_set.save(update_fields=["card", "metrics"])
    return folder, views, scores


def fit_dataset_familiarity(name: str, *, models: str | None = None) -> tuple[Path, dict]:
    """Fit a shared-backbone set's familiarity statistics on a dataset's train cells, choose their threshold on its
    val cells, and name them in set.json (and the registry).

    Shared-backbone trainings do this themselves; this serves sets trained before. The cells go through the
    classifier's own preprocessing (scale, white balance). Returns (set folder, the familiarity card).
    """
    dataset = Dataset.objects.filter(name=name).first()
    if dataset is None:
        raise EvaluationError(f"No dataset named {name!r}.")
    folder = model_set_folder(models)
    train, val = _dataset_items(dataset, "train"), _dataset_items(dataset, "val")
    if not train or not val:
        raise EvaluationError(f"Dataset {name} has no train or no val cells yet: splits are assigned when a "
                              "training starts.")
    classifier = _evaluation_classifier(folder, None, familiarity=False)  # earlier statistics are being replaced
    if not classifier.shared:
        raise EvaluationError(f"The model set in {folder} has one network per node: familiarity statistics need a "
                              "set whose nodes share one backbone (train it with a shared backbone).")
    try:
        card = fit_familiarity(classifier, [load for load, _ in train], [code for _, code in train],
                               [load for load, _ in val], val_labels=[code for _, code in val],
                               fitted_on=f"train split of {name}",
                               threshold_on=f"val split of {name}")
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    set_card = read_set(folder)
    record_familiarity(set_card, card)
    write_set(folder, set_card)  # a new set.json: running servers renew the set
    for model_set in ModelSet.objects.all():
        if model_set.path.resolve() == folder.resolve():
            model_set.card = {**model_set.card, "familiarity": set_card.familiarity}
            model_set.metrics = {**model_set.metrics, "familiarity": set_card.metrics["familiarity"]}
            model_set.save(update_fields=["card", "metrics"])
    return folder, card


def _evaluation_classifier(folder: Path, second_look: int | None, familiarity: bool = True) -> TreeClassifier:
    """The set's classifier, every node loaded; second_look (views) overrides the set's own when given.
    Without `familiarity` the set's familiarity statistics are left out (not loaded, not checked)."""
    try:
        classifier = TreeClassifier(folder, CellType.objects.as_tree(), second_look=second_look)
        if not familiarity:
            classifier.set_card.familiarity = ""
        classifier.check()
    except (ModelFileError, ValueError) as error:
        raise EvaluationError(str(error)) from error
    return classifier


def _loader(path: str):
    def load():
        from PIL import Image

        with Image.open(path) as image:
            return image.convert("RGB")
    return load


def _publish(job: TrainingJob) -> ModelSet:
    """Move the finished set from the work folder to MODELS_DIR/<name> and register it (activated only if asked)."""
    target = set_folder_for(job.name)
    if target.exists():
        raise TrainingError(f"The folder {target} appeared while training: the set stays in {job.work_dir}.")
    shutil.rmtree(job.work_dir / CHECKPOINTS, ignore_errors=True)
    os.replace(job.work_dir, target)
    return register_model_set(target, name=job.name, activate=bool(job.params.get("activate")))


def cancel_job(job: TrainingJob) -> TrainingJob:
    """Queued jobs stop at once; a running job stops at its next progress report and keeps its checkpoints."""
    if job.status == TrainingJob.Status.QUEUED:
        updated = TrainingJob.objects.filter(pk=job.pk, status=TrainingJob.Status.QUEUED).update(
            status=TrainingJob.Status.CANCELLED, finished=timezone.now(), cancel_requested=True)
        if updated:
            job.refresh_from_db()
            job.append_log("cancelled before it started")
            job.save(update_fields=["log"])
            return job
    if job.status == TrainingJob.Status.RUNNING:
        TrainingJob.objects.filter(pk=job.pk).update(cancel_requested=True)
        job.refresh_from_db()
        return job
    raise TrainingRequestError(f"This job is {job.get_status_display().lower()}: there is nothing to cancel.")


def resume_job(job: TrainingJob, *, enqueue: bool = True) -> TrainingJob:
    """Queue a failed or cancelled job again; it continues from its finished nodes and last epoch checkpoint."""
    if not job.can_resume:
        raise TrainingRequestError("Only a failed or cancelled job whose work folder still exists can be resumed.")
    job.status, job.cancel_requested, job.error, job.finished = TrainingJob.Status.QUEUED, False, "", None
    job.append_log("resumed: queued again")
    job.save()
    if enqueue:
        transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def detect_lost_jobs() -> list[TrainingJob]:
    """Mark running jobs whose worker is gone (dead process on this host, or silent too long) as failed."""
    lost = []
    for job in list(TrainingJob.objects.filter(status=TrainingJob.Status.RUNNING)):
        if not job.is_lost(settings.HEMOWEB_TRAINING_STALE_SECONDS):
            continue
        where = job.progress.get("node")
        position = f" at node {where}, epoch {job.progress.get('epoch')}" if where else ""
        job.mark_failed(
            f"The worker running this job stopped{position} (it was killed or its machine restarted). "
            "Nothing already trained is lost: resume the job to continue from its last epoch checkpoint.")
        updated = TrainingJob.objects.filter(pk=job.pk, status=TrainingJob.Status.RUNNING).update(
            status=job.status, error=job.error, finished=job.finished, log=job.log)
        if updated:
            lost.append(job)
    return lost


def queue_hint(job: TrainingJob) -> str:
    """What a queued job's page says once it has waited a while: behind which job, or which worker to start."""
    if job.status != TrainingJob.Status.QUEUED:
        return ""
    ahead = TrainingJob.objects.filter(status=TrainingJob.Status.RUNNING).exclude(pk=job.pk).first()
    if ahead is not None:
        return f"Waiting behind training #{ahead.pk} ({ahead.name}): the training worker runs one job at a time."
    return no_worker_hint("training", settings.HEMOWEB_TRAINING_CLUSTER, job.created, TRAINING_COMMAND)


# --- evaluation -----------------------------------------------------------------------------------


def model_set_folder(models: str | None) -> Path:
    """A set's name, or its folder under MODELS_DIR (or any folder); without one, the active set."""
    if not models:
        active = ModelSet.objects.active()
        if active is None:
            raise EvaluationError("No model set is active: name one with --models.")
        return active.path
    found = ModelSet.objects.filter(name=models).first()
    if found:
        return found.path
    for candidate in (settings.MODELS_DIR / models, Path(models)):
        if (candidate / "set.json").is_file():
            return candidate
    raise EvaluationError(f"No model set named {models!r} and no set.json in {settings.MODELS_DIR / models}.")


def evaluate_source(source: Path | str, *, models: str | None = None, labels_csv: bytes | None = None,
                    label_map_csv: bytes | None = None, second_look: int | None = None,
                    um_per_pixel: float | None = None) -> dict:
    """Whole-tree evaluation of a labelled folder or .zip (the import_cells layouts) with a model set."""
    folder = model_set_folder(models)
    lookup = label_lookup(CellType.objects.all())
    try:
        label_map = load_label_map(label_map_csv)
    except ImportError_ as error:
        raise EvaluationError(str(error)) from error
    classifier = _evaluation_classifier(folder, second_look)
    limits = upload_limits()
    try:
        with ImageSource(source, limits) as image_source:
            entries, skipped = labelled_entries(image_source, labels_csv)
            items, unknown = [], Counter()
            for path, raw, _ in entries:
                code = resolve_label(raw, label_map, lookup)
                if code is None:
                    unknown[raw] += 1
                    continue
                items.append((_source_loader(image_source, path, limits.max_pixels), code))
            if not items:
                detail = f" Unknown labels: {', '.join(sorted(unknown))}." if unknown else ""
                raise EvaluationError(f"No labelled images to evaluate in {source}.{detail}")
            result = evaluate_tree(classifier, items, stated_um_per_px=um_per_pixel)
    except (SourceError, ImportError_) as error:
        raise EvaluationError(str(error)) from error
    result["skipped"] = len(skipped) + sum(unknown.values())
    result["unknown_labels"] = dict(unknown)
    result["model_set"] = str(folder)
    return result


def _source_loader(source: ImageSource, path: str, max_pixels: int):
    def load():
        try:
            return open_rgb(source.read(path), max_pixels)
        except BadImage as error:
            raise EvaluationError(f"{PurePosixPath(path).name}: {error}") from error
    return load


# --- reads for the pages --------------------------------------------------------------------------


def comparison_table() -> dict:
    """Rows: tree nodes and 'all'; columns: architecture × mode (latest set of each); cells: accuracy, macro-F1 and
    the number of test cells they were measured on (n).

    A set whose nodes share one backbone is its own column ("pretrained_aug, shared backbone").
    """
    columns: dict[tuple[str, str], ModelSet] = {}
    for model_set in ModelSet.objects.order_by("created"):
        shared = ", shared backbone" if (model_set.card or {}).get("backbone") else ""
        columns[(model_set.architecture, model_set.mode + shared)] = model_set
    keys = sorted(columns)
    order = list(CellType.objects.values_list("code", flat=True))
    nodes = sorted({node for s in columns.values() for node in s.metrics.get("nodes", {})},
                   key=lambda code: order.index(code) if code in order else 10**6)
    rows = []
    for node in nodes + ["all"]:
        cells = []
        for key in keys:
            metrics = columns[key].metrics
            value = metrics.get("nodes", {}).get(node) if node != "all" else (
                {"accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"), "n": metrics.get("n")}
                if "accuracy" in metrics else None)
            cells.append(value)
        rows.append({"node": node, "cells": cells})
    return {"columns": [{"architecture": a, "mode": m, "set": columns[(a, m)]} for a, m in keys], "rows": rows}


def job_params_from_form(data: dict) -> dict:
    params = {key: data[key] for key in ("architecture", "mode", "epochs", "image_size", "batch_size", "device",
                                         "seed", "min_images") if data.get(key) not in (None, "")}
    if data.get("nodes"):
        params["nodes"] = list(data["nodes"])
    params["activate"] = bool(data.get("activate"))
    params["shared_backbone"] = bool(data.get("shared_backbone"))
    return params


def asdict_config(job: TrainingJob) -> dict:
    return asdict(training_config(job.params))
