"""What the printable report of a run shows beyond its counts: the lab's header, the cells a reader should see
(flagged or changed in review, with their images), and who reviewed and signed."""

from collections import Counter

from django.conf import settings
from django.db.models import F, Q

from .models import ClassificationRun

REPORT_CELLS = 120  # cell images printed at most; the CSV export lists every cell


def report_header() -> list[str]:
    """The lab's name and address lines (REPORT_HEADER, lines split by '|' or newlines; REPORT_HEADER_FILE)."""
    return list(getattr(settings, "HEMOWEB_REPORT_HEADER", []))


def reviewers(run: ClassificationRun) -> list[tuple[str, int]]:
    """Who reviewed the run's cells (accepted or changed them) and how many each, most first."""
    names = run.cells.values_list("reviewed_by__username", "corrected_by__username")
    return Counter(reviewed or corrected for reviewed, corrected in names if reviewed or corrected).most_common()


def report_context(run: ClassificationRun) -> dict:
    flagged = run.cells.exclude(flags=[]).select_related("final_type").order_by("index")
    noted = (run.cells.with_types().filter(~Q(flags=[]) | ~Q(final_type=F("predicted_type")))
             .select_related("reviewed_by").order_by("index"))
    n_noted = noted.count()
    header = report_header()
    return {"flagged": flagged, "noted_cells": list(noted[:REPORT_CELLS]), "n_noted": n_noted,
            "noted_left_out": max(0, n_noted - REPORT_CELLS), "lab_name": header[0] if header else "",
            "lab_lines": header[1:], "reviewers": reviewers(run)}
