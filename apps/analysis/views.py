"""Pages: upload and classify, watch progress, verify cells with mouse or keyboard, sign off, export."""

import json
from itertools import groupby

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Case, IntegerField, Value, When
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_POST

from apps.accounts.roles import is_supervisor, lab_staff_required
from apps.cells.models import CellType
from apps.operations.queue import SHORT_JOBS_COMMAND, no_worker_hint
from hemoweb.ml.counts import UNFAMILIAR_NAME

from . import services
from . import specimen as specimen_identity
from .forms import ClassifyForm, CorrectForm, SpecimenForm
from .models import ClassificationRun
from .review import reference_strips
from .report import report_context
from .worklist import worklist

GALLERY_PAGE_SIZE = 200
KEY_CHARS = "abcdefghijklmnopqrstuvwxyz1234567890"


def _run_for(request, pk: int) -> ClassificationRun:
    return services.check_worker(get_object_or_404(services.runs_for(request.user).select_related("model_set"), pk=pk))


# Types of a routine differential get their keys first, so that they get their own letter (n for NGS).
KEY_PRIORITY = ("NGS", "NGB", "LYT", "MON", "EOS", "BAS", "EBO", "PLT", "BLA", "MYB", "MMZ", "PMO", "PEB", "LYI",
                "PLM", "HAC", "ART", "KSC")


def key_map(types) -> dict[str, str]:
    """One key per cell type: the first free letter of its code, else the first free character."""
    keys: dict[str, str] = {}
    rank = {code: position for position, code in enumerate(KEY_PRIORITY)}
    for cell_type in sorted(types, key=lambda t: rank.get(t.code, len(rank))):
        for char in cell_type.code.lower() + KEY_CHARS:
            if char not in keys:
                keys[char] = cell_type.code
                break
    return keys


def _choices():
    types = list(CellType.objects.exclude(parent=None).order_by("order", "code"))
    keys = key_map(types)
    key_of = {code: key for key, code in keys.items()}
    return [{"code": t.code, "name": t.name, "key": key_of.get(t.code, "")} for t in types], keys


