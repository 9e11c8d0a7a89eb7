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
import re
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

from apps.accounts.roles import is_curator, is_lab_staff, is_supervisor
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

from . import specimen
from .models import ClassificationRun, ClassifiedCell, Correction, SlideField

log = logging.getLogger(__name__)
CHUNK = 256
FIRST_CHUNK = 16  # the first chunks are small and grow to CHUNK: the progress bar moves within seconds
STORED_PREFIX = re.compile(r"^\d{5,}_")  # image uploads are stored as 00001_name.jpg to keep their order
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}


class AnalysisError(ValueError):
    """Something a lab user must read: the run cannot start, or the change is not allowed."""


class ConflictError(AnalysisError):
    """Somebody else changed the cell since it was shown."""


def sync_max() -> int:
    """Uploads with more files than this become a background job."""
    return getattr(settings, "HEMOWEB_CLASSIFY_SYNC_MAX", 300)


def page_sync_max() -> int:
    """Uploads through the page with more files than this go to the worker: the page shows their progress at once
    instead of waiting for the request."""
    return min(sync_max(), getattr(settings, "HEMOWEB_CLASSIFY_PAGE_SYNC_MAX", 8))


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
              site: Site | None = None, sync_limit: int | None = None,
              identity: dict | None = None) -> ClassificationRun:
    """Check the models, store the upload, create the run, then classify now or queue a background job (uploads of
    more than `sync_limit` files, default sync_max()).

    The run belongs to `site` (default: the owner's site); without `models` it uses that site's set, and without a
    stated pixel size the site's. `identity`: the specimen's (apps.analysis.specimen.IDENTITY_FIELDS)."""
    if count_target not in COUNT_TARGETS:
        raise AnalysisError(f"The count target must be one of {', '.join(map(str, COUNT_TARGETS))} cells.")
    identity = _identity(identity)
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
        upload=upload, count_target=count_target, um_per_pixel=um_per_pixel, site=site, **identity,
    )
    if run_async is None:
        run_async = n_files > (sync_max() if sync_limit is None else sync_limit)
    if run_async:
        from django_q.tasks import async_task

        async_task("apps.analysis.tasks.classify_run_task", run.pk, task_name=f"classify run {run.pk}")
        return run
    return classify_run(run.pk)


def run_from_source(*, source: Path, models: ModelSet | str | None = None, owner=None,
                    count_target: int = 100, draft: bool = False, um_per_pixel: float | None = None,
                    site: Site | None = None, identity: dict | None = None) -> ClassificationRun:
    """Classify a folder or .zip on disk (the CLI): same pipeline, the source is read in place (site and identity
    as start_run)."""
    identity = _identity(identity)
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
        um_per_pixel=um_per_pixel, site=site, **identity,
    )
    return classify_run(run.pk, source=source, draft=draft)


def _identity(values: dict | None) -> dict:
    try:
        return specimen.clean_identity(values)
    except specimen.IdentityError as error:
        raise AnalysisError(str(error)) from error


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


