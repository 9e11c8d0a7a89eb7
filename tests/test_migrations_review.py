"""The review-state migration: cells reviewed before review states keep what their review meant."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from tests.test_migrations_sites import _migrate

BEFORE = [("analysis", "0008_run_site"), ("cells", "0004_dataset_site"), ("sites", "0002_default_site")]


@pytest.mark.django_db(transaction=True)
def test_reviewed_cells_become_accepted_or_changed_and_the_rest_stay_pending():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    old = _migrate(BEFORE)
    CellType = old.get_model("cells", "CellType")
    root = CellType.objects.create(code="XROOT", name="root")
    a, b, c = (CellType.objects.create(code=code, name=code, parent=root) for code in ("XA", "XB", "XC"))
    user = old.get_model("auth", "User").objects.create(username="tech")
    run = old.get_model("analysis", "ClassificationRun").objects.create(model_set_name="old set")
    Cell = old.get_model("analysis", "ClassifiedCell")
    now = timezone.now()

    def cell(index, predicted, final, guess=None, reviewed=True):
        return Cell.objects.create(run=run, index=index, image="x.png", original_name=f"{index}.png", sha256="0",
                                   predicted_type=predicted, final_type=final, guess_type=guess,
                                   corrected_by=user if reviewed else None, corrected_at=now if reviewed else None,
                                   model_set_name="old set").pk

    kept, guessed, changed, untouched = cell(0, a, a), cell(1, root, b, guess=b), cell(2, a, c), cell(3, a, a, reviewed=False)
    new = _migrate(latest)
    states = dict(new.get_model("analysis", "ClassifiedCell").objects.values_list("pk", "review_state"))
    assert states == {kept: "accepted", guessed: "accepted", changed: "changed", untouched: "pending"}
    reviewer = new.get_model("analysis", "ClassifiedCell").objects.get(pk=changed).reviewed_by_id
    assert reviewer == user.pk
