"""Slide runs: the fields (photographs) of one slide → the detector finds the cells → every white cell is classified
as a cell of one classification run; red cells and platelets are counted per field.

The run then works like any other run (gallery, verification, counts, sign-off, report, CSV): its cells are ordinary
`ClassifiedCell` rows, each naming its `SlideField` and its box on it. Fields are handled a few at a time
(`SLIDE_FIELD_CHUNK`, 8): each group's fields, cells and progress are committed together, so a killed worker leaves
a failed run with the fields and cells done so far (`services.check_worker`).

With `SLIDE_STANDARDISE` on, each field is detected as the detector saw its training fields: white balanced to their
background and resampled to their scale (the slide's scale measured on its red cells; `hemoweb.ml.fields`), boxes
mapped back to the field. It is off by default: on LISC (another lab, half BCCD's magnification, a dim camera) the
shipped BCCD detector then found 80 % of the white cells instead of 2 %, but called most red cells white cells.

A white cell seen twice is counted once:
- the same field uploaded twice (same sha256) is skipped whole, with the reason on the run;
- a field larger than the detector's tile is cut into overlapping tiles and the tiles' boxes merged by NMS
  (`hemoweb.ml.detect.detect`, as on the detection page);
- across different fields the images alone cannot tell where fields overlap, so this is done only when the upload
  says where each field lies: a `fields.csv` (columns `name,x,y`: the field's file name and its top-left corner in
  slide pixels, at the fields' own scale) in the .zip or beside the images. A white cell whose box, moved into slide
  coordinates, overlaps a white cell of an earlier field (IoU ≥ `DEDUPE_IOU`, or its centre inside the earlier box)
  is recorded on its field as `duplicate_of` that cell and is neither classified nor counted again. Without
  offsets, fields are taken not to overlap (as when a technologist moves field by field).
"""

import csv
import hashlib
import io
import logging
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from apps.cells.models import CellType
from apps.cells.services import upload_limits
from apps.detection.models import Detector
from apps.detection.services import DetectionInputError, _load, active_detector, white_cell_crops
from apps.sites.models import Site
from hemoweb.ml import detect as ml
from hemoweb.ml.counts import COUNT_TARGETS
from hemoweb.ml.fields import detect_field
from hemoweb.ml.sources import BadImage, ImageSource, SourceError, decode_checked, read_header
from hemoweb.ml.weights import ModelFileError

from . import services
from .models import ClassificationRun, SlideField
from .services import AnalysisError

log = logging.getLogger(__name__)

OFFSETS_FILE = "fields.csv"
DEDUPE_IOU = 0.5
SIZE_RATIO = 4.0  # a field whose area differs more than this from the slide's usual field is refused
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # what browsers show; other formats are stored as JPEG
# Platelet estimate: the rule of thumb "platelets per 100× oil-immersion field × 20 = platelets × 10⁹/L" (15–20 in
# textbooks) holds for an eyepiece field of about 0.2 mm across, in the monolayer. A camera field is usually smaller:
# where the fields' pixel size is known, the count is first scaled to that field's area.
PLATELET_FACTOR = 20.0
EYEPIECE_FIELD_MM2 = 3.14159 * 0.1**2


def field_chunk() -> int:
    return getattr(settings, "HEMOWEB_SLIDE_FIELD_CHUNK", 8)


def slide_sync_max() -> int:
    """Slides with more fields than this are analysed as a background job."""
    return getattr(settings, "HEMOWEB_SLIDE_SYNC_MAX", 20)


# --- starting a slide run ----------------------------------------------------------------------


def choose_detector(spec: Detector | str | int | None = None) -> Detector:
    """The active detector (no spec), or a registered one by id or name."""
    if isinstance(spec, Detector):
        return spec
    if spec in (None, ""):
        try:
            return active_detector()
        except DetectionInputError as error:
            raise AnalysisError(str(error)) from error
    found = Detector.objects.filter(pk=int(spec)).first() if str(spec).isdigit() else None
    found = found or Detector.objects.filter(name=str(spec)).first()
    if found is None:
        raise AnalysisError(f"No detector with the id or name {spec!r}.")
    return found


