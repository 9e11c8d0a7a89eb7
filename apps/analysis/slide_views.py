"""Pages of slide runs: upload a slide's fields, look at one field with its boxes (a cell's box highlighted)."""

from django import forms
from django.contrib import messages
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from apps.accounts.roles import lab_staff_required
from apps.detection.models import Detector

from . import services, slides
from .forms import ClassifyForm
from .models import ClassificationRun
from .templatetags.slide_tags import field_boxes
from .views import _run_for


class SlideForm(ClassifyForm):
    """A slide run's choices: a classification's (with the specimen identity), plus the detector."""

    detector = forms.ModelChoiceField(queryset=Detector.objects.all(), required=False,
                                      empty_label="The active detector")


@lab_staff_required
def slide_upload(request):
    form = SlideForm(request.POST if request.method == "POST" else None, user=request.user)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            run = slides.start_slide_run(
                owner=request.user, files=request.FILES.getlist("files"), models=data["model_set"],
                detector=data["detector"], count_target=data["count_target"], name=data["name"],
                identity=form.identity(), um_per_pixel=data["um_per_pixel"])
        except services.AnalysisError as error:
            form.add_error(None, str(error))
        else:
            if run.status == ClassificationRun.Status.FAILED:
                messages.error(request, f"The slide analysis failed: {run.error}")
            return redirect("analysis:run", pk=run.pk)
    return render(request, "analysis/slide_upload.html",
                  {"form": form, "sync_max": slides.slide_sync_max(), "active": Detector.objects.active()},
                  status=400 if form.errors else 200)


@lab_staff_required
def field_detail(request, pk: int, index: int):
    run = _run_for(request, pk)
    field = get_object_or_404(run.fields, index=index)
    cell = None
    if request.GET.get("cell", "").isdigit():
        cell = run.cells.with_types().filter(pk=int(request.GET["cell"]), field=field).first()
    neighbours = dict(run.fields.filter(index__in=[index - 1, index + 1]).values_list("index", "pk"))
    return render(request, "analysis/field.html", {
        "run": run, "field": field, "boxes": field_boxes(field, run), "cell": cell,
        "cells": field.cells.with_types().order_by("index"),
        "previous": index - 1 if index - 1 in neighbours else None,
        "next": index + 1 if index + 1 in neighbours else None,
    })


@lab_staff_required
def cell_field(request, pk: int, cell_pk: int):
    """A cell's field, its box highlighted (the gallery's link: no field lookup per cell there)."""
    run = _run_for(request, pk)
    cell = get_object_or_404(run.cells.select_related("field"), pk=cell_pk)
    if cell.field is None:
        raise Http404("This cell was not found on a slide field.")
    return redirect(reverse("analysis:field", args=[run.pk, cell.field.index]) + f"?cell={cell.pk}")
