"""Sites and verification studies: start a study (page, API, command), run it (worker or foreground), read it;
put a set into routine use at a site; quality control over time.

A study classifies a dataset's labelled cells with a model set and keeps the numbers of
`hemoweb.ml.verification.verify_cells` on a `VerificationStudy` row, judged by the site's acceptance criteria.
Cells the set was trained on (by sha256: the train and val cells of the datasets its cards name) are left out of
the scores and counted. The page and the API queue the study on the short-jobs queue; the command runs it in the
foreground. Either way the row records status, progress, worker and errors.
"""

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from apps.analysis.services import AnalysisError, ModelChoice, choose_models, load_classifier
from apps.cells.models import Cell, Dataset, Split
from apps.classifiers.models import ModelSet
from hemoweb.ml.verification import LabelledCell, VerificationError, select_cells, verify_cells
from hemoweb.ml.weights import ModelFileError, read_card, read_set

from .models import Site, VerificationStudy

log = logging.getLogger(__name__)
TASK = "apps.sites.tasks.run_study_task"
SAVE_EVERY_SECONDS = 2.0
RUN_NAME = re.compile(r"^run(\d+)_")  # cells a signed-off run sent to a dataset: run<id>_<index>.<ext>


class StudyError(ValueError):
    """A study cannot start, or a site cannot be changed so; the message is for a lab user."""


# --- sites ---------------------------------------------------------------------------------------------


def site_for_user(user) -> Site:
    """The user's site (their SiteMember row), else the default site."""
    return Site.objects.for_user(user)


def find_site(spec: Site | str | int | None) -> Site:
    """A site by instance, id or name; the default site for None."""
    if isinstance(spec, Site):
        return spec
    if spec in (None, ""):
        return Site.objects.default()
    found = Site.objects.filter(name=str(spec)).first()
    if found is None and str(spec).isdigit():
        found = Site.objects.filter(pk=int(spec)).first()
    if found is None:
        names = ", ".join(Site.objects.values_list("name", flat=True))
        raise StudyError(f"No site named {spec!r}. Sites: {names}.")
    return found


def latest_study(site: Site, model_set: ModelSet | None) -> VerificationStudy | None:
    """The newest study of `model_set` at `site` (finished or not)."""
    if model_set is None:
        return None
    return VerificationStudy.objects.filter(site=site, model_set=model_set).first()


def routine_warning(site: Site, model_set: ModelSet | None, study: VerificationStudy | None) -> str:
    """What a curator must read before a set classifies patients' cells at a site ('' when its latest study passed)."""
    if model_set is None:
        return f"No model set is active, so {site.name} has no set to classify with."
    if study is None:
        return (f"{model_set.name} has no verification study at {site.name}: verify it on the site's own labelled "
                "cells before it classifies patients' cells.")
    when = timezone.localtime(study.created).strftime("%Y-%m-%d %H:%M")
    if study.active:
        return f"The verification study of {model_set.name} at {site.name} (started {when}) is not finished yet."
    if study.status == VerificationStudy.Status.FAILED:
        return f"The latest verification study of {model_set.name} at {site.name} ({when}) could not run: {study.error}"
    if not study.passed:
        verdicts = study.results.get("verdicts", {})
        failing = [code for code, verdict in verdicts.items() if verdict.get("passed") is False]
        detail = (f": {', '.join(failing)} below the acceptance criteria" if failing
                  else ": no type had enough cells to judge")
        return f"The latest verification study of {model_set.name} at {site.name} ({when}) failed{detail}."
    return ""


@dataclass
class RoutineUse:
    site: Site
    model_set: ModelSet | None
    study: VerificationStudy | None  # its latest study at the site
    warning: str
    queued: VerificationStudy | None = None  # the quality-control study the change started