def _is_offsets(path: str) -> bool:
    return services.STORED_PREFIX.sub("", PurePosixPath(path).name, count=1).lower() == OFFSETS_FILE


def _new_run(*, owner, models, detector, count_target: int, name: str, identity: dict | None,
             um_per_pixel: float | None, site: Site | None) -> ClassificationRun:
    """Check the choices (specimen identity, models and detector load) and make the queued slide run (unsaved)."""
    if count_target not in COUNT_TARGETS:
        raise AnalysisError(f"The count target must be one of {', '.join(map(str, COUNT_TARGETS))} cells.")
    identity = services._identity(identity)
    site = site or Site.objects.for_user(owner)
    choice = services.choose_models(models if models not in (None, "") else site.set_in_use())
    services.load_classifier(choice)
    detector = choose_detector(detector)
    try:
        _load(detector)
    except DetectionInputError as error:
        raise AnalysisError(str(error)) from error
    return ClassificationRun(
        owner=owner, name=name[:200], model_set=choice.model_set, model_set_name=choice.name,
        model_set_version=choice.version, model_folder=str(choice.folder), count_target=count_target,
        um_per_pixel=um_per_pixel or site.um_per_pixel, site=site, kind=ClassificationRun.Kind.SLIDE,
        detector=detector, detector_name=detector.name, **identity)


def start_slide_run(*, owner, files, models=None, detector=None, count_target: int = 100, name: str = "",
                    identity: dict | None = None, um_per_pixel: float | None = None, site: Site | None = None,
                    run_async: bool | None = None) -> ClassificationRun:
    """Store the fields (images or one .zip), create the slide run, then analyse now or queue a django-q2 job.

    `identity`: the specimen's (apps.analysis.specimen.IDENTITY_FIELDS: accession, specimen_type, ...)."""
    files = list(files or [])
    if not files:
        raise AnalysisError("Choose the slide's fields: several images, or one .zip of them.")
    run = _new_run(owner=owner, models=models, detector=detector, count_target=count_target,
                   name=name or (files[0].name if len(files) == 1 else f"{len(files)} fields"), identity=identity,
                   um_per_pixel=um_per_pixel, site=site)
    upload, _ = services._store_upload(files)
    try:
        with ImageSource(default_storage.path(upload), upload_limits()) as source:
            n_fields = sum(1 for entry in source.files() if not _is_offsets(entry.path))
    except SourceError as error:
        services._remove_upload(upload)
        raise AnalysisError(str(error)) from error
    if n_fields == 0:
        services._remove_upload(upload)
        raise AnalysisError("The upload holds no fields to analyse.")
    run.upload, run.n_total = upload, n_fields
    run.save()
    if run_async is None:
        run_async = n_fields > slide_sync_max()
    if run_async:
        from django_q.tasks import async_task

        async_task("apps.analysis.tasks.analyse_slide_task", run.pk, task_name=f"slide run {run.pk}")
        return run
    return analyse_slide(run.pk)


def slide_from_source(*, source: Path, owner=None, models=None, detector=None, count_target: int = 100,
                      identity: dict | None = None, um_per_pixel: float | None = None, site: Site | None = None,
                      timings: dict | None = None) -> ClassificationRun:
    """Analyse a folder or .zip of fields on disk in place (the command line)."""
    source = Path(source)
    if not source.exists():
        raise AnalysisError(f"{source} does not exist.")
    run = _new_run(owner=owner, models=models, detector=detector, count_target=count_target, name=source.name,
                   identity=identity, um_per_pixel=um_per_pixel, site=site)
    run.save()
    return analyse_slide(run.pk, source=source, timings=timings)


# --- analysing the fields ----------------------------------------------------------------------


