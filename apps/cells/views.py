from itertools import groupby

from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, render

from apps.classifiers.models import ModelSet
from hemoweb.navigation import mode_links

from .models import Cell, CellType, Dataset
from .selectors import datasets_with_counts, tree_with_counts

GALLERY_PAGE_SIZE = 60

def home(request):
    from apps.analysis.worklist import my_runs_to_review  # the start page shows the user's own work first

    reviews, n_reviews = my_runs_to_review(request.user) if request.user.is_authenticated else ([], 0)
    return render(request, "cells/home.html", {
        "my_reviews": reviews, "my_reviews_total": n_reviews,
        "modes": mode_links(),
        "n_cells": Cell.objects.count(),
        "n_datasets": Dataset.objects.count(),
        "n_types": CellType.objects.count(),
        "active_set": ModelSet.objects.active(),
    })


def tree(request):
    return render(request, "cells/tree.html", {"roots": tree_with_counts()})


def datasets(request):
    return render(request, "cells/datasets.html", {"datasets": datasets_with_counts()})


def dataset_gallery(request, pk: int):
    dataset = get_object_or_404(Dataset, pk=pk)
    cells = dataset.cells.select_related("cell_type").order_by("cell_type__order", "cell_type__code", "id")
    selected_type = request.GET.get("type", "")
    if selected_type:
        cells = cells.filter(cell_type__code=selected_type)
    page = Paginator(cells, GALLERY_PAGE_SIZE).get_page(request.GET.get("page"))
    groups = [
        {"code": code, "name": items[0].cell_type.name, "cells": items}
        for code, items in ((code, list(group)) for code, group in groupby(page, key=lambda cell: cell.cell_type.code))
    ]
    context = {"dataset": dataset, "counts": dataset.counts_per_type(), "groups": groups, "page": page,
               "selected_type": selected_type}
    template = "cells/dataset.html#gallery" if request.htmx and request.htmx.target == "gallery" else "cells/dataset.html"
    return render(request, template, context)


def attribution(request):
    return render(request, "cells/attribution.html")