@transaction.atomic
def use_model_set(*, site: Site, model_set: ModelSet | None, user=None) -> RoutineUse:
    """Make `model_set` the site's set for routine use (None: follow the active set); see `routine_use`."""
    changed = site.model_set_id != (model_set.pk if model_set else None)
    site.model_set = model_set
    site.save(update_fields=["model_set"])
    return routine_use(site, user=user, changed=changed)


def routine_use(site: Site, *, user=None, changed: bool = False) -> RoutineUse:
    """The site's set in use with its latest study there, and a warning when it has none or it failed. After a
    change, a site with reference cells verifies the new set on them at once."""
    in_use = site.set_in_use()
    queued = None
    if changed and site.reference_dataset_id and in_use is not None:
        queued = _quality_control_or_note(site, user, VerificationStudy.Trigger.SET_CHANGED)
    study = latest_study(site, in_use)
    return RoutineUse(site, in_use, study, routine_warning(site, in_use, study), queued)


def after_activation(model_set: ModelSet, user=None) -> list[str]:
    """The active set changed: every site that follows it and keeps reference cells verifies it again.
    Returns a line per site for the curator who activated it."""
    notes = []
    for site in Site.objects.filter(model_set=None).exclude(reference_dataset=None):
        study = _quality_control_or_note(site, user, VerificationStudy.Trigger.SET_CHANGED)
        if isinstance(study, VerificationStudy):
            notes.append(f"{site.name} follows the active set: verification study {study.pk} of {model_set.name} "
                         f"on {study.dataset_name} is queued.")
    return notes


def _quality_control_or_note(site: Site, user, trigger: str) -> VerificationStudy | None:
    try:
        return quality_control(site=site, user=user, trigger=trigger)
    except StudyError as error:  # the change stands; the site page shows that no study could start, and why
        log.warning("site %s: quality control could not start: %s", site.pk, error)
        return None


def quality_control(*, site: Site, user=None, trigger: str = VerificationStudy.Trigger.QUALITY_CONTROL,
                    enqueue: bool = True) -> VerificationStudy:
    """Verify the site's set on the site's reference cells again (a new point on its agreement-over-time chart)."""
    if site.reference_dataset_id is None:
        raise StudyError(f"{site.name} has no reference cells: a curator chooses a labelled dataset as its "
                         "reference dataset in the admin.")
    return start_study(dataset=site.reference_dataset, site=site, user=user, trigger=trigger, enqueue=enqueue)


# --- starting a study ---------------------------------------------------------------------------------


def training_cells(folder: Path) -> tuple[set[str], list[str]]:
    """(sha256 of the set's training cells, the datasets they were looked up in): the train and val cells of the
    datasets named in the set's cards (set.json and every node card) that exist in this database."""
    names: set[str] = set()
    try:
        card = read_set(folder)
        names.update(_dataset_names(card.data))
        for file_name in card.nodes.values():
            names.update(_dataset_names(read_card(Path(folder) / file_name).data))
    except ModelFileError:
        return set(), []
    found = list(Dataset.objects.filter(name__in=names).order_by("name").values_list("name", flat=True))
    sha256 = set(Cell.objects.filter(dataset__name__in=found, split__in=[Split.TRAIN, Split.VAL])
                 .values_list("sha256", flat=True))
    return sha256, found


def _dataset_names(data: dict) -> set[str]:
    names = {data.get("dataset")} | set(data.get("datasets") or [])
    return {name for name in names if isinstance(name, str) and name}


def _cells(dataset: Dataset, load: bool) -> list[LabelledCell]:
    rows = dataset.cells.order_by("pk").values_list("image", "cell_type__code", "sha256", "slide_id", "original_name")
    cells = []
    for image, code, sha256, slide, original in rows:
        run = RUN_NAME.match(original or "")
        group = f"slide {slide}" if slide else (f"run {run.group(1)}" if run else "")
        cells.append(LabelledCell(_loader(default_storage.path(image)) if load else _never, code, sha256, group))
    return cells


def _never():
    raise RuntimeError("this cell list is for checking the selection only")