@dataclass
class _Field:
    """One field as analysed, before it is stored."""

    index: int
    name: str
    data: bytes = b""
    sha256: str = ""
    fmt: str = ""
    width: int = 0
    height: int = 0
    error: str = ""
    skipped: bool = False  # not analysed at all (not an image, duplicate, size): no image stored, no counts
    image: object = None
    boxes: list[dict] = field(default_factory=list)
    white: list[tuple[int, ml.Box]] = field(default_factory=list)  # (position in boxes, box) of new white cells


@dataclass
class _Slide:
    """What the fields seen so far tell about the slide."""

    usual_size: tuple[int, int] | None
    offsets: dict[str, tuple[float, float]]
    px_per_um: float | None = None  # the fields' scale (red cells, else the stated pixel size)
    standardise: bool = False  # detect on fields standardised to the detector's training fields
    seen: dict[str, tuple[int, str]] = field(default_factory=dict)  # sha256 → (field index, name)
    kept: list[tuple[list[float], int]] = field(default_factory=list)  # white cells in slide pixels, cell index
    next_cell: int = 0


def kind_of(label: str, white_classes) -> str:
    """white, red, platelet or other: how a detector class is counted."""
    lowered = label.lower()
    if label in white_classes:
        return "white"
    if "platelet" in lowered or lowered in ("plt", "thrombocyte"):
        return "platelet"
    if lowered in ("rbc", "red", "red cell", "erythrocyte") or "red" in lowered or "erythro" in lowered:
        return "red"
    return "other"


def _read_offsets(image_source, entries, problems: list) -> dict[str, tuple[float, float]]:
    """name → (x, y) from a fields.csv among the upload's files; unusable lines are reported, not fatal."""
    offsets: dict[str, tuple[float, float]] = {}
    for entry in entries:
        try:
            text = image_source.read(entry.path).decode("utf-8-sig")
        except (UnicodeDecodeError, BadImage, SourceError) as error:
            problems.append([OFFSETS_FILE, f"not read ({error}); fields are taken not to overlap"])
            continue
        reader = csv.DictReader(io.StringIO(text))
        if not {"name", "x", "y"} <= set(reader.fieldnames or []):
            problems.append([OFFSETS_FILE, "needs the columns name,x,y; fields are taken not to overlap"])
            continue
        for line, row in enumerate(reader, start=2):
            try:
                offsets[PurePosixPath(row["name"].strip()).name] = (float(row["x"]), float(row["y"]))
            except (TypeError, ValueError):
                problems.append([OFFSETS_FILE, f"line {line}: x and y must be numbers; that field is not deduplicated"])
    return offsets


def _usual_size(image_source, entries, limits) -> tuple[int, int] | None:
    """The most common field size of the slide, from the image headers (unreadable files left out)."""
    sizes = Counter()
    for entry in entries:
        try:
            _, _, width, height = read_header(image_source.read(entry.path), limits.max_pixels)
        except (BadImage, SourceError, zipfile.BadZipFile, zlib.error, EOFError):
            continue
        sizes[(width, height)] += 1
    return sizes.most_common(1)[0][0] if sizes else None


