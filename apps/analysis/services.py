"""Classification runs: upload → stream through the tree → rows; verification, sign-off, export.

The same functions serve the pages, the API, the CLI and the background task. Images are read,
checked and decoded one chunk at a time (memory stays flat in the size of the upload); each chunk's
rows are committed on their own, so a failure midway leaves the run failed with the cells done so far.

Two technologists correcting the same cell: an *optimistic check*. Each correction names the cell
version it was made against; when somebody else changed the cell in between, the correction is
refused with a message naming who changed it to what and when (nothing is overwritten silently).
Every change is kept in the Correction table.
"""

import csv
import hashlib
import io
import logging
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Count, F
from django.utils import timezone
from django.utils.text import get_valid_filename

from apps.accounts.roles import is_curator, is_lab_staff
from apps.cells.models import CellType
from apps.cells.services import ImportError_, ImportReport, import_cells, upload_limits
from apps.classifiers.models import ModelSet
from apps.sites.models import Site
from hemoweb.ml.counts import COUNT_TARGETS, Differential, differential
from hemoweb.ml.familiarity import SHIFT_MESSAGE
from hemoweb.ml.infer import TreeClassifier, input_sizes, pick_device, tree_classifier
from hemoweb.ml.preprocess import decode_one, decode_resized_batch
from hemoweb.ml.standardise import as_rgb, colour_summary, measure, scale_summary
from hemoweb.ml.sources import BadImage, ImageSource, SourceError
from hemoweb.ml.weights import ModelFileError, read_set

from .models import ClassificationRun, ClassifiedCell, Correction

log = logging.getLogger(__name__)
CHUNK = 256
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}


class AnalysisError(ValueError):
    """Something a lab user must read: the run cannot start, or the change is not allowed."""


class ConflictError(AnalysisError):
    """Somebody else changed the cell since it was shown."""


def sync_max() -> int:
    """Uploads with more files than this become a background job."""
    return getattr(settings, "HEMOWEB_CLASSIFY_SYNC_MAX", 300)


# --- which models ------------------------------------------------------------------------------


@dataclass
class ModelChoice:
    folder: Path
    name: str
    version: str
    thresholds: dict[str, float]
    model_set: ModelSet | None = None


def _choice_from_set(model_set: ModelSet) -> ModelChoice:
    thresholds = dict(model_set.node_models.values_list("node__code", "threshold"))
    version = str(model_set.card.get("created") or model_set.created.isoformat(timespec="seconds"))
    return ModelChoice(model_set.path, model_set.name, version, thresholds, model_set)


def choose_models(spec: ModelSet | str | int | None = None) -> ModelChoice:
    """The active set (no spec), a registered set (instance, id or name) or a set folder under MODELS_DIR."""
    if isinstance(spec, ModelSet):
        return _choice_from_set(spec)
    if spec in (None, ""):
        active = ModelSet.objects.active()
        if active is None:
            raise AnalysisError(
                "No model set is active, so cells cannot be classified yet. A curator must train or register "
                "a model set and activate it on the Models page."
            )
        return _choice_from_set(active)
    if isinstance(spec, int) or str(spec).isdigit():
        found = ModelSet.objects.filter(pk=int(spec)).first()
        if found:
            return _choice_from_set(found)
    found = ModelSet.objects.filter(name=str(spec)).first()
    if found:
        return _choice_from_set(found)
    for folder in (settings.MODELS_DIR / str(spec), Path(str(spec))):
        if (folder / "set.json").is_file():
            try:
                card = read_set(folder)
            except ModelFileError as error:
                raise AnalysisError(str(error)) from error
            return ModelChoice(folder.resolve(), card.name, card.created, {})
    raise AnalysisError(f"No model set named {spec!r}, and no set folder {spec!r} under {settings.MODELS_DIR}.")