def _loader(path: str):
    def load():
        from PIL import Image

        with Image.open(path) as image:
            return image.convert("RGB")
    return load


def _dataset(spec: Dataset | str | int) -> Dataset:
    if isinstance(spec, Dataset):
        return spec
    found = Dataset.objects.filter(name=str(spec)).first()
    if found is None and str(spec).isdigit():
        found = Dataset.objects.filter(pk=int(spec)).first()
    if found is None:
        raise StudyError(f"No dataset named {spec!r}.")
    return found


def _choice(models, site: Site) -> ModelChoice:
    try:
        return choose_models(models if models not in (None, "") else site.set_in_use())
    except AnalysisError as error:
        raise StudyError(str(error)) from error


def start_study(*, dataset: Dataset | str | int, models: ModelSet | str | int | None = None,
                site: Site | str | int | None = None, user=None, trigger: str = VerificationStudy.Trigger.MANUAL,
                enqueue: bool = True) -> VerificationStudy:
    """Check the request, create the study and queue it (short-jobs queue); with enqueue=False it stays queued for
    `run_study` in this process (the command).

    Site: the one given, else the dataset's, else the default. Set: the one given, else the site's set in use."""
    dataset = _dataset(dataset)
    site = find_site(site) if site not in (None, "") else (dataset.site or Site.objects.default())
    choice = _choice(models, site)
    overlap, _ = training_cells(choice.folder)
    try:
        selection = select_cells(_tree(), _cells(dataset, load=False), overlap)
    except VerificationError as error:
        raise StudyError(f"Dataset {dataset.name}: {error}") from error
    study = VerificationStudy.objects.create(
        site=site, dataset=dataset, dataset_name=dataset.name, model_set=choice.model_set, model_set_name=choice.name,
        model_set_version=choice.version, model_folder=str(choice.folder), trigger=trigger,
        created_by=user if getattr(user, "is_authenticated", False) else None, n_total=len(selection.cells))
    if enqueue:
        transaction.on_commit(lambda: _enqueue(study.pk))
    return study


def _enqueue(study_id: int) -> None:
    from django_q.tasks import async_task

    task_id = async_task(TASK, study_id, task_name=f"verification-study-{study_id}")
    VerificationStudy.objects.filter(pk=study_id).update(task_id=task_id)


def _tree():
    from apps.cells.models import CellType

    return CellType.objects.as_tree()


# --- running it -----------------------------------------------------------------------------------------


def run_study(study_id: int, *, echo: Callable[[str], None] | None = None) -> VerificationStudy:
    """Classify the study's cells and store its numbers; the row says how far it got and, failing, why."""
    claimed = VerificationStudy.claim(study_id, status=VerificationStudy.Status.QUEUED,
                                      to=VerificationStudy.Status.RUNNING, started=timezone.now())
    study = VerificationStudy.objects.select_related("site", "dataset", "model_set").get(pk=study_id)
    if not claimed:
        return study
    try:
        if study.dataset is None:
            raise StudyError(f"The dataset {study.dataset_name} was deleted before the study ran.")
        choice = choose_models(study.model_set if study.model_set_id else study.model_folder)
        classifier = load_classifier(choice)
        overlap, looked_in = training_cells(choice.folder)
        cells = _cells(study.dataset, load=True)
        progress = _Progress(study, echo)
        results = verify_cells(classifier, cells, criteria=study.site.criteria, training_sha256=overlap,
                               progress=progress, stated_um_per_px=study.site.um_per_pixel)
        results["left_out"]["training_datasets_checked"] = looked_in
        results.update(site=study.site.name, dataset=study.dataset_name, model_set=study.model_set_name,
                       model_set_version=study.model_set_version)
        study.results = results
        study.n, study.kappa, study.passed = results["n"], results["kappa"], results["passed"]
        study.agreement = results["agreement"]["value"]
        study.n_done = study.n_total = results["n"]
        study.status, study.finished = VerificationStudy.Status.SUCCEEDED, timezone.now()
        study.save()
    except (StudyError, VerificationError, AnalysisError, ModelFileError) as error:
        _mark_failed(study, str(error))
    except Exception as error:  # the study must say it failed, whatever broke
        log.exception("verification study %s failed", study.pk)
        _mark_failed(study, f"The study stopped after {study.n_done} of {study.n_total} cells: {error}")
    return study


