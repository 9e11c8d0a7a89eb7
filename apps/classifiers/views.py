from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from apps.accounts.roles import curator_required

from .models import ModelSet


def model_sets(request):
    return render(request, "classifiers/model_sets.html", {"model_sets": ModelSet.objects.all()})


def model_set(request, pk: int):
    model_set = get_object_or_404(ModelSet, pk=pk)
    nodes = model_set.node_models.select_related("node", "architecture").prefetch_related("outputs__cell_type")
    return render(request, "classifiers/model_set.html", {"model_set": model_set, "nodes": nodes})


@require_POST
@curator_required
def activate(request, pk: int):
    model_set = get_object_or_404(ModelSet, pk=pk)
    model_set.activate()
    messages.success(request, f"{model_set.name} is now the active model set.")
    return redirect("classifiers:model-set", pk=pk)
