"""Per-node training sets, balancing, grouped deterministic splits, augmentation, metrics (no database)."""

import pytest
import torch

from hemoweb.ml.data import (AugmentConfig, Augmenter, DataError, assign_splits, balance_per_level, build_node_sets,
                             decode_cache)
from hemoweb.ml.metrics import choose_threshold, classification_metrics
from hemoweb.ml.tree import CellTree


@pytest.fixture
def default_tree() -> CellTree:
    return CellTree.default()


def test_splits_are_8_1_1_and_deterministic_by_seed():
    keys = [f"cell{i:03d}" for i in range(200)]
    labels = ["NGS"] * 100 + ["LYT"] * 100
    first = assign_splits(keys, labels, seed=3)
    assert first == assign_splits(keys, labels, seed=3)
    assert first != assign_splits(keys, labels, seed=4)
    for label in ("NGS", "LYT"):
        mine = [s for s, lab in zip(first, labels) if lab == label]
        assert (mine.count("train"), mine.count("val"), mine.count("test")) == (80, 10, 10)
    # row order does not matter: the split follows the cell key
    reordered = assign_splits(keys[::-1], labels[::-1], seed=3)
    assert reordered[::-1] == first


def test_splits_never_put_one_patient_in_two_splits():
    keys = [f"c{i}" for i in range(300)]
    labels = ["NGS" if i % 2 else "LYT" for i in range(300)]
    patients = [f"p{i // 10}" for i in range(300)]  # 30 patients, 10 cells each
    splits = assign_splits(keys, labels, groups=patients, seed=0)
    by_patient: dict[str, set] = {}
    for patient, split in zip(patients, splits):
        by_patient.setdefault(patient, set()).add(split)
    assert all(len(found) == 1 for found in by_patient.values())
    assert {"train", "val", "test"} <= set(splits)


def test_splits_keep_cells_that_already_have_one():
    keys = [f"c{i}" for i in range(50)]
    labels = ["NGS"] * 50
    existing = ["test"] * 5 + [""] * 45
    splits = assign_splits(keys, labels, existing=existing, seed=1)
    assert splits[:5] == ["test"] * 5
    assert all(s in ("train", "val", "test") for s in splits[5:])


def test_balancing_caps_at_the_smallest_class_but_never_below_the_threshold():
    examples = [(i, "MYE") for i in range(50)] + [(100 + i, "LYM") for i in range(20)] + [(200 + i, "ERY") for i in range(8)]
    capped = balance_per_level(examples, seed=0, threshold=10)
    counts = {code: sum(1 for _, c in capped if c == code) for code in ("MYE", "LYM", "ERY")}
    assert counts == {"MYE": 10, "LYM": 10, "ERY": 8}
    assert balance_per_level(examples, seed=0, threshold=10) == capped
    untouched = balance_per_level(examples, seed=0, threshold=1000)
    assert len(untouched) == len(examples)


def test_a_cell_labelled_at_an_inner_node_trains_only_the_classifiers_above_it(default_tree):
    labels = ["NGS"] * 20 + ["NGB"] * 20 + ["NEU"] * 20 + ["EOS"] * 20 + ["LYT"] * 20
    splits = assign_splits([str(i) for i in range(len(labels))], labels, seed=0)
    sets, skipped = build_node_sets(default_tree, labels, splits, min_images=5, balance="none")
    by_node = {s.node: s for s in sets}
    assert set(by_node) == {"ROOT", "MYM", "NEU"}
    neu_cells = {i for part in (by_node["NEU"].train, by_node["NEU"].val, by_node["NEU"].test) for i, _ in part}
    assert not neu_cells & set(range(40, 60))  # NEU-labelled cells are not NGB/NGS examples
    mym_cells = {i for part in (by_node["MYM"].train, by_node["MYM"].val, by_node["MYM"].test) for i, _ in part}
    assert set(range(40, 60)) <= mym_cells  # ... but they teach MYM that they are NEU
    assert by_node["MYM"].classes == ["NEU", "EOS"]
    assert {plan.node for plan in skipped} >= {"LYM", "MYE"}


def test_a_node_where_a_class_has_3_images_is_skipped_with_the_reason(default_tree):
    labels = ["NGS"] * 30 + ["NGB"] * 3 + ["LYT"] * 30
    splits = assign_splits([str(i) for i in range(len(labels))], labels, seed=0)
    sets, skipped = build_node_sets(default_tree, labels, splits, min_images=10)
    assert "NEU" not in {s.node for s in sets}
    reason = {plan.node: plan.skipped for plan in skipped}["NEU"]
    assert "NGB has 3" in reason and "at least 10" in reason


def test_one_class_or_no_images_is_refused(default_tree):
    with pytest.raises(DataError, match="only one cell type"):
        build_node_sets(default_tree, ["NGS"] * 10, ["train"] * 10)
    with pytest.raises(DataError, match="no images"):
        build_node_sets(default_tree, [], [])


def test_class_weights_instead_of_capping(default_tree):
    labels = ["NGS"] * 40 + ["LYT"] * 10
    splits = ["train"] * 50
    sets, _ = build_node_sets(default_tree, labels, splits, min_images=5, balance="weights")
    root = sets[0]
    assert len(root.train) == 50
    weights = dict(zip(root.classes, root.class_weights))
    assert weights["LYM"] == pytest.approx(4 * weights["MYE"])


def test_augmentation_keeps_shape_and_range_and_changes_the_images(demo_pbc):
    paths = sorted(demo_pbc.glob("*/*.jpg"))[:8]
    batch = decode_cache(paths, 48)
    assert batch.dtype == torch.uint8 and batch.shape == (8, 3, 48, 48)
    out = Augmenter(AugmentConfig(), seed=0)(batch)
    assert out.shape == (8, 3, 48, 48) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert (out - batch.float() / 255).abs().mean() > 0.02
    again = Augmenter(AugmentConfig(), seed=0)(batch)
    assert torch.equal(out, again)  # seeded: reproducible


def test_metrics_and_threshold():
    m = classification_metrics(["A", "A", "B", "B"], ["A", "B", "B", "B"], ["A", "B"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["A"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert m["balanced_accuracy"] == 0.75
    assert m["confusion"]["matrix"] == [[1, 1], [0, 2]]
    # the two least confident predictions are the wrong ones: refusing them is worth it within 20 % coverage loss
    threshold = choose_threshold([0.3, 0.4, 0.9, 0.95, 0.97, 0.99, 0.99, 0.99, 0.99, 0.99],
                                 [False, False] + [True] * 8, min_coverage=0.8)
    assert threshold == 0.9
    assert choose_threshold([0.3, 0.9], [True, True], min_coverage=0.5) == 0.0
