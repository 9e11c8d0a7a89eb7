"""What the review gallery's detail panel shows beside a cell: its second choice, and reference cells.

Reference cells are typical training cells of a type (CellaVision's reference library): the technologist compares
like with like. They are library images (`Cell` rows, stored under their checksum) shown without their names,
patients or slides, never another run's cells.
"""

from django.core.cache import cache
from django.core.files.storage import default_storage

from apps.cells.models import Cell, CellType, Dataset, Split
from apps.classifiers.models import ModelSet

REFERENCE_CELLS = 6
REFERENCE_CACHE_SECONDS = 3600


def second_choice(path: list[dict]) -> dict | None:
    """The runner-up of the closest decision on the cell's path: {node, code, probability}; None if not recorded."""
    steps = [step for step in path or [] if step.get("second")]
    if not steps:
        return None
    step = max(steps, key=lambda s: s.get("second_probability", 0.0))
    return {"node": step["node"], "code": step["second"], "probability": step.get("second_probability", 0.0)}


def training_dataset(model_set: ModelSet | None) -> Dataset | None:
    """The dataset the set's card names as its training data (sets trained here name it)."""
    name = ((model_set.card or {}).get("data") or {}).get("dataset") if model_set else None
    return Dataset.objects.filter(name=name).first() if name else None


def reference_cells(model_set: ModelSet | None, code: str, n: int = REFERENCE_CELLS) -> dict:
    """Typical training cells of type `code`: {type, source, cells [{id, url, width, height}]}, cached per set+type.

    A deterministic sample (by checksum, so it does not follow import order) of the set's training split of that
    type, else of its whole dataset, else of the cell library when the set names no dataset here. An inner node
    (a cell that stopped unresolved) gets cells from anywhere below it. Typical by construction: the curated,
    labelled cells the set learnt from.
    """
    key = f"analysis:reference:{model_set.pk if model_set else 0}:{code}:{n}"
    found = cache.get(key)
    if found is not None:
        return found
    cell_type = CellType.objects.filter(code=code).first()
    result = {"code": code, "name": cell_type.name if cell_type else code, "source": "", "cells": []}
    if cell_type is not None:
        dataset = training_dataset(model_set)
        library = Cell.objects.under(cell_type)
        candidates = []
        if dataset is not None:
            own = library.filter(dataset=dataset)
            candidates = [(own.filter(split=Split.TRAIN), f"training cells of {dataset.name}"),
                          (own, f"cells of {dataset.name}")]
        candidates.append((library, "the cell library"))
        for cells, source in candidates:
            picked = list(cells.order_by("sha256").values("pk", "image", "width", "height")[:n])
            if picked:
                result["source"] = source
                result["cells"] = [{"id": row["pk"], "url": default_storage.url(row["image"]), "width": row["width"],
                                    "height": row["height"]} for row in picked]
                break
    cache.set(key, result, REFERENCE_CACHE_SECONDS)
    return result


def reference_strips(model_set: ModelSet | None, codes: list[str]) -> list[dict]:
    """One strip per distinct code, in the order given (predicted type, then its alternative)."""
    seen: list[str] = []
    for code in codes:
        if code and code not in seen:
            seen.append(code)
    return [reference_cells(model_set, code) for code in seen]