def load_classifier(choice: ModelChoice) -> TreeClassifier:
    """The cached tree classifier, with every node model loaded: damaged files fail here, before any work."""
    tree = CellType.objects.as_tree()
    try:
        classifier = tree_classifier(choice.folder, tree, pick_device(getattr(settings, "HEMOWEB_DEVICE", "auto")),
                                     choice.thresholds, engine=getattr(settings, "HEMOWEB_INFERENCE_ENGINE", "auto"),
                                     onnx_cache=getattr(settings, "HEMOWEB_ONNX_CACHE_DIR", None))
        classifier.check()  # also exports the networks to ONNX on first use (a failed export: PyTorch, logged)
    except ModelFileError as error:
        if choice.model_set is not None:
            ModelSet.objects.filter(pk=choice.model_set.pk).update(status=ModelSet.Status.BROKEN)
        raise AnalysisError(
            f"The model set {choice.name} cannot be used: {error} A curator must retrain or re-register it."
        ) from error
    if choice.model_set is not None and choice.model_set.status == ModelSet.Status.BROKEN:
        ModelSet.objects.filter(pk=choice.model_set.pk).update(status=ModelSet.Status.READY)  # files repaired
    return classifier


# --- starting a run ----------------------------------------------------------------------------


def _store_upload(files) -> tuple[str, int]:
    """Save the uploaded .zip or images under media/analysis/uploads; (storage name, number of files)."""
    files = list(files)
    if not files:
        raise AnalysisError("Choose a .zip archive or one or more cell images to classify.")
    limit = settings.HEMOWEB_UPLOAD_MAX_BYTES
    total = sum(upload.size for upload in files)
    if total > limit:
        raise AnalysisError(
            f"The upload is {total / 1024**2:.1f} MB; at most {limit / 1024**2:.0f} MB are accepted at once. "
            "Split it into smaller archives."
        )
    zips = [upload for upload in files if upload.name.lower().endswith(".zip")]
    if zips and len(files) > 1:
        raise AnalysisError("Upload either one .zip archive or image files, not both together.")
    token = uuid.uuid4().hex
    if zips:
        name = default_storage.save(f"analysis/uploads/{token}.zip", zips[0])
        try:
            with ImageSource(default_storage.path(name), upload_limits()) as source:
                n_files = sum(1 for _ in source.files())
        except SourceError as error:
            default_storage.delete(name)
            raise AnalysisError(str(error)) from error
        return name, n_files
    folder = f"analysis/uploads/{token}"
    for index, upload in enumerate(files):
        safe = get_valid_filename(PurePosixPath(upload.name.replace("\\", "/")).name) or "image"
        default_storage.save(f"{folder}/{index:05d}_{safe}", upload)
    return folder, len(files)


def start_run(*, owner, files=None, models: ModelSet | str | int | None = None, count_target: int = 100,
              name: str = "", run_async: bool | None = None, um_per_pixel: float | None = None,
              site: Site | None = None) -> ClassificationRun:
    """Check the models, store the upload, create the run, then classify now or queue a background job.

    The run belongs to `site` (default: the owner's site); without `models` it uses that site's set, and without a
    stated pixel size the site's."""
    if count_target not in COUNT_TARGETS:
        raise AnalysisError(f"The count target must be one of {', '.join(map(str, COUNT_TARGETS))} cells.")
    files = list(files or [])
    site = site or Site.objects.for_user(owner)
    choice = choose_models(models if models not in (None, "") else site.set_in_use())
    um_per_pixel = um_per_pixel or site.um_per_pixel
    load_classifier(choice)  # no active set / damaged weights: refuse before storing anything
    upload, n_files = _store_upload(files)
    if n_files == 0:
        _remove_upload(upload)
        raise AnalysisError("The upload holds no files to classify.")
    if not name:
        name = files[0].name if len(files) == 1 else f"{len(files)} images"
    run = ClassificationRun.objects.create(
        owner=owner, name=name[:200], model_set=choice.model_set, model_set_name=choice.name,
        model_set_version=choice.version, model_folder=str(choice.folder), n_total=n_files,
        upload=upload, count_target=count_target, um_per_pixel=um_per_pixel, site=site,
    )
    if run_async is None:
        run_async = n_files > sync_max()
    if run_async:
        from django_q.tasks import async_task

        async_task("apps.analysis.tasks.classify_run_task", run.pk, task_name=f"classify run {run.pk}")
        return run
    return classify_run(run.pk)


