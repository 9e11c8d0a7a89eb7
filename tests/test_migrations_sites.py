"""The default-site migration: a lab upgrading from before sites keeps working, its rows at the default site."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("cells", "0003_celltype_aliases"), ("analysis", "0007_shift_acknowledgement_and_unfamiliar"),
          ("sites", "0001_initial")]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_existing_datasets_and_runs_move_to_the_default_site():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    old = _migrate(BEFORE)
    old.get_model("sites", "Site").objects.all().delete()
    dataset = old.get_model("cells", "Dataset").objects.create(name="From before sites")
    run = old.get_model("analysis", "ClassificationRun").objects.create(model_set_name="old set")
    new = _migrate(latest)
    site = new.get_model("sites", "Site").objects.get(is_default=True)
    assert site.name == "Main lab" and site.type_minimums == {"BLA": 0.95}
    assert new.get_model("cells", "Dataset").objects.get(pk=dataset.pk).site_id == site.pk
    assert new.get_model("analysis", "ClassificationRun").objects.get(pk=run.pk).site_id == site.pk


@pytest.mark.django_db
def test_a_migrated_database_has_exactly_one_default_site():
    from apps.sites.models import Site

    assert list(Site.objects.filter(is_default=True).values_list("name", flat=True)) == ["Main lab"]