@lab_staff_required
def home(request):
    form = ClassifyForm(request.POST if request.method == "POST" else None, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.start_run(
                owner=request.user, files=request.FILES.getlist("files"), models=form.cleaned_data["model_set"],
                count_target=form.cleaned_data["count_target"], name=form.cleaned_data["name"],
                um_per_pixel=form.cleaned_data["um_per_pixel"], sync_limit=services.page_sync_max(),
                identity=form.identity(),
            )
        except services.AnalysisError as error:
            form.add_error(None, str(error))
        else:
            if run.status == ClassificationRun.Status.FAILED and not run.no_usable_images:  # the run page says why
                messages.error(request, f"Classification failed: {run.error}")
            return redirect("analysis:run", pk=run.pk)
    runs = worklist(request.user, request.GET, request.GET.get("page"))  # awaiting review first, filtered
    return render(request, "analysis/home.html", {"form": form, "worklist": runs, "sync_max": services.page_sync_max()},
                  status=400 if form.errors else 200)


def _run_context(request, run: ClassificationRun) -> dict:
    view = request.GET.get("view", "gallery")
    cells = run.cells.with_types()
    if request.GET.get("flagged"):
        cells = cells.exclude(flags=[])
    if view == "gallery":  # unfamiliar cells awaiting a type first, in their own group: they need a person
        pending = services.awaiting_review(run.cells.all()).values("pk")
        cells = cells.annotate(review_first=Case(When(pk__in=pending, then=Value(0)), default=Value(1),
                                                 output_field=IntegerField()))
        cells = cells.order_by("review_first", "final_type__order", "final_type__code", "index")
    else:
        cells = cells.order_by("index")
    page = Paginator(cells, GALLERY_PAGE_SIZE).get_page(request.GET.get("page"))

    def group_of(cell) -> str:
        return "" if getattr(cell, "review_first", 1) == 0 else cell.final_type.code

    groups = [{"type": None if not key else items[0].final_type, "unfamiliar": not key, "cells": items,
               "title": UNFAMILIAR_NAME if not key else ""}
              for key, items in ((key, list(group)) for key, group in groupby(page, key=group_of))]
    choices, keys = _choices()
    return {
        "run": run, "page": page, "groups": groups, "view": view, "choices": choices,
        "keys_json": json.dumps(keys), **_review_context(request, run),
        "flagged_only": bool(request.GET.get("flagged")),
        "specimen_form": SpecimenForm(initial={key: getattr(run, key) for key in specimen_identity.IDENTITY_FIELDS}),
        "queue_hint": _queue_hint(run),
    }


def _review_context(request, run: ClassificationRun) -> dict:
    """Counts, review progress and what a sign-off would sign (templates/analysis/_sign_off.html)."""
    counts, summary = services.run_differential(run), services.run_summary(run)
    return {"counts": counts, "summary": summary,
            "signoff": services.signoff_check(run, summary=summary, counts=counts) if not run.active else None,
            "can_second_sign": is_supervisor(request.user) and request.user.pk != run.signed_off_by_id,
            "confirm_open": request.GET.get("sign-off") == "confirm"}


def _queue_hint(run: ClassificationRun) -> str:
    if run.status != ClassificationRun.Status.QUEUED:
        return ""
    return no_worker_hint("classification", settings.Q_CLUSTER["name"], run.created, SHORT_JOBS_COMMAND)


@lab_staff_required
def run_detail(request, pk: int):
    run = _run_for(request, pk)
    return render(request, "analysis/run.html", _run_context(request, run))


@lab_staff_required
def reference(request, pk: int):
    """Typical training cells of a type and its alternatives (GET type, alt...), for the gallery's detail panel."""
    run = _run_for(request, pk)
    codes = [request.GET.get("type", "")] + request.GET.getlist("alt")
    strips = reference_strips(run.model_set, [code for code in codes if code][:3])
    return render(request, "analysis/_reference_cells.html", {"strips": strips})


@lab_staff_required
def run_progress(request, pk: int):
    run = _run_for(request, pk)
    response = render(request, "analysis/run.html#progress", {"run": run, "queue_hint": _queue_hint(run)})
    if not run.active:
        response["HX-Refresh"] = "true"  # the run is done: show its cells
    return response


@require_POST
@lab_staff_required
def correct(request, pk: int, cell_pk: int):
    run = _run_for(request, pk)
    cell = get_object_or_404(run.cells, pk=cell_pk)
    form = CorrectForm(request.POST)
    error = ""
    if not form.is_valid():
        error = "Choose a cell type."
    else:
        try:
            cell = services.correct_cell(cell_id=cell.pk, code=form.cleaned_data["code"], user=request.user,
                                         expected_version=form.cleaned_data["version"])
        except services.AnalysisError as exc:
            error = str(exc)
    cell = run.cells.with_types().get(pk=cell.pk)
    run.refresh_from_db()
    choices, _ = _choices()
    context = {"run": run, "cell": cell, "choices": choices, "error": error}
    if not request.htmx:
        if error:
            messages.error(request, error)
        return redirect("analysis:run", pk=run.pk)
    html = render_to_string("analysis/run.html#cell", context, request)
    review = {"run": run, **_review_context(request, run), "oob": True}
    html += render_to_string("analysis/run.html#counts", review, request)
    html += render_to_string("analysis/_sign_off.html", review, request)
    return HttpResponse(html)  # htmx swaps only 2xx: a refused correction shows its message in the cell


@require_POST
@lab_staff_required
def sign_off(request, pk: int):
    """Sign off after the confirmation (the dialog of _sign_off.html); without it, show the confirmation."""
    run = _run_for(request, pk)
    if request.POST.get("confirm") != "yes":
        return redirect(reverse("analysis:run", args=[run.pk]) + "?sign-off=confirm")
    try:
        run = services.sign_off(run_id=run.pk, user=request.user, reason=request.POST.get("reason", "")[:2000])
    except services.AnalysisError as error:
        messages.error(request, str(error))
    else:
        if run.locked:
            messages.success(request, f"Run {run.pk} is signed off and locked.")
        else:
            messages.success(request, f"Run {run.pk} is signed off; it awaits a supervisor's second sign-off.")
    return redirect("analysis:run", pk=run.pk)


@require_POST
@lab_staff_required
def second_sign_off(request, pk: int):
    run = _run_for(request, pk)
    try:
        services.second_sign_off(run_id=run.pk, user=request.user)
    except services.AnalysisError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"Run {run.pk} is signed off by a second person and locked.")
    return redirect("analysis:run", pk=run.pk)


@require_POST
@lab_staff_required
def acknowledge_shift(request, pk: int):
    run = _run_for(request, pk)
    try:
        services.acknowledge_shift(run_id=run.pk, user=request.user)
    except services.AnalysisError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"The site-shift warning of run {run.pk} is acknowledged.")
    return redirect("analysis:run", pk=run.pk)


@require_POST
@lab_staff_required
def send_to_dataset(request, pk: int):
    run = _run_for(request, pk)
    dataset = (request.POST.get("dataset") or services.DEFAULT_CORRECTIONS_DATASET).strip()[:100]
    try:
        report = services.send_corrections_to_dataset(run_id=run.pk, dataset=dataset)
    except services.AnalysisError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"{report.imported} corrected cells added to the dataset {dataset} "
                                  f"({report.duplicates} were there already).")
    return redirect("analysis:run", pk=run.pk)


@require_POST
@lab_staff_required
def specimen(request, pk: int):
    """Save the run's specimen identity (until sign-off)."""
    run = _run_for(request, pk)
    form = SpecimenForm(request.POST)
    if not form.is_valid():
        errors = "; ".join(f"{form[name].label}: {' '.join(e)}" for name, e in form.errors.items())
        messages.error(request, f"The specimen was not saved: {errors}")
        return redirect("analysis:run", pk=run.pk)
    try:
        values = {key: value for key, value in form.identity().items() if key in request.POST}  # the fields shown
        specimen_identity.update_identity(run_id=run.pk, values=values)
    except specimen_identity.IdentityError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, "Specimen saved.")
    return redirect("analysis:run", pk=run.pk)


@lab_staff_required
def export_csv(request, pk: int):
    run = _run_for(request, pk)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="classification-run-{run.pk}.csv"'
    services.write_csv(run, response)
    return response


@lab_staff_required
def report(request, pk: int):
    run = _run_for(request, pk)
    return render(request, "analysis/report.html", {
        **_review_context(request, run), "run": run, **report_context(run),
    })