def box_iou(a, b) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _seen_before(box: list[float], kept: list[tuple[list[float], int]]) -> int | None:
    """The cell index of an earlier white cell this slide-coordinate box is (IoU or centre inside), else None."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for other, cell in kept:
        if box_iou(box, other) >= DEDUPE_IOU or (other[0] <= cx <= other[2] and other[1] <= cy <= other[3]):
            return cell
    return None


def _analyse_field(image_source, entry, index: int, name: str, slide: _Slide, model, limits) -> _Field:
    """Read, check, decode and detect one field (standardised to the detector's training fields in exposure and
    scale where `SLIDE_STANDARDISE` asks); a field that cannot be used says why."""
    result = _Field(index, name)
    try:
        result.data = image_source.read(entry.path)
    except BadImage as error:
        result.error, result.skipped = str(error), True
        return result
    except (SourceError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        result.error, result.skipped = f"the archive is damaged at this entry ({error})", True
        return result
    result.sha256 = hashlib.sha256(result.data).hexdigest()
    if result.sha256 in slide.seen:
        first, first_name = slide.seen[result.sha256]
        result.error = (f"the same image as field {first + 1} ({first_name}): skipped, so that its cells are not "
                        "counted twice")
        result.skipped = True
        return result
    try:
        image, result.fmt, result.width, result.height = decode_checked(result.data, limits.max_pixels)
    except BadImage as error:
        result.error, result.skipped = str(error), True
        return result
    slide.seen[result.sha256] = (index, name)
    if slide.usual_size:
        usual_w, usual_h = slide.usual_size
        ratio = (result.width * result.height) / (usual_w * usual_h)
        if not 1 / SIZE_RATIO <= ratio <= SIZE_RATIO:
            result.error = (f"this field is {result.width}×{result.height} pixels, the slide's fields "
                            f"{usual_w}×{usual_h}: from another camera or magnification? Skipped, as its cells and "
                            "platelets would not compare; analyse it in a run of its own")
            result.skipped = True
            return result
    result.image = image
    detection = detect_field(model, image, slide.px_per_um) if slide.standardise else ml.detect(model, image)
    white_classes = model.card.cell_classes
    offset = slide.offsets.get(PurePosixPath(name).name)
    for box in detection.boxes:
        record = {"label": box.label, "kind": kind_of(box.label, white_classes),
                  "box": [round(v, 1) for v in (box.x1, box.y1, box.x2, box.y2)], "score": round(box.score, 3),
                  "cell": None, "duplicate_of": None}
        result.boxes.append(record)
        if record["kind"] != "white":
            continue
        if offset is not None:
            on_slide = [box.x1 + offset[0], box.y1 + offset[1], box.x2 + offset[0], box.y2 + offset[1]]
            earlier = _seen_before(on_slide, slide.kept)
            if earlier is not None:
                record["duplicate_of"] = earlier  # a cell index for now; the cell's id once stored
                continue
            slide.kept.append((on_slide, slide.next_cell))
        record["cell"] = slide.next_cell
        result.white.append((len(result.boxes) - 1, box))
        slide.next_cell += 1
    if not detection.boxes:
        result.error = "no cells were found on this field (an empty area, out of focus, or not a blood smear?)"
    return result


def _cell_items(result: _Field, classifier, scale) -> list[tuple]:
    """The field's new white cells as `services._classify_chunk` takes them (crops at the set's scale)."""
    boxes = [box for _, box in result.white]
    crops = white_cell_crops(result.image, boxes, classifier.scale_reference, scale)
    items = []
    for number, ((position, _), crop) in enumerate(zip(result.white, crops, strict=True), start=1):
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=92)
        tensor, record = classifier.prepare(crop, scale)
        items.append((result.boxes[position]["cell"], f"{result.name} cell {number}", buffer.getvalue(), tensor,
                      record, "JPEG", crop.width, crop.height))
    return items


def _store_group(run: ClassificationRun, group: list[_Field], done: int, classifier, scale, types, clock,
                 now, seen) -> None:
    """The group's fields, their cells and the run's progress in one transaction."""
    items, extra = [], []
    with transaction.atomic():
        rows = []
        for result in group:
            stored = ""
            if not result.skipped:
                suffix = STORED_FORMATS.get(result.fmt, "jpg")
                data = result.data
                if result.fmt not in STORED_FORMATS:
                    buffer = io.BytesIO()
                    result.image.save(buffer, format="JPEG", quality=92)
                    data = buffer.getvalue()
                stored = default_storage.save(
                    f"analysis/{run.pk}/fields/{result.index:05d}_{result.sha256[:12]}.{suffix}", ContentFile(data))
            kinds = Counter(box["kind"] for box in result.boxes)
            row = SlideField.objects.create(
                run=run, index=result.index, image=stored, original_name=result.name[-255:], sha256=result.sha256,
                width=result.width, height=result.height, boxes=result.boxes, n_white=len(result.white),
                n_red=kinds["red"], n_platelets=kinds["platelet"], error=result.error[:255])
            rows.append(row)
            if result.error:
                run.skipped.append([result.name, result.error])
            if result.white:
                for item, (position, _) in zip(_cell_items(result, classifier, scale), result.white, strict=True):
                    items.append(item)
                    extra.append({"field": row, "box": result.boxes[position]["box"]})
        services._classify_chunk(run, [], 0, items, classifier, types, 64, clock, now, seen, extra=extra, done=done)
        indices = {box[key] for result in group for box in result.boxes for key in ("cell", "duplicate_of")
                   if box[key] is not None}
        ids = dict(run.cells.filter(index__in=indices).values_list("index", "pk"))
        for row in rows:
            for box in row.boxes:
                for key in ("cell", "duplicate_of"):
                    if box[key] is not None:
                        box[key] = ids.get(box[key])
            if row.boxes:
                row.save(update_fields=["boxes"])


def analyse_slide(run_id: int, *, source: Path | None = None, timings: dict | None = None) -> ClassificationRun:
    """Detect, count and classify a queued slide run's fields a group at a time, committing each group."""
    import time

    claimed = ClassificationRun.claim(run_id, status=ClassificationRun.Status.QUEUED,
                                      to=ClassificationRun.Status.RUNNING, started=timezone.now())
    run = ClassificationRun.objects.select_related("model_set", "detector").get(pk=run_id)
    if not claimed:
        return run
    clock = timings if timings is not None else {}
    for key in ("preparation", "detection", "inference", "database"):
        clock.setdefault(key, 0.0)
    try:
        if run.detector is None:
            raise AnalysisError(f"The detector {run.detector_name} of this run was deleted; start the run again.")
        try:
            model = _load(run.detector)
        except DetectionInputError as error:
            raise AnalysisError(str(error)) from error
        classifier = services.load_classifier(services._choice_for_run(run))
        types = {node.code: node for node in CellType.objects.all()}
        limits = upload_limits()
        location = source if source is not None else default_storage.path(run.upload)
        with ImageSource(location, limits) as image_source:
            started = time.perf_counter()
            entries = list(image_source.files())
            fields = [entry for entry in entries if not _is_offsets(entry.path)]
            slide = _Slide(_usual_size(image_source, fields, limits),
                           _read_offsets(image_source, [e for e in entries if _is_offsets(e.path)], run.skipped))
            run.n_total, run.engine = len(fields), classifier.engine
            run.beat()
            run.save(update_fields=["n_total", "engine", "heartbeat", "skipped"])
            # the slide's scale from its red cells, also for a set that takes cells as they are: the platelet
            # estimate needs the fields' area
            scale = services._run_scale(run, classifier, image_source, fields, limits)
            slide.px_per_um, slide.standardise = scale.px_per_um, getattr(settings, "HEMOWEB_SLIDE_STANDARDISE", False)
            seen: dict[str, list] = {"scale": [], "background": [], "familiarity": []}
            clock["preparation"] += time.perf_counter() - started  # the slide's usual field size and scale
            chunk = field_chunk()
            for start in range(0, len(fields), chunk):
                started = time.perf_counter()
                group = [_analyse_field(image_source, entry, index, services.uploaded_name(run, entry.path), slide,
                                        model, limits)
                         for index, entry in enumerate(fields[start:start + chunk], start)]
                clock["detection"] += time.perf_counter() - started
                _store_group(run, group, start + len(group), classifier, scale, types, clock, time.perf_counter,
                             seen)
        services.finish_run(run, classifier, scale, seen)
    except (SourceError, AnalysisError, ModelFileError) as error:
        services._mark_failed(run, str(error))
    except Exception as error:  # the run must say it failed, whatever broke
        log.exception("slide run %s failed", run.pk)
        services._mark_failed(run, f"The slide analysis stopped after {run.n_done} of {run.n_total} fields: {error}")
    finally:
        if source is None and run.upload:
            services._remove_upload(run.upload)
            ClassificationRun.objects.filter(pk=run.pk).update(upload="")
            run.upload = ""
    return run