class _Progress:
    """verify_cells' callback: cells done onto the row (every few seconds), with the worker's heartbeat."""

    def __init__(self, study: VerificationStudy, echo: Callable[[str], None] | None):
        self.study, self.echo, self.saved = study, echo, 0.0

    def __call__(self, done: int, total: int) -> None:
        self.study.n_done, self.study.n_total = done, total
        if self.echo:
            self.echo(f"{done}/{total} cells classified")
        if time.monotonic() - self.saved >= SAVE_EVERY_SECONDS or done == total:
            self.study.beat()
            self.study.save(update_fields=["n_done", "n_total", "heartbeat"])
            self.saved = time.monotonic()


def _mark_failed(study: VerificationStudy, message: str) -> None:
    study.status, study.error, study.finished = VerificationStudy.Status.FAILED, message, timezone.now()
    study.save(update_fields=["status", "error", "finished", "n_done"])


def check_worker(study: VerificationStudy) -> VerificationStudy:
    """Fail a running study whose worker is gone (killed, machine restarted), wherever a study is read."""
    stale = getattr(settings, "HEMOWEB_CLASSIFY_STALE_SECONDS", 600)
    if study.status != VerificationStudy.Status.RUNNING or not study.is_lost(stale):
        return study
    message = (f"The study stopped after {study.n_done} of {study.n_total} cells: {study.worker_label} running it is "
               "gone (it was killed or its machine restarted). Start it again.")
    VerificationStudy.objects.filter(pk=study.pk, status=VerificationStudy.Status.RUNNING).update(
        status=VerificationStudy.Status.FAILED, error=message, finished=timezone.now())
    study.refresh_from_db()
    return study


# --- reading ----------------------------------------------------------------------------------------------


def studies_of(site: Site):
    return site.studies.select_related("created_by", "model_set")


CHART_W, CHART_H, PAD = 480, 160, 28


def agreement_over_time(site: Site) -> dict:
    """The site's finished studies in time order, one point each: SVG coordinates for agreement and kappa
    (y from the chart's floor to 1), each point with its date, set, dataset and verdict. A drift shows at once."""
    studies = list(site.studies.filter(status=VerificationStudy.Status.SUCCEEDED).exclude(agreement=None)
                   .order_by("finished", "pk"))
    chart = {"width": CHART_W, "height": CHART_H, "pad": PAD, "right": CHART_W - PAD, "bottom": CHART_H - PAD,
             "points": [], "n": len(studies)}
    if not studies:
        return chart
    values = [s.agreement for s in studies] + [s.kappa for s in studies if s.kappa is not None]
    floor = min(0.8, max(0.0, int(min(values) * 10) / 10))
    span = 1.0 - floor or 1.0

    def y(value: float) -> float:
        return round(CHART_H - PAD - (CHART_H - 2 * PAD) * (value - floor) / span, 1)

    last = max(len(studies) - 1, 1)
    points = []
    for index, study in enumerate(studies):
        x = round(PAD + (CHART_W - 2 * PAD) * (index / last if len(studies) > 1 else 0.5), 1)
        points.append({"x": x, "y": y(study.agreement), "ky": None if study.kappa is None else y(study.kappa),
                       "study": study, "date": timezone.localtime(study.finished).strftime("%Y-%m-%d")})
    chart.update(points=points, floor=floor, floor_y=y(floor), top_y=y(1.0),
                 agreement=" ".join(f"{p['x']},{p['y']}" for p in points),
                 kappa=" ".join(f"{p['x']},{p['ky']}" for p in points if p["ky"] is not None))
    return chart
