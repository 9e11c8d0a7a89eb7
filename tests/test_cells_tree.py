"""The default tree, its seeding, and the plain tree logic the ML core uses."""

import pytest
from django.core.management import call_command

from apps.cells.models import CellType
from hemoweb.ml.tree import DEFAULT_TREE, CellTree, TreeError, node_examples, plan_nodes, resolve_single_path


@pytest.mark.django_db
def test_seed_is_idempotent_and_keeps_curated_changes(capsys):
    call_command("seed_cell_tree")
    assert CellType.objects.count() == len(DEFAULT_TREE) == 31
    CellType.objects.filter(code="NGS").update(name="Segmented neutrophil (curated)")
    call_command("seed_cell_tree")
    assert "0 nodes created" in capsys.readouterr().out
    assert CellType.objects.get(code="NGS").name == "Segmented neutrophil (curated)"
    assert CellType.objects.get(code="NGS").parent.code == "NEU"


@pytest.mark.django_db
def test_database_tree_matches_the_default(tree):
    db_tree = CellType.objects.as_tree()
    assert db_tree.path("NGB") == ["ROOT", "MYE", "MYM", "NEU", "NGB"]
    assert db_tree.children("MYI") == ["BLA", "PMO", "MYB", "MMZ"]
    assert sorted(db_tree.children("ABN")) == sorted(["NIF", "OTH", "ABE", "ART", "KSC", "FGC"])


def test_inner_node_labels_train_above_not_below():
    tree = CellTree.default()
    labels = ["NGS", "NEU", "MYI", "EBO"]
    assert node_examples(tree, labels, "MYM") == [(0, "NEU"), (1, "NEU")]
    assert node_examples(tree, labels, "NEU") == [(0, "NGS")]
    assert node_examples(tree, labels, "MYI") == []
    assert node_examples(tree, labels, "ROOT") == [(0, "MYE"), (1, "MYE"), (2, "MYE"), (3, "ERY")]


def test_plan_skips_nodes_with_one_child_or_too_few_images():
    tree = CellTree.default()
    labels = ["NGS"] * 20 + ["NGB"] * 3 + ["EBO"] * 20
    plans = {plan.node: plan for plan in plan_nodes(tree, labels, min_images=10)}
    assert plans["ROOT"].trained and plans["ROOT"].classes == ("ERY", "MYE")
    assert "only one child" in plans["ERY"].skipped
    assert "too few images (NGB has 3" in plans["NEU"].skipped
    assert plans["ABN"].skipped == "no labelled cells below it"


def test_single_data_path_resolves_to_the_leaf():
    tree = CellTree.default()
    assert resolve_single_path(tree, ["EBO", "NGS", "NGB"], "ERY") == "EBO"
    assert resolve_single_path(tree, ["EBO", "NGS", "NGB"], "NEU") == "NEU"


def test_cycles_and_unknown_codes_are_errors():
    with pytest.raises(TreeError, match="cycle"):
        CellTree(parents={"ROOT": None, "A": "B", "B": "A"})
    with pytest.raises(TreeError, match="Unknown cell-type code"):
        CellTree.default().path("NOPE")