# --- reading slide runs ------------------------------------------------------------------------


def field_px_per_um(run: ClassificationRun) -> float | None:
    """The fields' pixels per µm: the run's measured scale, else its stated pixel size; None when unknown."""
    used = (run.scale or {}).get("run") or {}
    if used.get("px_per_um") and not used.get("flag"):
        return float(used["px_per_um"])
    return 1 / run.um_per_pixel if run.um_per_pixel else None


def platelet_estimate(per_field: list[int], field_area_mm2: float | None) -> dict:
    """Mean platelets per field and the lab's rule-of-thumb estimate (× 10⁹/L), with what it assumes."""
    if not per_field:
        return {"fields": 0, "mean_per_field": None, "estimate_per_l": None, "assumes": ""}
    mean = sum(per_field) / len(per_field)
    if field_area_mm2:
        per_eyepiece = mean * EYEPIECE_FIELD_MM2 / field_area_mm2
        assumes = (f"{PLATELET_FACTOR:g} × 10⁹/L per platelet in a 100× oil-immersion eyepiece field "
                   f"({EYEPIECE_FIELD_MM2:.3f} mm²), the fields ({field_area_mm2:.4f} mm² each at the measured "
                   "scale) scaled to it, in the monolayer")
    else:
        per_eyepiece = mean
        assumes = (f"{PLATELET_FACTOR:g} × 10⁹/L per platelet per field, taking each photograph as a whole 100× "
                   "oil-immersion eyepiece field (the pixel size is unknown, so camera fields, usually smaller, "
                   "are not scaled: likely an underestimate)")
    return {"fields": len(per_field), "mean_per_field": round(mean, 2),
            "estimate_per_l": round(per_eyepiece * PLATELET_FACTOR), "assumes": assumes}


