from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from apps.accounts.roles import curator_required
from apps.sites.models import Site
from apps.sites.services import after_activation, latest_study, routine_warning
from hemoweb.ml.metrics import threshold_floor

from .models import ModelSet

CHART_W, CHART_H = 320, 150  # the SVG charts of the model set page (viewBox units)


def familiarity_charts(familiarity: dict) -> dict:
    """SVG coordinates for the familiarity histogram of the validation cells (threshold marked) and their
    risk-coverage curve (with the set's operating point: refused and flagged cells left out)."""
    charts: dict = {"width": CHART_W, "height": CHART_H}
    histogram = familiarity.get("histogram") or {}
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if len(edges) == len(counts) + 1 and counts and edges[-1] > edges[0]:
        low, span, top = edges[0], edges[-1] - edges[0], max(counts) or 1
        charts["bars"] = [{"x": round((a - low) / span * CHART_W, 1), "w": round((b - a) / span * CHART_W, 1),
                           "h": round(n / top * CHART_H, 1), "y": round(CHART_H - n / top * CHART_H, 1), "n": n,
                           "range": f"{a:.1f}–{b:.1f}"} for a, b, n in zip(edges, edges[1:], counts, strict=False)]
        threshold = familiarity.get("threshold")
        if threshold is not None:
            charts["threshold_x"] = round(min(max((threshold - low) / span, 0), 1) * CHART_W, 1)
        charts["low"], charts["high"] = round(low, 1), round(edges[-1], 1)
    validation = familiarity.get("validation") or {}
    curve = validation.get("risk_coverage") or []
    if curve:
        top = max(0.05, max(point["risk"] for point in curve))
        charts["risk_top"] = round(top, 3)
        charts["curve"] = " ".join(f"{point['coverage'] * CHART_W:.1f},{CHART_H - point['risk'] / top * CHART_H:.1f}"
                                   for point in curve)
        if validation.get("selective_accuracy") is not None:
            risk = 1 - validation["selective_accuracy"]
            charts["point"] = {"x": round(validation["selective_n"] / validation["n"] * CHART_W, 1),
                               "y": round(CHART_H - min(risk, top) / top * CHART_H, 1)}
    return charts


def model_sets(request):
    return render(request, "classifiers/model_sets.html", {"model_sets": ModelSet.objects.all()})


def model_set(request, pk: int):
    model_set = get_object_or_404(ModelSet, pk=pk)
    nodes = list(model_set.node_models.select_related("node", "architecture").prefetch_related("outputs__cell_type"))
    for model in nodes:  # the lowest threshold that can still flag a cell (metrics.threshold_floor)
        model.floor = threshold_floor(len(model.outputs.all()))
    familiarity = (model_set.metrics or {}).get("familiarity") or {}
    return render(request, "classifiers/model_set.html", {"model_set": model_set, "nodes": nodes,
                                                          "familiarity": familiarity,
                                                          "charts": familiarity_charts(familiarity)})


@require_http_methods(["GET", "POST"])
@curator_required
def activate(request, pk: int):
    """Activation asks first: the page shows the set's test figures and its latest verification at the curator's
    site beside the set in use; only the confirming POST activates."""
    model_set = get_object_or_404(ModelSet, pk=pk)
    if request.method == "GET" or request.POST.get("confirmed") != "yes":
        site = Site.objects.for_user(request.user)
        study = latest_study(site, model_set)
        return render(request, "classifiers/activate.html", {
            "model_set": model_set, "active": ModelSet.objects.active(), "site": site, "study": study,
            "warning": routine_warning(site, model_set, study)})
    model_set.activate()
    messages.success(request, f"{model_set.name} is now the active model set.")
    for note in after_activation(model_set, request.user):  # sites following the active set verify it again
        messages.info(request, note)
    return redirect("classifiers:model-set", pk=pk)