def no_usable_images_message(n_files: int) -> str:
    what = "the file is not" if n_files == 1 else f"none of the {n_files} files is"
    return (f"No usable images: {what} a cell image hemoweb can classify (the reasons are listed below), so the run "
            "has no cells to count or sign off. Upload readable JPEG, PNG, TIFF or BMP images again.")


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
                own_step = max(1, -(-len(files) // OWN_MEASURE_SAMPLE))  # every cell's own scale in a small run
                decode = partial(_decode_chunk, pool, classifier, limits, draft_size, resize_to, scale, own_step)
                for offset, part, decoded in _decoded_ahead(image_source, files, chunk, decode, clock,
                                                            time.perf_counter):
                    _classify_chunk(run, part, offset, decoded, classifier, types, batch_size, clock,
                                    time.perf_counter, seen)
        if files and len(run.skipped) >= len(files):
            raise AnalysisError(no_usable_images_message(len(files)))
        finish_run(run, classifier, scale, seen)
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


def finish_run(run: ClassificationRun, classifier: TreeClassifier, scale, seen: dict) -> None:
    """A run's cells are all in: its scale, colour and site-shift summaries from what its cells showed, and done."""
    run.scale = {**({"run": scale.as_dict()} if scale else {}), **scale_summary(seen["scale"])}
    run.colour = {**colour_summary(seen["background"], classifier.input_card.colour.get("reference")),
                  "normalised": bool(classifier.input_card.colour)}
    run.site_shift = classifier.site_shift(seen["familiarity"], run.scale, run.colour)
    run.status, run.finished = ClassificationRun.Status.SUCCEEDED, timezone.now()
    run.save(update_fields=["status", "finished", "n_done", "skipped", "scale", "colour", "site_shift"])


SCALE_SAMPLE = 32  # images a run's scale is measured on, spread over the upload
OWN_MEASURE_SAMPLE = 256  # cells of a run that also keep their own red-cell measure, spread over the upload


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
    for start, end in chunk_bounds(len(files), chunk):
        part = files[start:end]
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


def chunk_bounds(n_files: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: FIRST_CHUNK files first, doubling up to `chunk`, so that the first progress comes
    after a few files, not after a whole chunk."""
    bounds, start, size = [], 0, min(chunk, FIRST_CHUNK)
    while start < n_files:
        bounds.append((start, min(start + size, n_files)))
        start, size = start + size, min(chunk, size * 2)
    return bounds


def _collected(pending, clock, now):
    offset, part, results = pending
    started = now()
    decoded = results()
    clock["decode"] += now() - started  # the wait only: decoding beside the network costs no time here
    return offset, part, decoded


def _decode_chunk(pool, classifier, limits, draft_size, resize_to, scale, own_step, read) -> Callable[[], list]:
    """The chunk's files decoded and made ready for the network in the pool; returns what waits for them: per file
    (index, path, data, uint8 input, scale record, format, width, height), or (path, BadImage) when it is skipped.
    Every `own_step`-th cell gets its own red-cell measure."""
    def ready(item, result):
        index, path, data = item
        if isinstance(result, BadImage):
            return path, result
        image, fmt, width, height = result
        return (index, path, data, *classifier.prepare(image, scale, own=index % own_step == 0), fmt, width, height)

    if batch_decode(classifier, resize_to):  # on the device, the whole chunk at once
        return pool.submit(lambda: [ready(item, result) for item, result in
                                    zip(read, _decode(read, classifier, limits, draft_size, resize_to),
                                        strict=True)]).result
    futures = [pool.submit(lambda item=item: ready(item, decode_one(item[2], limits.max_pixels, resize_to,
                                                                    draft_size))) for item in read]
    return lambda: [future.result() for future in futures]


def uploaded_name(run: ClassificationRun, path: str) -> str:
    """A file's name as it was uploaded (image uploads are stored with an order prefix, `00001_`)."""
    if run.upload and not run.upload.endswith(".zip"):
        return STORED_PREFIX.sub("", path, count=1)
    return path


def _classify_chunk(run, files, offset, decoded, classifier, types, batch_size, clock, now, seen=None, *,
                    extra: list[dict] | None = None, done: int | None = None) -> None:
    """Classify a chunk and commit its rows; `extra`: more fields per decoded item (a slide cell's field and box),
    `done`: the run's progress after it when that is not offset + files (a slide run counts fields)."""
    run.skipped.extend([uploaded_name(run, item[0]), str(item[1])] for item in decoded
                       if isinstance(item[-1], BadImage))
    decoded = [item for item in decoded if not isinstance(item[-1], BadImage)]
    started = now()
    predictions = classifier.classify([item[3] for item in decoded], batch_size,
                                      scales=[item[4] for item in decoded]) if decoded else []
    clock["inference"] += now() - started
    started = now()
    root = types[classifier.tree.root]
    rows = []
    for position, ((index, path, data, _, _, fmt, width, height), prediction) in enumerate(
            zip(decoded, predictions, strict=True)):
        digest = hashlib.sha256(data).hexdigest()
        stored = default_storage.save(f"analysis/{run.pk}/{index:06d}_{digest[:12]}.{EXTENSIONS[fmt]}",
                                      ContentFile(data))
        predicted = types.get(prediction.code, root)
        rows.append(ClassifiedCell(
            run=run, index=index, image=stored, original_name=uploaded_name(run, path)[-255:], sha256=digest, width=width,
            height=height, predicted_type=predicted, final_type=predicted, guess_type=types.get(prediction.guess),
            path=prediction.as_dict()["path"],
            confidence=round(prediction.confidence, 5), flags=prediction.flags, resolved=prediction.resolved,
            views=prediction.views, scale=prediction.scale, background=prediction.background,
            familiarity=prediction.familiarity, unfamiliar=prediction.unfamiliar, model_set=run.model_set,
            model_set_name=run.model_set_name, **(extra[position] if extra else {}),
        ))
    if seen is not None:
        seen["scale"].extend(prediction.scale for prediction in predictions)
        seen["background"].extend(prediction.background for prediction in predictions)
        seen["familiarity"].extend(prediction.familiarity for prediction in predictions)
    with transaction.atomic():
        ClassifiedCell.objects.bulk_create(rows)
        run.n_done = offset + len(files) if done is None else done
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
    """Images a killed worker stored for a chunk whose rows it never committed: cells, and a slide run's fields."""
    recorded = {"": set(ClassifiedCell.objects.filter(run_id=run_id).values_list("image", flat=True)),
                "/fields": set(SlideField.objects.filter(run_id=run_id).values_list("image", flat=True))}
    for sub, kept in recorded.items():
        folder = f"analysis/{run_id}{sub}"
        try:
            names = default_storage.listdir(folder)[1]
        except OSError:
            continue
        for name in names:
            if f"{folder}/{name}" not in kept:
                default_storage.delete(f"{folder}/{name}")


# --- reading runs ------------------------------------------------------------------------------


def runs_for(user):
    """Lab staff see their own runs; curators and supervisors (the second sign-off) see every run."""
    runs = ClassificationRun.objects.select_related("owner", "signed_off_by", "shift_acknowledged_by", "site",
                                                    "second_signed_off_by")
    if is_curator(user) or is_supervisor(user):
        return runs
    if is_lab_staff(user):
        return runs.filter(owner=user)
    return runs.none()


def awaiting_review(cells):
    """Unfamiliar cells nobody has reviewed yet: their own group, never counted as a type."""
    return cells.filter(unfamiliar=True, review_state=ClassifiedCell.Review.PENDING)


def unresolved_awaiting_review(cells):
    """Cells the model stopped unsure above a type that nobody has reviewed yet (an accepted best guess resolves)."""
    return cells.filter(resolved=False, review_state=ClassifiedCell.Review.PENDING)


def run_differential(run: ClassificationRun) -> Differential:
    """The run's differential by the counting convention of its specimen type (peripheral blood, bone marrow)."""
    cells = run.cells.all()
    unfamiliar = awaiting_review(cells)
    rest = cells.exclude(pk__in=unfamiliar.values("pk"))
    unresolved = unresolved_awaiting_review(rest)
    codes = rest.exclude(pk__in=unresolved.values("pk")).values_list("final_type__code", flat=True)
    return differential(CellType.objects.as_tree(), list(codes), run.count_target, unfamiliar=unfamiliar.count(),
                        unresolved=list(unresolved.values_list("final_type__code", flat=True)),
                        convention=run.specimen_type)


@dataclass
class RunSummary:
    total: int
    unchanged: int  # not changed by a reviewer (an accepted best guess is unchanged)
    corrected: int  # cells a reviewer gave another type than predicted or guessed (review state `changed`)
    flagged: int
    unresolved: int  # stopped unsure above a type and not reviewed yet
    unfamiliar: int = 0  # unfamiliar cells still awaiting a type
    reviewed: int = 0  # accepted or changed
    flagged_reviewed: int = 0
    accepted: int = 0

    @property
    def agreement(self) -> float | None:
        """Share of cells a reviewer did not change (the predicted type or the accepted best guess)."""
        return self.unchanged / self.total if self.total else None

    @property
    def review(self) -> dict:
        """Review progress, e.g. flagged 12 / 14 reviewed."""
        return {"flagged": self.flagged, "flagged_reviewed": self.flagged_reviewed, "reviewed": self.reviewed,
                "total": self.total}


def run_summary(run: ClassificationRun) -> RunSummary:
    total = reviewed = flagged = flagged_reviewed = corrected = accepted = unresolved = unfamiliar = 0
    pending, changed = ClassifiedCell.Review.PENDING, ClassifiedCell.Review.CHANGED
    for flags, state, resolved, strange in run.cells.order_by().values_list("flags", "review_state", "resolved",
                                                                            "unfamiliar").iterator(chunk_size=2000):
        total += 1
        reviewed += state != pending
        flagged += bool(flags)
        flagged_reviewed += bool(flags) and state != pending
        corrected += state == changed
        accepted += state == ClassifiedCell.Review.ACCEPTED
        unresolved += not resolved and state == pending
        unfamiliar += strange and state == pending
    return RunSummary(total, total - corrected, corrected, flagged, unresolved, unfamiliar, reviewed, flagged_reviewed,
                      accepted)


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
        "review": summary.review,
        "differential": run_differential(run).as_dict(), "site_shift": run.site_shift,
        "scale": run.scale.get("run") or {}, "colour": run.colour, "error": run.error,
    }


# --- verification ------------------------------------------------------------------------------


def _locked_message(run: ClassificationRun) -> str:
    who = run.signed_off_by.get_username() if run.signed_off_by else "someone"
    when = timezone.localtime(run.signed_off_at).strftime("%Y-%m-%d %H:%M") if run.signed_off_at else "earlier"
    return f"Run {run.pk} was signed off by {who} on {when}; it is locked and cannot be changed."


def correct_cell(*, cell_id: int, code: str, user, expected_version: int | None = None) -> ClassifiedCell:
    """Set a cell's verified type (a review: see `review_cell`); the prediction stays as it was."""
    return review_cell(cell_id=cell_id, code=code, user=user, expected_version=expected_version)


@transaction.atomic
def review_cell(*, cell_id: int, user, code: str | None = None, best_guess: bool = False,
                expected_version: int | None = None) -> ClassifiedCell:
    """Review one cell: `code` gives it that type, `best_guess` its best guess, neither accepts the type it shows.

    The predicted type or the best guess is an acceptance (state `accepted`; an unresolved cell accepted at its
    best guess is resolved), any other type a change (`changed`); who and when are kept, and every change of the
    type stays in the Correction table (an accepted best guess too, as an audit entry, not counted as a
    correction). Refused on a locked run, a run awaiting a supervisor (unless one reviews), or a stale view."""
    cell = (ClassifiedCell.objects.select_for_update().select_related(
        "run", "run__signed_off_by", "final_type", "guess_type", "corrected_by").get(pk=cell_id))
    if cell.run.locked:
        raise AnalysisError(_locked_message(cell.run))
    if cell.run.active:
        raise AnalysisError("This run is still being classified; correct its cells when it is done.")
    if cell.run.awaiting_second_sign_off and not is_supervisor(user):
        raise AnalysisError(f"Run {cell.run.pk} is signed off and awaits a supervisor's second sign-off: only a "
                            "supervisor may change its cells now.")
    if expected_version is not None and cell.version != expected_version:
        who = cell.corrected_by.get_username() if cell.corrected_by else "someone"
        when = timezone.localtime(cell.corrected_at).strftime("%H:%M:%S") if cell.corrected_at else ""
        raise ConflictError(
            f"{who} changed this cell to {cell.final_type.code} ({cell.final_type.name}) at {when} while you were "
            "looking at it. It now shows their choice: check it and correct again if needed."
        )
    if best_guess:
        if cell.guess_type is None:
            raise AnalysisError(f"Cell {cell.index} has no best guess to accept.")
        new_type = cell.guess_type
    elif code:
        new_type = CellType.objects.filter(code=code).first()
        if new_type is None:
            raise AnalysisError(f"{code!r} is not a cell type of the tree.")
    else:
        new_type = cell.final_type
    if new_type.parent_id is None:
        raise AnalysisError(f"Cell {cell.index} has no type yet (it stopped at the root): give it one, Not "
                            "identifiable when it cannot be told.")
    if new_type.pk == cell.final_type_id and cell.review_state != ClassifiedCell.Review.PENDING:
        return cell  # reviewed already and nothing changes: the first review stands
    now, fields = timezone.now(), ["review_state", "reviewed_by", "reviewed_at"]
    if new_type.pk != cell.final_type_id:
        Correction.objects.create(cell=cell, user=user, from_type=cell.final_type, to_type=new_type)
        cell.final_type = new_type
        cell.corrected_by, cell.corrected_at = user, now
        cell.version += 1
        fields += ["final_type", "corrected_by", "corrected_at", "version"]
    accepted = new_type.pk in (cell.predicted_type_id, cell.guess_type_id)
    cell.review_state = ClassifiedCell.Review.ACCEPTED if accepted else ClassifiedCell.Review.CHANGED
    cell.reviewed_by, cell.reviewed_at = user, now
    cell.save(update_fields=fields)
    return cell


@dataclass
class SignOffCheck:
    """What a sign-off would sign, and the rules it meets or not (the confirmation shows it; sign_off enforces it)."""

    cells: int
    reviewed: int
    flagged: int
    flagged_reviewed: int
    counted: int
    target: int
    refusals: list[str]  # rules no reason overrides
    needs_reason: list[str]  # rules a stated reason overrides
    second_review: str = ""  # why a supervisor must confirm the sign-off; empty when no one must
    convention: str = ""

    @property
    def target_reached(self) -> bool:
        return self.counted >= self.target


def _when(moment) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M") if moment else "earlier"


def second_review_reason(run: ClassificationRun, counts: Differential, summary: RunSummary) -> str:
    """Why the run's site wants a supervisor's second sign-off (blasts or unfamiliar cells over its limit), or ''."""
    site = run.site
    if site is None:
        return ""
    reasons = []
    blast_limit, unfamiliar_limit = site.second_review_blast_share, site.second_review_unfamiliar_share
    if blast_limit is not None and counts.counted and counts.blasts / counts.counted > blast_limit:
        reasons.append(f"blasts {100 * counts.blasts / counts.counted:.1f} % of the cells counted, over the site's "
                       f"limit of {100 * blast_limit:g} %")
    unfamiliar = run.cells.filter(unfamiliar=True).count() if unfamiliar_limit is not None else 0
    if unfamiliar_limit is not None and summary.total and unfamiliar / summary.total > unfamiliar_limit:
        reasons.append(f"unfamiliar cells {100 * unfamiliar / summary.total:.1f} % of the cells, over the site's "
                       f"limit of {100 * unfamiliar_limit:g} %")
    return "; ".join(reasons)


def signoff_check(run: ClassificationRun, *, summary: RunSummary | None = None,
                  counts: Differential | None = None) -> SignOffCheck:
    summary = summary or run_summary(run)
    counts = counts or run_differential(run)
    refusals, needs_reason = [], []
    if not summary.total and not run.active:
        skipped = f" (every one of its {len(run.skipped)} files was skipped)" if run.skipped else ""
        refusals.append(f"Run {run.pk} has no cells{skipped}: there is nothing to sign off.")
    elif run.status != ClassificationRun.Status.SUCCEEDED:
        refusals.append(f"Only a finished run can be signed off; this one is {run.get_status_display().lower()}.")
    if run.needs_acknowledgement:
        refusals.append(
            f"Run {run.pk} is at site-shift alarm: {run.site_shift.get('message', SHIFT_MESSAGE)}. Acknowledge the "
            "warning first (on the run page, or POST to the run's acknowledge-shift in the API).")
    if summary.flagged_reviewed < summary.flagged:
        refusals.append(f"{summary.flagged - summary.flagged_reviewed} of the {summary.flagged} flagged cells are not "
                        "reviewed yet: accept or change each one (the Flagged only view lists them).")
    if summary.total:
        if not counts.target_reached:
            needs_reason.append(f"The count target of {counts.target} cells is not reached: {counts.counted} "
                                "counted.")
        if not summary.reviewed:
            needs_reason.append("No cell was reviewed.")
    return SignOffCheck(summary.total, summary.reviewed, summary.flagged, summary.flagged_reviewed, counts.counted,
                        counts.target, refusals, needs_reason, second_review_reason(run, counts, summary),
                        counts.convention.name)


def _signed_message(run: ClassificationRun) -> str:
    who = run.signed_off_by.get_username() if run.signed_off_by else "someone"
    if run.awaiting_second_sign_off:
        return (f"Run {run.pk} was already signed off by {who} on {_when(run.signed_off_at)} and awaits a "
                "supervisor's second sign-off; nothing changed.")
    return (f"Run {run.pk} was already signed off by {who} on {_when(run.signed_off_at)}. It stays locked; nothing "
            "changed.")


@transaction.atomic
def sign_off(*, run_id: int, user, reason: str = "") -> ClassificationRun:
    """Sign the run off with who and when, and lock it (after a supervisor's second sign-off where the site asks).

    Refused, changing nothing: a run with no cells, unreviewed flagged cells or an unacknowledged site-shift alarm;
    a count target not reached or no cell reviewed, unless a `reason` is given (kept and printed on the report);
    a second sign-off."""
    run = (ClassificationRun.objects.select_for_update().select_related("signed_off_by", "site")
           .get(pk=run_id))
    if run.locked or run.awaiting_second_sign_off:
        raise AnalysisError(_signed_message(run))
    check = signoff_check(run)
    if check.refusals:
        raise AnalysisError(" ".join(check.refusals) + " Nothing changed.")
    reason = (reason or "").strip()
    if check.needs_reason and not reason:
        raise AnalysisError(" ".join(check.needs_reason) + " Give a reason to sign off anyway (it is kept and printed "
                                                           "on the report); nothing changed.")
    run.signed_off_by, run.signed_off_at, run.signoff_reason = user, timezone.now(), reason
    run.locked = not check.second_review
    run.save(update_fields=["locked", "signed_off_by", "signed_off_at", "signoff_reason"])
    if check.second_review:
        log.info("classification run %s: signed off, awaiting a second sign-off (%s)", run.pk, check.second_review)
    else:
        log.info("classification run %s: signed off and locked%s", run.pk, " (with a reason)" if reason else "")
    return run


@transaction.atomic
def second_sign_off(*, run_id: int, user) -> ClassificationRun:
    """A supervisor (not the first signer) confirms a sign-off the site asked a second look for; the run locks."""
    run = (ClassificationRun.objects.select_for_update().select_related("signed_off_by", "site")
           .get(pk=run_id))
    if run.locked:
        raise AnalysisError(_signed_message(run))
    if not run.awaiting_second_sign_off:
        raise AnalysisError(f"Run {run.pk} is not awaiting a second sign-off: sign it off first.")
    if not is_supervisor(user):
        raise AnalysisError("A second sign-off needs the Supervisor role.")
    if user.pk == run.signed_off_by_id:
        raise AnalysisError(f"The second sign-off must be by another person than the first ({user.get_username()} "
                            "signed it off).")
    check = signoff_check(run)
    if check.refusals:
        raise AnalysisError(" ".join(check.refusals) + " Nothing changed.")
    run.second_signed_off_by, run.second_signed_off_at, run.locked = user, timezone.now(), True
    run.save(update_fields=["second_signed_off_by", "second_signed_off_at", "locked"])
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
               "scale_source", "px_per_um", "scale_vs_training", "own_px_per_um", "familiarity", "review_state",
               "reviewed_by", "reviewed_at"]
SLIDE_CSV_COLUMNS = ["field", "field_index", "box_x1", "box_y1", "box_x2", "box_y2"]  # slide runs: where each cell is


def _slide_values(cell: ClassifiedCell) -> tuple:
    field = cell.field
    return (field.original_name if field else "", field.index if field else "", *(cell.box or ["", "", "", ""]))


def _cell_safe(value) -> str:
    """No spreadsheet formulas from file names (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def path_text(path: list[dict]) -> str:
    return " > ".join(f"{step['code']} {step['probability']:.2f}" for step in path)


def write_csv(run: ClassificationRun, out) -> int:
    """One row per cell: file, predicted path with confidences, final type, flags. Returns rows written."""
    writer = csv.writer(out)
    slide = run.kind == ClassificationRun.Kind.SLIDE
    writer.writerow(CSV_COLUMNS + (SLIDE_CSV_COLUMNS if slide else []))
    cells = run.cells.with_types().order_by("index")
    cells = cells.select_related("field") if slide else cells
    n = 0
    for cell in cells.iterator(chunk_size=1000):
        writer.writerow([_cell_safe(value) for value in (
            cell.original_name, cell.index, cell.predicted_type.code, cell.predicted_type.name, path_text(cell.path),
            f"{cell.confidence:.4f}", cell.final_type.code, cell.final_type.name,
            "yes" if cell.review_state == ClassifiedCell.Review.CHANGED else "",  # an accepted best guess is no change
            "; ".join(cell.flags), "yes" if cell.resolved else "no",
            cell.corrected_by.get_username() if cell.corrected_by else "",
            cell.corrected_at.isoformat(timespec="seconds") if cell.corrected_at else "", cell.model_set_name,
            cell.guess_type.code if cell.guess_type else "", cell.views, cell.scale.get("source", ""),
            cell.scale.get("px_per_um") or "", cell.scale.get("ratio") or "", cell.scale.get("own_px_per_um") or "",
            "" if cell.familiarity is None else cell.familiarity, cell.review_state,
            cell.reviewed_by.get_username() if cell.reviewed_by else "",
            cell.reviewed_at.isoformat(timespec="seconds") if cell.reviewed_at else "",
        ) + (_slide_values(cell) if slide else ())])
        n += 1
    return n