def run_from_source(*, source: Path, models: ModelSet | str | None = None, owner=None,
                    count_target: int = 100, draft: bool = False, um_per_pixel: float | None = None,
                    site: Site | None = None) -> ClassificationRun:
    """Classify a folder or .zip on disk (the CLI): same pipeline, the source is read in place (site as start_run)."""
    site = site or Site.objects.for_user(owner)
    choice = choose_models(models if models not in (None, "") else site.set_in_use())
    um_per_pixel = um_per_pixel or site.um_per_pixel
    load_classifier(choice)
    source = Path(source)
    if not source.exists():
        raise AnalysisError(f"{source} does not exist.")
    run = ClassificationRun.objects.create(
        owner=owner, name=source.name, model_set=choice.model_set, model_set_name=choice.name,
        model_set_version=choice.version, model_folder=str(choice.folder), count_target=count_target,
        um_per_pixel=um_per_pixel, site=site,
    )
    return classify_run(run.pk, source=source, draft=draft)


# --- the streaming classification --------------------------------------------------------------


def _choice_for_run(run: ClassificationRun) -> ModelChoice:
    if run.model_set_id:
        return _choice_from_set(run.model_set)
    return ModelChoice(Path(run.model_folder), run.model_set_name, run.model_set_version, {})


def _remove_upload(name: str) -> None:
    if not name:
        return
    try:
        if name.endswith(".zip"):
            default_storage.delete(name)
            return
        folder = Path(default_storage.path(name))
        for path in folder.glob("*"):
            path.unlink()
        folder.rmdir()
    except OSError:
        log.warning("could not remove the upload %s", name)


def _mark_failed(run: ClassificationRun, message: str) -> None:
    run.status = ClassificationRun.Status.FAILED
    run.error = message
    run.finished = timezone.now()
    run.save(update_fields=["status", "error", "finished", "n_done", "skipped"])


def classify_run(run_id: int, *, source: Path | None = None, chunk: int | None = None, batch_size: int = 64,
                 draft: bool = False, timings: dict | None = None) -> ClassificationRun:
    """Classify a queued run's upload chunk by chunk, storing the rows of each chunk as it goes.

    `timings`, when given, collects seconds spent in decode / inference / database (the benchmark).
    """
    import time

    chunk = chunk or getattr(settings, "HEMOWEB_CLASSIFY_CHUNK", 0) or CHUNK
    # atomic: one worker runs it, and the run names that worker (host, pid) so that its death can be detected
    claimed = ClassificationRun.claim(run_id, status=ClassificationRun.Status.QUEUED,
                                      to=ClassificationRun.Status.RUNNING, started=timezone.now())
    run = ClassificationRun.objects.select_related("model_set").get(pk=run_id)
    if not claimed:
        return run
    clock = timings if timings is not None else {}
    for key in ("decode", "inference", "database"):
        clock.setdefault(key, 0.0)
    try:
        choice = _choice_for_run(run)
        classifier = load_classifier(choice)
        types = {node.code: node for node in CellType.objects.all()}
        limits = upload_limits()
        location = source if source is not None else default_storage.path(run.upload)
        sizes = input_sizes(classifier)
        # one input size for every node: resize right after decoding and drop the full image (a chunk
        # then holds 256 small tensors, not 256 full-size images)
        # (a set trained at a scale resamples each image first: it keeps the decoded image)
        scaled = classifier.scale_reference is not None
        resize_to = next(iter(sizes)) if len(sizes) == 1 and not scaled else None
        draft_size = max(size for size, _ in sizes) if draft and not scaled else 0
        with ImageSource(location, limits) as image_source:
            files = list(image_source.files())
            run.n_total, run.engine = len(files), classifier.engine
            run.beat()
            run.save(update_fields=["n_total", "engine", "heartbeat"])
            scale = _run_scale(run, classifier, image_source, files, limits) if scaled else None
            seen: dict[str, list] = {"scale": [], "background": [], "familiarity": []}
            workers = decode_workers(classifier)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers else nullcontext(_InPlace())
            with pool as pool:
                decode = partial(_decode_chunk, pool, classifier, limits, draft_size, resize_to, scale)
                for offset, part, decoded in _decoded_ahead(image_source, files, chunk, decode, clock,
                                                            time.perf_counter):
                    _classify_chunk(run, part, offset, decoded, classifier, types, batch_size, clock,
                                    time.perf_counter, seen)
        run.scale = {**({"run": scale.as_dict()} if scale else {}), **scale_summary(seen["scale"])}
        run.colour = {**colour_summary(seen["background"], classifier.input_card.colour.get("reference")),
                      "normalised": bool(classifier.input_card.colour)}
        run.site_shift = classifier.site_shift(seen["familiarity"], run.scale, run.colour)
        run.status, run.finished = ClassificationRun.Status.SUCCEEDED, timezone.now()
        run.save(update_fields=["status", "finished", "n_done", "skipped", "scale", "colour", "site_shift"])
    except (SourceError, AnalysisError, ModelFileError) as error:
        _mark_failed(run, str(error))
    except Exception as error:  # the run must say it failed, whatever broke
        log.exception("classification run %s failed", run.pk)
        _mark_failed(run, f"Classification stopped after {run.n_done} of {run.n_total} files: {error}")
    finally:
        if source is None and run.upload:
            _remove_upload(run.upload)
            ClassificationRun.objects.filter(pk=run.pk).update(upload="")
            run.upload = ""
    return run


