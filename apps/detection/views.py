from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from apps.accounts.roles import curator_required, is_curator, lab_staff_required
from apps.sites.models import Site
from hemoweb.ml.detect import class_colour

from .forms import DetectForm, TrainDetectorForm
from .models import Detector, DetectorTrainingJob
from .services import (DetectionInputError, cancel_training, data_uri, detect_image, detect_lost_training_jobs,
                       image_data_uri, start_training)

PREVIEW_SIDE = 1600


def _context(request, **extra) -> dict:
    context = {"form": DetectForm(), "detectors": Detector.objects.all(), "active": Detector.objects.active(),
               "is_curator": is_curator(request.user), "site": Site.objects.for_user(request.user)}
    if context["is_curator"]:
        detect_lost_training_jobs()
        context["train_form"] = TrainDetectorForm()
        context["jobs"] = list(DetectorTrainingJob.objects.select_related("dataset", "detector")[:10])
        context["polling"] = any(not job.finished_state for job in context["jobs"])
    context.update(extra)
    return context


@lab_staff_required
@require_GET
def home(request):
    return render(request, "detection/home.html", _context(request))


def _result_context(result) -> dict:
    preview = result.image.copy()
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    classes = [{"name": name, "colour": class_colour(name, result.classes), "count": count}
               for name, count in result.counts.items()]
    colours = {c["name"]: c["colour"] for c in classes}
    boxes = [{"label": b.label, "x": b.x1, "y": b.y1, "w": b.width, "h": b.height, "score": b.score,
              "colour": colours.get(b.label, "#000")} for b in result.detection.boxes]
    cells = [{"crop": data_uri(cell.crop_png), "box": cell.box, "tree": cell.tree} for cell in result.cells]
    return {"result": result, "image_uri": image_data_uri(preview), "classes": classes, "boxes": boxes,
            "cells": cells, "stroke": max(2, round(max(result.detection.width, result.detection.height) / 300))}


@lab_staff_required
@require_POST
def detect(request):
    form = DetectForm(request.POST, request.FILES)
    context = {}
    if form.is_valid():
        try:
            site = Site.objects.for_user(request.user)
            context = _result_context(detect_image(form.cleaned_data["image"], site=site))
        except DetectionInputError as error:
            context = {"error": str(error)}
    else:
        context = {"error": " ".join(form.errors["image"])}
    if request.htmx:  # htmx swaps only 2xx answers: a refused file shows its message in the result area
        return render(request, "detection/home.html#result", context)
    return render(request, "detection/home.html", _context(request, **context), status=400 if "error" in context else 200)


@curator_required
@require_POST
def train(request):
    form = TrainDetectorForm(request.POST)
    error = ""
    if form.is_valid():
        data = form.cleaned_data
        try:
            start_training(dataset=data["dataset"], architecture=data["architecture"], epochs=data["epochs"],
                           imgsz=data["imgsz"], device=data["device"], activate=data["activate"], user=request.user)
        except DetectionInputError as problem:
            error = str(problem)
    else:
        error = "; ".join(e for errs in form.errors.values() for e in errs)
    if request.htmx:
        return render(request, "detection/home.html#jobs", _context(request, train_error=error))
    if error:
        messages.error(request, "Training not started: " + error)
    return redirect("detection:home")


@curator_required
@require_GET
def jobs(request):
    return render(request, "detection/home.html#jobs", _context(request))


@curator_required
@require_POST
def cancel(request, pk: int):
    cancel_training(get_object_or_404(DetectorTrainingJob, pk=pk))
    if request.htmx:
        return render(request, "detection/home.html#jobs", _context(request))
    return redirect("detection:home")


@curator_required
@require_POST
def activate(request, pk: int):
    get_object_or_404(Detector, pk=pk).activate()
    return redirect("detection:home")