def slide_summary(run: ClassificationRun) -> dict:
    """The run's fields with their counts, and per-field means and the platelet estimate over the usable fields."""
    fields = list(run.fields.order_by("index"))
    usable = [f for f in fields if f.image and not f.error]
    px_per_um = field_px_per_um(run)
    area = None
    if usable and px_per_um:
        area = sum(f.width * f.height for f in usable) / len(usable) / px_per_um**2 / 1e6
    duplicates = sum(1 for f in fields for box in f.boxes if box.get("duplicate_of"))
    return {
        "fields": len(fields), "usable": len(usable), "white": sum(f.n_white for f in fields),
        "duplicates": duplicates, "red": sum(f.n_red for f in usable), "platelets": sum(f.n_platelets for f in usable),
        "red_per_field": round(sum(f.n_red for f in usable) / len(usable), 1) if usable else None,
        "platelet_estimate": platelet_estimate([f.n_platelets for f in usable], area),
    }


def field_record(slide_field: SlideField) -> dict:
    """A field as the API and the JSON summary give it."""
    return {"index": slide_field.index, "name": slide_field.original_name, "sha256": slide_field.sha256,
            "width": slide_field.width, "height": slide_field.height, "n_white": slide_field.n_white,
            "n_red": slide_field.n_red, "n_platelets": slide_field.n_platelets, "error": slide_field.error,
            "image": slide_field.image.url if slide_field.image else None, "boxes": slide_field.boxes}


def slide_record(run: ClassificationRun) -> dict:
    """What `analyse_slide --json` writes: the run's record (as `classify --json`), the slide's counts, its fields."""
    return {**services.run_record(run), "kind": run.kind, "accession": run.accession,
            "specimen_type": run.specimen_type, "detector": run.detector_name, "slide": slide_summary(run),
            "fields": [field_record(f) for f in run.fields.order_by("index")]}


def with_slide(run: ClassificationRun, data: dict) -> dict:
    """A run's API representation with its kind and, for a slide run, its detector, slide counts and fields."""
    data["kind"] = run.kind
    if run.kind == ClassificationRun.Kind.SLIDE:
        data.update({"accession": run.accession, "specimen_type": run.specimen_type, "detector": run.detector_name,
                     "slide": slide_summary(run),
                     "fields": [field_record(f) for f in run.fields.order_by("index")]})
    return data
