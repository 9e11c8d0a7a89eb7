"""Reviewing a test run before its sign-off, as a technologist would (issue 20's sign-off rules)."""

from apps.analysis import services
from apps.analysis.models import ClassifiedCell

SMALL_RUN = "Test sample: fewer cells than the count target."


def review_flagged(run, user) -> int:
    """Accept every flagged cell nobody reviewed yet (a cell at the root: its best guess, else Not identifiable);
    returns how many."""
    pending = run.cells.exclude(flags=[]).filter(review_state=ClassifiedCell.Review.PENDING)
    n = 0
    for pk, parent, guess_parent in pending.values_list("pk", "final_type__parent", "guess_type__parent"):
        if parent:
            services.review_cell(cell_id=pk, user=user)
        elif guess_parent:
            services.review_cell(cell_id=pk, user=user, best_guess=True)
        else:
            services.review_cell(cell_id=pk, user=user, code="NIF")
        n += 1
    return n


def sign_off_small_run(run, user):
    """Review the flagged cells, then sign off with the reason a run under its count target needs."""
    review_flagged(run, user)
    return services.sign_off(run_id=run.pk, user=user, reason=SMALL_RUN)


def make_run(owner, cells, **fields):
    """A finished run with the given cells, no model needed: each cell a dict of predicted (code), and optionally
    final, guess, flags, resolved (default: True), unfamiliar."""
    from apps.analysis.models import ClassificationRun
    from apps.cells.models import CellType

    types = {node.code: node for node in CellType.objects.all()}
    run = ClassificationRun.objects.create(owner=owner, name="made", model_set_name="made", n_total=len(cells),
                                           n_done=len(cells), status=ClassificationRun.Status.SUCCEEDED, **fields)
    ClassifiedCell.objects.bulk_create([ClassifiedCell(
        run=run, index=index, image=f"analysis/made/{run.pk}/{index}.png", original_name=f"cell{index}.png",
        sha256=f"{index:064d}",
        predicted_type=types[cell["predicted"]], final_type=types[cell.get("final", cell["predicted"])],
        guess_type=types[cell.get("guess", cell["predicted"])], flags=cell.get("flags", []),
        resolved=cell.get("resolved", True), unfamiliar=cell.get("unfamiliar", False), model_set_name="made",
        path=[{"node": "ROOT", "code": cell["predicted"], "probability": 0.9}], confidence=0.9,
    ) for index, cell in enumerate(cells)])
    return run
