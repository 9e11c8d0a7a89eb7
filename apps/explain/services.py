"""Explaining a cell: find or make the cached explanation, inline when cheap, on the queue when not.

An explanation is identified by (weights file and its mtime, image sha256, method, settings, class):
the `key` column is unique, so two identical requests at once end up on one row and only the
request that created the row (or the queue worker) computes it — the other one joins and polls.
"""

import hashlib
import io
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from django.apps import apps
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from apps.cells.models import Cell
from apps.classifiers.models import ModelSet, TrainedModel
from hemoweb.ml.explain import (
    METHODS,
    ExplainError,
    estimate_cost,
    explain,
    model_seconds_per_image,
    render,
    resolve_settings,
)
from hemoweb.ml.sources import BadImage, check_image, open_rgb
from hemoweb.ml.weights import ModelFileError, cached_model

from .models import Explanation

log = logging.getLogger(__name__)

FILES_DIR = "explanations"
TASK = "apps.explain.tasks.run_explanation"


def inline_seconds() -> float:
    """Requests expected to finish within this run in the web request; longer ones go to the queue."""
    return float(getattr(settings, "HEMOWEB_EXPLAIN_INLINE_SECONDS", 2.0))


def warn_seconds() -> float:
    return float(getattr(settings, "HEMOWEB_EXPLAIN_WARN_SECONDS", 60.0))


def max_seconds() -> float:
    """Requests expected to take longer than this are refused."""
    return float(getattr(settings, "HEMOWEB_EXPLAIN_MAX_SECONDS", 600.0))


@dataclass
class Outcome:
    explanation: Explanation
    cached: bool = False  # an earlier result was reused
    joined: bool = False  # the same explanation was already being computed
    queued: bool = False  # sent to the background queue
    estimate_seconds: float = 0.0


# ----------------------------------------------------------------------------------------- timings

RECENT = 20  # the page's promise: the median of this many recent explanations per method


def typical_seconds(model: TrainedModel | None) -> list[dict]:
    """How long each method takes with its default settings for `model`, for the page to promise.

    Measured: the median of the last RECENT finished explanations with those settings (curves included).
    A method never run here gets the estimate from the passes it needs and one timed pass through the model.
    """
    if model is None:
        return []
    timings, timed_pass = [], None
    for method, label in METHODS.items():
        defaults = resolve_settings(method, model.input_size)
        rows = (Explanation.objects.filter(model=model, method=method, status=Explanation.Status.DONE,
                                           seconds__isnull=False)
                .order_by("-finished").values_list("settings", "seconds")[:5 * RECENT])
        measured = [seconds for used, seconds in rows if used == defaults][:RECENT]
        if measured:
            timings.append({"method": method, "label": label, "seconds": statistics.median(measured),
                            "n": len(measured), "measured": True})
            continue
        if timed_pass is None:
            try:
                net, card = _load(model)
            except ExplainError:
                continue
            timed_pass = model_seconds_per_image(net, card.input_size)
        timings.append({"method": method, "label": label, "measured": False, "n": 0,
                        "seconds": estimate_cost(method, defaults, model.input_size, timed_pass).seconds})
    return timings


# ----------------------------------------------------------------------------------------- models


def as_id(value) -> int | None:
    """A database id from user input, or None (no overflow errors from absurd numbers)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < 2**62 else None


def explainable_models():
    """Ready node classifiers: the active set's first, then the others by set and node."""
    return (TrainedModel.objects.filter(status=TrainedModel.Status.READY)
            .select_related("node", "model_set", "architecture")
            .order_by("-model_set__is_active", "model_set__name", "node__order", "id"))


def default_model() -> TrainedModel | None:
    """The active set's classifier at the top of the tree (the first cut every cell goes through)."""
    active = ModelSet.objects.active()
    models = explainable_models()
    if active:
        in_set = models.filter(model_set=active)
        return in_set.filter(node__parent__isnull=True).first() or in_set.first()
    return models.first()


def resolve_model(*, model_id: int | str | None = None, node: str | None = None) -> TrainedModel:
    """A model by id, or the classifier of tree node `node` (the active set's, else the newest)."""
    if model_id not in (None, ""):
        model = explainable_models().filter(pk=as_id(model_id)).first() if as_id(model_id) else None
        if model is None:
            raise ExplainError(f"There is no ready model with id {model_id}.")
        return model
    if node:
        candidates = explainable_models().filter(node__code=node)
        active = ModelSet.objects.active()
        in_active = candidates.filter(model_set=active).first() if active else None
        model = in_active or candidates.order_by("-created").first()
        if model is None:
            raise ExplainError(f"No trained model classifies tree node {node!r}.")
        return model
    model = default_model()
    if model is None:
        raise ExplainError("No trained model is registered yet: a curator has to train or register a model set first.")
    return model


