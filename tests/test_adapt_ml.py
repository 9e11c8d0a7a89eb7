"""Adapting a set to another lab's cells (hemoweb/ml/adapt.py): a tiny shared-backbone set trained on the demo PBC
cells, adapted to the same cells given another lab's look (a yellow, dimmer background)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hemoweb.ml.adapt import (AdaptConfig, AdaptError, LabCell, adapt_set, judge, select_lab_cells,
                              split_lab_cells)
from hemoweb.ml.data import assign_splits
from hemoweb.ml.train import CellRecord, TrainConfig, TrainingCancelled, train_tree
from hemoweb.ml.tree import CellTree
from hemoweb.ml.weights import read_card, read_set

DEMO_PBC = Path(__file__).resolve().parent.parent / "demo" / "pbc"
TINY = dict(architecture="mobilenetv3_small_050", epochs=2, image_size=32, batch_size=16, min_images=3, threads=1)
FAST = dict(steps=60, epochs=1, replay=40, views=2, batch_size=8)


def demo_rows() -> list[tuple[str, str, str]]:
    label_map = {r["label"]: r["cell_type_code"] for r in csv.DictReader(open(DEMO_PBC / "label_map.csv"))}
    rows = list(csv.DictReader(open(DEMO_PBC / "labels.csv")))
    labels = [label_map[r["label"]] for r in rows]
    splits = assign_splits([r["path"] for r in rows], labels, seed=0)
    return [(str(DEMO_PBC / r["path"]), label, split) for r, label, split in zip(rows, labels, splits)]


def opened(path: str, shift: bool = False):
    def load():
        with Image.open(path) as image:
            image = image.convert("RGB")
        if not shift:
            return image
        array = np.asarray(image, dtype=np.float32) * np.array([0.95, 0.85, 0.6]) * 0.8
        return Image.fromarray(array.clip(0, 255).astype(np.uint8))
    return load


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("adapt") / "tiny"
    cells = [CellRecord(path, label, split) for path, label, split in demo_rows()]
    train_tree(CellTree.default(), cells, TrainConfig(**TINY, shared_backbone=True), folder, name="tiny")
    return folder


def originals(split: str) -> list:
    return [(opened(path), label) for path, label, s in demo_rows() if s == split]


def lab(codes: tuple[str, ...] = ("BAS", "EOS", "LYT", "MON", "PLT")) -> list[LabCell]:
    """The demo cells of a few types, as another lab photographs them."""
    return [LabCell(opened(path, shift=True), label, sha256=f"lab-{i}", group=f"slide-{i % 7}")
            for i, (path, label, _) in enumerate(demo_rows()) if label in codes]


def run(tiny_set: Path, out: Path, **config) -> dict:
    cells = lab()
    adapt, aside = split_lab_cells(cells, per_type=4, seed=0)
    return adapt_set(tiny_set, out, CellTree.default(), cells=adapt, aside=aside, replay=originals("train"),
                     replay_val=originals("val"), original_test=originals("test"),
                     config=AdaptConfig(**{**FAST, **config}), name=out.name)


def test_an_adaptation_writes_a_new_set_scored_before_and_after_and_leaves_the_source_alone(tiny_set, tmp_path):
    before = (tiny_set / "ROOT.safetensors").read_bytes()
    report = run(tiny_set, tmp_path / "adapted")
    folder = tmp_path / "adapted"
    assert (tiny_set / "ROOT.safetensors").read_bytes() == before
    set_card = read_set(folder)
    assert set_card.name == "adapted" and set_card.data["adapted_from"] == "tiny"
    adaptation = set_card.metrics["adaptation"]
    for part in ("before", "after"):
        assert adaptation[part]["lab"]["n"] == report["lab_cells"]["aside"] > 0
        assert adaptation[part]["original_test"]["n"] == len(originals("test"))
        assert 0 <= adaptation[part]["lab"]["balanced_accuracy"] <= 1
    assert adaptation["accepted"] == report["accepted"] and isinstance(adaptation["reasons"], list)
    assert read_card(folder / "ROOT.safetensors").metrics["adaptation"]["after"] == report["after"]
    assert "before" in (folder / "README.md").read_text()
    familiarity = json.loads((folder / "familiarity.json").read_text())
    assert familiarity["n_train"] == min(40, len(originals("train"))) + report["lab_cells"]["adapt"] * 2
    assert familiarity["fitted_on"].startswith("the set's training cells and the lab's")
    assert not list(tmp_path.glob(".*.partial"))
    # heads mode: the backbone is the source's, the heads moved
    assert (folder / "backbone.safetensors").read_bytes() == (tiny_set / "backbone.safetensors").read_bytes()
    assert not torch.equal(load_file(str(folder / "ROOT.safetensors"))["weight"],
                           load_file(str(tiny_set / "ROOT.safetensors"))["weight"])


def test_the_same_seed_gives_the_same_set(tiny_set, tmp_path):
    run(tiny_set, tmp_path / "one", seed=3)
    run(tiny_set, tmp_path / "two", seed=3)
    for node in read_set(tmp_path / "one").nodes:
        a, b = (load_file(str(tmp_path / name / f"{node}.safetensors")) for name in ("one", "two"))
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_norm_mode_reestimates_batchnorm_statistics_and_records_its_mode(tiny_set, tmp_path):
    report = run(tiny_set, tmp_path / "norm", mode="norm")
    assert report["mode"] == "norm"
    new, old = (load_file(str(folder / "backbone.safetensors")) for folder in (tmp_path / "norm", tiny_set))
    running = [key for key in old if key.endswith("running_mean")]
    assert running and any(not torch.equal(new[key], old[key]) for key in running)
    assert json.loads((tmp_path / "norm" / "familiarity.json").read_text())["backbone_fingerprint"] != \
        json.loads((tiny_set / "familiarity.json").read_text())["backbone_fingerprint"]


def test_a_cancelled_adaptation_leaves_nothing_behind(tiny_set, tmp_path):
    def cancel(progress):
        if progress.kind == "step":
            raise TrainingCancelled()

    cells = lab()
    adapt, aside = split_lab_cells(cells, per_type=3, seed=0)
    with pytest.raises(TrainingCancelled):
        adapt_set(tiny_set, tmp_path / "cancelled", CellTree.default(), cells=adapt, aside=aside,
                  replay=originals("train")[:20], config=AdaptConfig(**FAST), callback=cancel)
    assert not (tmp_path / "cancelled").exists() and not list(tmp_path.glob(".*"))


def test_an_existing_folder_or_a_per_node_set_is_refused(tiny_set, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(AdaptError, match="exists already"):
        adapt_set(tiny_set, tmp_path / "taken", CellTree.default(), cells=lab()[:4])
    per_node = tmp_path / "per-node"
    shutil.copytree(tiny_set, per_node)
    card = json.loads((per_node / "set.json").read_text())
    card["backbone"] = ""
    (per_node / "set.json").write_text(json.dumps(card))
    with pytest.raises(AdaptError, match="share one backbone"):
        adapt_set(per_node, tmp_path / "x", CellTree.default(), cells=lab()[:4])


# --- the lab's cells: what is used, what is left out and why ----------------------------------------------


KNOWN = {"ERY", "LYM", "MYE", "MEG", "BAS", "EOS", "MON", "NEU", "LYT", "EBO", "PLT", "MYI", "NGS", "NGB"}


def cell(label: str, sha: str = "", group: str = "") -> LabCell:
    return LabCell(lambda: None, label, sha, group)


def test_one_type_only_is_refused_with_the_reason():
    with pytest.raises(AdaptError, match="only LYT"):
        select_lab_cells(CellTree.default(), [cell("LYT") for _ in range(6)], KNOWN)


def test_a_type_with_one_cell_is_skipped_with_the_reason():
    selection = select_lab_cells(CellTree.default(), [cell("LYT")] * 3 + [cell("MON")] * 3 + [cell("EOS")], KNOWN)
    assert {c.label for c in selection.cells} == {"LYT", "MON"}
    assert selection.as_dict()["too_few"] == {"EOS": {"n": 1, "reason": "only 1 cell: a type needs at least 2"}}


def test_unknown_labels_are_listed_and_skipped():
    selection = select_lab_cells(CellTree.default(), [cell("LYT")] * 2 + [cell("MON")] * 2 + [cell("XYZ")] * 3, KNOWN)
    assert selection.unknown_labels == {"XYZ": 3} and len(selection.cells) == 4


def test_the_sets_own_training_cells_are_left_out_and_counted():
    cells = [cell("LYT", f"a{i}") for i in range(3)] + [cell("MON", f"b{i}") for i in range(3)]
    selection = select_lab_cells(CellTree.default(), cells, KNOWN, training_sha256={"a0", "b1"})
    assert selection.training_overlap == 2 and len(selection.cells) == 4
    with pytest.raises(AdaptError, match="3 cells are training cells of the set"):
        select_lab_cells(CellTree.default(), cells, KNOWN, training_sha256={"a0", "a1", "a2"})


def test_the_split_keeps_a_slide_on_one_side_and_every_type_on_both():
    cells = [cell("LYT", group=f"s{i // 2}") for i in range(10)] + [cell("MON", group=f"t{i // 2}") for i in range(10)]
    adapt, aside = split_lab_cells(cells, per_type=4, seed=1)
    assert {c.group for c in adapt}.isdisjoint({c.group for c in aside})
    assert {c.label for c in adapt} == {c.label for c in aside} == {"LYT", "MON"}
    assert sum(c.label == "LYT" for c in adapt) == 4
    assert split_lab_cells(cells, per_type=4, seed=1) == (adapt, aside)


def scores(lab_ba: float, test_ba: float) -> dict:
    return {"lab": {"n": 50, "balanced_accuracy": lab_ba}, "original_test": {"n": 300, "balanced_accuracy": test_ba}}


def test_an_adaptation_not_better_on_the_lab_or_losing_more_than_a_point_is_refused_with_the_numbers():
    assert judge(scores(0.5, 0.9), scores(0.8, 0.895)) == (True, [])
    accepted, reasons = judge(scores(0.5, 0.9), scores(0.5, 0.9))
    assert not accepted and "0.500 before, 0.500 after" in reasons[0]
    accepted, reasons = judge(scores(0.5, 0.9), scores(0.9, 0.88))
    assert not accepted and "loses 2.0 points" in reasons[0] and "0.900 before, 0.880 after" in reasons[0]