SCALE_SAMPLE = 32  # images a run's scale is measured on, spread over the upload


def _run_scale(run, classifier, image_source, files, limits):
    """The run's scale, measured on up to SCALE_SAMPLE of its images spread over the upload (unreadable ones left
    out: they are skipped with their reason later), with the run's stated pixel size as the fallback."""
    step = max(1, len(files) // SCALE_SAMPLE)
    measured = []
    for file in files[::step][:SCALE_SAMPLE]:
        try:
            result = decode_one(image_source.read(file.path), limits.max_pixels)
        except (SourceError, zipfile.BadZipFile, zlib.error, EOFError):
            continue
        if not isinstance(result, BadImage):
            measured.append(measure(as_rgb(result[0])))
    return classifier.estimate_scale([], run.um_per_pixel, measured=measured)


def decode_workers(classifier: TreeClassifier) -> int:
    """Threads that decode and prepare a run's next chunk while the network classifies this one: the cores the
    network leaves over (all but one beside a GPU), at least one; `CLASSIFY_DECODE_WORKERS` chooses (0: none, each
    chunk decoded before it is classified)."""
    chosen = getattr(settings, "HEMOWEB_CLASSIFY_DECODE_WORKERS", -1)
    if chosen >= 0:
        return chosen
    cores = os.cpu_count() or 1
    return max(1, cores - (1 if classifier.device.type == "cuda" else classifier.network_threads))


class _InPlace:
    """Runs each task at once in the calling thread: decoding without a pool."""

    def submit(self, task, *args) -> Future:
        future = Future()
        future.set_result(task(*args))
        return future


def _read_chunk(image_source, files, offset) -> list[tuple[int, str, bytes]]:
    read = []
    for index, file in enumerate(files, offset):
        try:
            read.append((index, file.path, image_source.read(file.path)))  # a lying zip entry raises SourceError
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise SourceError(f"The archive is damaged at {file.path} ({error}); classification stopped there. "
                              "The cells before it are kept.") from error
    return read


def _decoded_ahead(image_source, files, chunk, decode, clock, now):
    """(offset, files, decoded) chunk by chunk. Each chunk is read here (one thread reads the archive) and handed to
    `decode`, which works in the pool while the caller classifies the chunk before it. A damaged archive stops the
    run once the chunks before the damage are handed over."""
    pending, failure = None, None
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        started = now()
        try:
            upcoming = (start, part, decode(_read_chunk(image_source, part, start)))
        except SourceError as error:
            upcoming, failure = None, error
        clock["decode"] += now() - started
        if pending is not None:
            yield _collected(pending, clock, now)
        if failure is not None:
            raise failure
        pending = upcoming
    if pending is not None:
        yield _collected(pending, clock, now)


def _collected(pending, clock, now):
    offset, part, results = pending
    started = now()
    decoded = results()
    clock["decode"] += now() - started  # the wait only: decoding beside the network costs no time here
    return offset, part, decoded


def _decode_chunk(pool, classifier, limits, draft_size, resize_to, scale, read) -> Callable[[], list]:
    """The chunk's files decoded and made ready for the network in the pool; returns what waits for them: per file
    (index, path, data, uint8 input, scale record, format, width, height), or (path, BadImage) when it is skipped."""
    def ready(item, result):
        index, path, data = item
        if isinstance(result, BadImage):
            return path, result
        image, fmt, width, height = result
        return (index, path, data, *classifier.prepare(image, scale), fmt, width, height)

    if batch_decode(classifier, resize_to):  # on the device, the whole chunk at once
        return pool.submit(lambda: [ready(item, result) for item, result in
                                    zip(read, _decode(read, classifier, limits, draft_size, resize_to),
                                        strict=True)]).result
    futures = [pool.submit(lambda item=item: ready(item, decode_one(item[2], limits.max_pixels, resize_to,
                                                                    draft_size))) for item in read]
    return lambda: [future.result() for future in futures]


def _classify_chunk(run, files, offset, decoded, classifier, types, batch_size, clock, now, seen=None) -> None:
    run.skipped.extend([item[0], str(item[1])] for item in decoded if isinstance(item[-1], BadImage))
    decoded = [item for item in decoded if not isinstance(item[-1], BadImage)]
    started = now()
    predictions = classifier.classify([item[3] for item in decoded], batch_size,
                                      scales=[item[4] for item in decoded]) if decoded else []
    clock["inference"] += now() - started
    started = now()
    root = types[classifier.tree.root]
    rows = []
    for (index, path, data, _, _, fmt, width, height), prediction in zip(decoded, predictions, strict=True):
        digest = hashlib.sha256(data).hexdigest()
        stored = default_storage.save(f"analysis/{run.pk}/{index:06d}_{digest[:12]}.{EXTENSIONS[fmt]}",
                                      ContentFile(data))
        predicted = types.get(prediction.code, root)
        rows.append(ClassifiedCell(
            run=run, index=index, image=stored, original_name=path[-255:], sha256=digest, width=width,
            height=height, predicted_type=predicted, final_type=predicted, guess_type=types.get(prediction.guess),
            path=prediction.as_dict()["path"],
            confidence=round(prediction.confidence, 5), flags=prediction.flags, resolved=prediction.resolved,
            views=prediction.views, scale=prediction.scale, background=prediction.background,
            familiarity=prediction.familiarity, unfamiliar=prediction.unfamiliar, model_set=run.model_set,
            model_set_name=run.model_set_name,
        ))
    if seen is not None:
        seen["scale"].extend(prediction.scale for prediction in predictions)
        seen["background"].extend(prediction.background for prediction in predictions)
        seen["familiarity"].extend(prediction.familiarity for prediction in predictions)
    with transaction.atomic():
        ClassifiedCell.objects.bulk_create(rows)
        run.n_done = offset + len(files)
        run.beat()
        run.save(update_fields=["n_done", "skipped", "heartbeat"])
    clock["database"] += now() - started


def batch_decode(classifier: TreeClassifier, resize_to) -> bool:
    """Decode JPEGs in batches on the classifier's device: by default on a GPU (nvJPEG), where it pays."""
    choice = getattr(settings, "HEMOWEB_BATCH_DECODE", "auto")
    return resize_to is not None and (choice == "on" or (choice == "auto" and classifier.device.type == "cuda"))


def _decode(read, classifier, limits, draft_size, resize_to) -> list:
    """Per file: (image or uint8 tensor, format, width, height), or the BadImage that says why it is skipped."""
    if batch_decode(classifier, resize_to):
        return decode_resized_batch([data for _, _, data in read], *resize_to, device=classifier.device,
                                    max_pixels=limits.max_pixels)
    return [decode_one(data, limits.max_pixels, resize_to, draft_size) for _, _, data in read]


# --- lost workers ------------------------------------------------------------------------------


def stale_seconds() -> int:
    return getattr(settings, "HEMOWEB_CLASSIFY_STALE_SECONDS", 600)


def check_worker(run: ClassificationRun) -> ClassificationRun:
    """Fail a running run whose worker is gone (killed, machine restarted); the cells stored so far are kept.

    Called wherever a run is read (page, progress partial, API): free for runs that are not running, and a
    process check (no query) for running ones; the database is written only when the worker is gone.
    """
    if run.status != ClassificationRun.Status.RUNNING or not run.is_lost(stale_seconds()):
        return run
    fresh = ClassificationRun.objects.filter(pk=run.pk).values("n_done", "n_total", "upload").first()
    if fresh is None:
        return run
    message = (
        f"Classification stopped after {fresh['n_done']} of {fresh['n_total']} files: {run.worker_label} "
        "running it is gone (it was killed or its machine restarted). The cells classified so far are kept; "
        "upload the remaining images again to classify them."
    )
    finished = timezone.now()
    updated = ClassificationRun.objects.filter(pk=run.pk, status=ClassificationRun.Status.RUNNING).update(
        status=ClassificationRun.Status.FAILED, error=message, finished=finished, upload="")
    if updated:
        log.warning("classification run %s: %s", run.pk, message)
        _remove_upload(fresh["upload"])
        _remove_unrecorded_images(run.pk)
    run.refresh_from_db()
    return run


def _remove_unrecorded_images(run_id: int) -> None:
    """Images a killed worker stored for a chunk whose rows it never committed."""
    folder = f"analysis/{run_id}"
    try:
        names = default_storage.listdir(folder)[1]
    except OSError:
        return
    recorded = set(ClassifiedCell.objects.filter(run_id=run_id).values_list("image", flat=True))
    for name in names:
        if f"{folder}/{name}" not in recorded:
            default_storage.delete(f"{folder}/{name}")


# --- reading runs ------------------------------------------------------------------------------


def runs_for(user):
    """Lab staff see their own runs; curators see every run."""
    runs = ClassificationRun.objects.select_related("owner", "signed_off_by", "shift_acknowledged_by", "site")
    if is_curator(user):
        return runs
    if is_lab_staff(user):
        return runs.filter(owner=user)
    return runs.none()


def awaiting_review(cells):
    """Unfamiliar cells nobody has given a type yet: their own group, never counted as a type."""
    return cells.filter(unfamiliar=True, final_type=F("predicted_type"))


def run_differential(run: ClassificationRun) -> Differential:
    cells = run.cells.all()
    codes = cells.exclude(pk__in=awaiting_review(cells).values("pk")).values_list("final_type__code", flat=True)
    return differential(CellType.objects.as_tree(), list(codes), run.count_target,
                        unfamiliar=awaiting_review(cells).count())


@dataclass
class RunSummary:
    total: int
    unchanged: int
    corrected: int
    flagged: int
    unresolved: int
    unfamiliar: int = 0  # unfamiliar cells still awaiting a type

    @property
    def agreement(self) -> float | None:
        """Share of cells whose verified type is the predicted one."""
        return self.unchanged / self.total if self.total else None


def run_summary(run: ClassificationRun) -> RunSummary:
    cells = run.cells.all()
    total = cells.count()
    unchanged = cells.filter(final_type=F("predicted_type")).count()
    flagged = sum(1 for flags in cells.values_list("flags", flat=True) if flags)
    return RunSummary(total, unchanged, total - unchanged, flagged, cells.filter(resolved=False).count(),
                      awaiting_review(cells).count())


def run_record(run: ClassificationRun) -> dict:
    """What `classify --json` writes: the run's id, counts, differential and site-shift verdict."""
    summary = run_summary(run)
    by_type = dict(sorted(run.cells.order_by().values("final_type__code").annotate(n=Count("pk")).values_list(
        "final_type__code", "n")))  # order_by(): the model's default ordering would split the groups
    return {
        "run_id": run.pk, "name": run.name, "status": run.status, "model_set": run.model_set_name,
        "model_set_version": run.model_set_version, "engine": run.engine,
        "counts": {"files": run.n_total, "classified": summary.total, "skipped": len(run.skipped),
                   "flagged": summary.flagged, "unresolved": summary.unresolved, "unfamiliar": summary.unfamiliar,
                   "by_type": by_type},
        "differential": run_differential(run).as_dict(), "site_shift": run.site_shift,
        "scale": run.scale.get("run") or {}, "colour": run.colour, "error": run.error,
    }


# --- verification ------------------------------------------------------------------------------


def _locked_message(run: ClassificationRun) -> str:
    who = run.signed_off_by.get_username() if run.signed_off_by else "someone"
    when = timezone.localtime(run.signed_off_at).strftime("%Y-%m-%d %H:%M") if run.signed_off_at else "earlier"
    return f"Run {run.pk} was signed off by {who} on {when}; it is locked and cannot be changed."


@transaction.atomic
def correct_cell(*, cell_id: int, code: str, user, expected_version: int | None = None) -> ClassifiedCell:
    """Set a cell's verified type; the prediction stays as it was. Refused on a locked run or a stale view."""
    cell = (ClassifiedCell.objects.select_for_update().select_related("run", "run__signed_off_by", "final_type",
                                                                       "corrected_by").get(pk=cell_id))
    if cell.run.locked:
        raise AnalysisError(_locked_message(cell.run))
    if cell.run.active:
        raise AnalysisError("This run is still being classified; correct its cells when it is done.")
    if expected_version is not None and cell.version != expected_version:
        who = cell.corrected_by.get_username() if cell.corrected_by else "someone"
        when = timezone.localtime(cell.corrected_at).strftime("%H:%M:%S") if cell.corrected_at else ""
        raise ConflictError(
            f"{who} changed this cell to {cell.final_type.code} ({cell.final_type.name}) at {when} while you were "
            "looking at it. It now shows their choice: check it and correct again if needed."
        )
    new_type = CellType.objects.filter(code=code).first()
    if new_type is None:
        raise AnalysisError(f"{code!r} is not a cell type of the tree.")
    if new_type.pk == cell.final_type_id:
        return cell
    Correction.objects.create(cell=cell, user=user, from_type=cell.final_type, to_type=new_type)
    cell.final_type = new_type
    cell.corrected_by, cell.corrected_at = user, timezone.now()
    cell.version += 1
    cell.save(update_fields=["final_type", "corrected_by", "corrected_at", "version"])
    return cell


@transaction.atomic
def sign_off(*, run_id: int, user) -> ClassificationRun:
    """Lock the run with who and when; a second sign-off is refused and changes nothing."""
    run = ClassificationRun.objects.select_for_update().select_related("signed_off_by").get(pk=run_id)
    if run.locked:
        raise AnalysisError(
            f"Run {run.pk} was already signed off by "
            f"{run.signed_off_by.get_username() if run.signed_off_by else 'someone'} on "
            f"{timezone.localtime(run.signed_off_at).strftime('%Y-%m-%d %H:%M')}. It stays locked; nothing changed."
        )
    if run.status != ClassificationRun.Status.SUCCEEDED:
        raise AnalysisError(f"Only a finished run can be signed off; this one is {run.get_status_display().lower()}.")
    if run.needs_acknowledgement:
        raise AnalysisError(
            f"Run {run.pk} is at site-shift alarm: {run.site_shift.get('message', SHIFT_MESSAGE)}. Acknowledge the "
            "warning first (on the run page, or POST to the run's acknowledge-shift in the API); nothing changed.")
    run.locked, run.signed_off_by, run.signed_off_at = True, user, timezone.now()
    run.save(update_fields=["locked", "signed_off_by", "signed_off_at"])
    return run


@transaction.atomic
def acknowledge_shift(*, run_id: int, user) -> ClassificationRun:
    """Record who read the run's site-shift warning and when (a run at alarm needs it before sign-off).

    The first acknowledgement stands: a second one changes nothing."""
    run = ClassificationRun.objects.select_for_update().select_related("shift_acknowledged_by").get(pk=run_id)
    level = (run.site_shift or {}).get("level")
    if level not in ("warn", "alarm"):
        raise AnalysisError(f"Run {run.pk} has no site-shift warning to acknowledge (level {level or 'not measured'}).")
    if run.shift_acknowledged_at is None:
        run.shift_acknowledged_by, run.shift_acknowledged_at = user, timezone.now()
        run.save(update_fields=["shift_acknowledged_by", "shift_acknowledged_at"])
        log.info("classification run %s: site shift %s acknowledged", run.pk, level)
    return run


DEFAULT_CORRECTIONS_DATASET = "Verified corrections"


def send_corrections_to_dataset(*, run_id: int, dataset: str = DEFAULT_CORRECTIONS_DATASET) -> ImportReport:
    """Import the corrected cells of a signed-off run into `dataset` (labels = verified types), through
    the cells import path: same checks, same files, duplicates (sha256) skipped."""
    run = ClassificationRun.objects.get(pk=run_id)
    if not run.locked:
        raise AnalysisError("Sign the run off first: only verified cells go into training data.")
    cells = list(run.cells.exclude(final_type=F("predicted_type")).select_related("final_type"))
    if not cells:
        raise AnalysisError("No cell of this run was corrected: there is nothing to send.")
    buffer, labels = io.BytesIO(), io.StringIO()
    writer = csv.writer(labels)
    writer.writerow(["path", "label"])
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for cell in cells:
            name = f"run{run.pk}_{cell.index:06d}{Path(cell.image.name).suffix}"
            with cell.image.open("rb") as handle:
                archive.writestr(name, handle.read())
            writer.writerow([name, cell.final_type.code])
    buffer.seek(0)
    try:
        return import_cells(buffer, dataset=dataset, labels_csv=labels.getvalue(),
                            source_description=f"Verified corrections from classification runs (run {run.pk})")
    except ImportError_ as error:
        raise AnalysisError(str(error)) from error


# --- export ------------------------------------------------------------------------------------

CSV_COLUMNS = ["file", "index", "predicted", "predicted_name", "path", "confidence", "final", "final_name",
               "changed", "flags", "resolved", "corrected_by", "corrected_at", "model_set", "best_guess", "views",
               "scale_source", "px_per_um", "scale_vs_training", "own_px_per_um", "familiarity"]


def _cell_safe(value) -> str:
    """No spreadsheet formulas from file names (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def path_text(path: list[dict]) -> str:
    return " > ".join(f"{step['code']} {step['probability']:.2f}" for step in path)


def write_csv(run: ClassificationRun, out) -> int:
    """One row per cell: file, predicted path with confidences, final type, flags. Returns rows written."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    cells = run.cells.with_types().order_by("index")
    n = 0
    for cell in cells.iterator(chunk_size=1000):
        writer.writerow([_cell_safe(value) for value in (
            cell.original_name, cell.index, cell.predicted_type.code, cell.predicted_type.name, path_text(cell.path),
            f"{cell.confidence:.4f}", cell.final_type.code, cell.final_type.name, "yes" if cell.changed else "",
            "; ".join(cell.flags), "yes" if cell.resolved else "no",
            cell.corrected_by.get_username() if cell.corrected_by else "",
            cell.corrected_at.isoformat(timespec="seconds") if cell.corrected_at else "", cell.model_set_name,
            cell.guess_type.code if cell.guess_type else "", cell.views, cell.scale.get("source", ""),
            cell.scale.get("px_per_um") or "", cell.scale.get("ratio") or "", cell.scale.get("own_px_per_um") or "",
            "" if cell.familiarity is None else cell.familiarity,
        )])
        n += 1
    return n