def model_classes(model: TrainedModel) -> list[str]:
    return [output.cell_type.code for output in model.outputs.select_related("cell_type").order_by("output_index")]


def _load(model: TrainedModel):
    path = model.weights_path
    if not path.is_file():
        raise ExplainError(f"The weights file of model “{model.name}” is missing ({path}). "
                           "A curator has to register or retrain this model set again.")
    try:
        return cached_model(path)
    except ModelFileError as error:
        raise ExplainError(f"Model “{model.name}” cannot be loaded: {error}") from error


# ----------------------------------------------------------------------------------------- images


def classified_cell(classified_id: int | str | None):
    """A cell of a classification run (apps.analysis, when installed), or None."""
    if as_id(classified_id) is None or not apps.is_installed("apps.analysis"):
        return None
    from apps.analysis.models import ClassifiedCell

    return ClassifiedCell.objects.select_related("model_set").filter(pk=as_id(classified_id)).first()


def decision_of(classified) -> tuple[TrainedModel | None, str]:
    """The last decision made for a classified cell: the classifier of that node and the class it chose."""
    steps = classified.path or []
    if not steps:
        return None, ""
    node, code = steps[-1].get("node", ""), steps[-1].get("code", "")
    model = None
    if classified.model_set_id:
        model = explainable_models().filter(model_set_id=classified.model_set_id, node__code=node).first()
    if model is None:
        try:
            model = resolve_model(node=node)
        except ExplainError:
            model = None
    return model, code


def _stored_bytes(field_file, what: str) -> bytes:
    """A stored image read through its own handle (model instances may be shared between threads)."""
    try:
        with field_file.storage.open(field_file.name, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, OSError) as error:
        raise ExplainError(f"The image of {what} is missing from storage ({error}).") from error


def _image_bytes(*, cell: Cell | None, upload: bytes | None, classified=None) -> tuple[bytes, str]:
    for row, what in ((classified, f"classified cell {getattr(classified, 'pk', '')}"),
                      (cell, f"cell {getattr(cell, 'pk', '')}")):
        if row is not None:
            data = _stored_bytes(row.image, what)
            return data, row.sha256 or hashlib.sha256(data).hexdigest()
    if not upload:
        raise ExplainError("Choose an image: upload one or give the id of a cell.")
    try:
        check_image(upload, settings.HEMOWEB_MAX_IMAGE_PIXELS)
    except BadImage as error:
        raise ExplainError(f"The uploaded file cannot be explained: {error}.") from error
    return upload, hashlib.sha256(upload).hexdigest()


def _store_input(data: bytes, sha: str) -> str:
    """Keep the explained image (the queue worker reads it later); one file per content."""
    name = f"{FILES_DIR}/inputs/{sha[:2]}/{sha}.img"
    if not default_storage.exists(name):
        name = default_storage.save(name, ContentFile(data))
    return name


def explanation_key(*, weights: Path, mtime: float, image_sha: str, method: str, resolved: dict, target: str) -> str:
    material = json.dumps({"weights": str(Path(weights).resolve()), "mtime": mtime, "image": image_sha,
                           "method": method, "settings": resolved, "target": target}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


# ----------------------------------------------------------------------------------------- request


def request_explanation(
    *,
    model: TrainedModel,
    method: str,
    settings_: dict | None = None,
    target: str = "",
    cell: Cell | None = None,
    upload: bytes | None = None,
    classified=None,
    user=None,
    inline: bool | None = None,
) -> Outcome:
    """Find or make the explanation. `inline=None` decides by the cost estimate; True computes now."""
    resolved = resolve_settings(method, model.input_size, **(settings_ or {}))
    target = (target or "").strip()
    classes = model_classes(model)
    if target and target not in classes:
        raise ExplainError(f"Class {target!r} is not an output of the {model.node.code} classifier; "
                           f"choose one of: {', '.join(classes)}.")
    weights = model.weights_path
    if not weights.is_file():
        _load(model)  # raises the clear message
    data, sha = _image_bytes(cell=cell, upload=upload, classified=classified)
    key = explanation_key(weights=weights, mtime=weights.stat().st_mtime, image_sha=sha, method=method,
                          resolved=resolved, target=target)

    existing = Explanation.objects.filter(key=key).first()
    if existing and existing.finished_ok and existing.files_present():
        return Outcome(existing, cached=True)
    if existing and existing.pending and not _stale(existing):
        return Outcome(existing, joined=True)

    net, card = _load(model)
    cost = estimate_cost(method, resolved, card.input_size, model_seconds_per_image(net, card.input_size))
    if cost.seconds > max_seconds():
        raise ExplainError(
            f"These settings would take about {_duration(cost.seconds)} ({cost.passes} passes through the model); "
            f"the limit is {_duration(max_seconds())}. Use fewer steps or a larger window and stride.")
    run_now = inline if inline is not None else cost.seconds <= inline_seconds()
    warning = ""
    if cost.seconds > warn_seconds():
        warning = f"This explanation takes about {_duration(cost.seconds)}; it runs in the background."

    image_name = _store_input(data, sha)
    with transaction.atomic():
        row, created = Explanation.objects.get_or_create(key=key, defaults={
            "model": model, "weights_file": str(weights), "weights_mtime": weights.stat().st_mtime,
            "node": model.node.code, "cell": cell, "image": image_name,
            "classified_cell_id": classified.pk if classified is not None else None, "image_sha256": sha,
            "method": method,
            "settings": resolved, "target": target, "estimated_seconds": cost.seconds, "warning": warning,
            "requested_by": user if user is not None and user.is_authenticated else None,
        })
    if not created:
        # A failed (or cleaned-up) explanation is tried again, by whoever resets it first.
        if (row.pending and not _stale(row)) or not Explanation.objects.filter(pk=row.pk, status=row.status).update(
                status=Explanation.Status.QUEUED, progress=0.0, error="", warning=warning,
                estimated_seconds=cost.seconds):
            row.refresh_from_db()
            return Outcome(row, joined=True)
        row.refresh_from_db()
    if run_now:
        compute(row)
        return Outcome(row, estimate_seconds=cost.seconds)
    _enqueue(row)
    return Outcome(row, queued=True, estimate_seconds=cost.seconds)


def _stale(row: Explanation) -> bool:
    """A computation that has run far longer than estimated lost its worker (killed): start it again."""
    if row.status != Explanation.Status.RUNNING or row.started is None:
        return False
    allowed = max(600.0, 10 * row.estimated_seconds)
    return (timezone.now() - row.started).total_seconds() > allowed


def _enqueue(row: Explanation) -> None:
    from django_q.tasks import async_task

    async_task(TASK, row.pk, task_name=f"explain-{row.pk}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} minutes"


# ----------------------------------------------------------------------------------------- compute


def compute(row: Explanation) -> Explanation:
    """Compute a queued explanation (once: a row someone else already took is left alone)."""
    if not row.claim():
        row.refresh_from_db()
        return row
    try:
        model = row.model
        if model is None:
            raise ExplainError("The model of this explanation has been deleted.")
        net, card = _load(model)
        with row.image.open("rb") as handle:
            image = open_rgb(handle.read(), settings.HEMOWEB_MAX_IMAGE_PIXELS)
        last = [0.0]

        def progress(fraction: float) -> None:
            now = time.monotonic()
            if now - last[0] > 0.5:  # one small UPDATE twice a second at most
                last[0] = now
                Explanation.objects.filter(pk=row.pk).update(progress=fraction)

        attribution = explain(net, image, row.method, row.target or None, card=card, progress=progress, **row.settings)
        probability = attribution.probabilities[attribution.target]
        title = f"{METHODS[row.method]} · node {card.node}: class {attribution.target_code} ({probability:.0%})"
        overlay, figure = render(attribution, image, title)
        base = f"{FILES_DIR}/{row.key[:2]}/{row.key}"
        row.overlay.name = _save_png(f"{base}-overlay.png", overlay)
        row.figure.name = _save_png(f"{base}-figure.png", figure)
        row.summary = attribution.summary()
        row.seconds = attribution.seconds
        row.status, row.progress, row.finished = Explanation.Status.DONE, 1.0, timezone.now()
        row.save(update_fields=["overlay", "figure", "summary", "seconds", "status", "progress", "finished"])
    except (ExplainError, BadImage, ModelFileError, OSError) as error:
        row.mark_failed(str(error))
    except Exception as error:  # a bug must not leave the row "running" forever; it is logged in full
        log.exception("Explanation %s failed", row.pk)
        row.mark_failed(f"Unexpected error: {error}")
    return row


def _save_png(name: str, image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    if default_storage.exists(name):
        default_storage.delete(name)
    return default_storage.save(name, ContentFile(buffer.getvalue()))


def run_queued(explanation_id: int) -> Explanation | None:
    """The queue worker's entry: load the row and compute it."""
    row = Explanation.objects.filter(pk=explanation_id).select_related("model").first()
    if row is None:
        return None
    return compute(row)
