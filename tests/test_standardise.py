"""Scale from the red cells, colour from the background: measured on the shipped demo cells and smears."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hemoweb.ml.data import LabShift
from hemoweb.ml.evaluate import evaluate_tree
from hemoweb.ml.infer import TreeClassifier
from hemoweb.ml.preprocess import model_input, resize_uint8
from hemoweb.ml.standardise import (ScaleReference, as_rgb, colour_card, estimate_scale, measure, reference_from,
                                    to_reference, white_balance)
from hemoweb.ml.tree import CellTree


def demo_cells(demo_pbc, n: int | None = None) -> list[Image.Image]:
    rows = list(csv.DictReader(open(demo_pbc / "labels.csv")))[:n]
    return [Image.open(demo_pbc / row["path"]).convert("RGB") for row in rows]


def smaller(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


DEMO_PBC = Path(__file__).resolve().parent.parent / "demo" / "pbc"


@pytest.fixture(scope="module")
def reference() -> ScaleReference:
    return reference_from(demo_cells(DEMO_PBC))


def test_the_demo_cells_measure_as_one_scale_and_a_half_size_copy_as_half_of_it(demo_pbc, reference):
    cells = demo_cells(demo_pbc, 40)
    same = estimate_scale([measure(image) for image in cells], reference)
    half = estimate_scale([measure(smaller(image, 0.5)) for image in cells], reference)
    assert same.source == "red cells" and abs(same.ratio - 1) < 0.1 and same.applied == 1.0  # used as they are
    assert half.source == "red cells" and 0.4 < half.ratio < 0.6
    assert 1.6 < half.applied < 2.5  # resampled back to the training scale


def test_a_smear_field_is_measured_from_its_many_red_cells(demo_bccd, reference):
    field = Image.open(sorted((demo_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))[0]).convert("RGB")
    found = measure(field)
    assert found["red_cells"] >= 5
    full, third = estimate_scale([found], reference), estimate_scale([measure(smaller(field, 2 / 3))], reference)
    assert 0.55 < third.px_per_um / full.px_per_um < 0.8


def test_a_half_size_cell_is_resampled_to_a_window_of_the_training_field(demo_pbc, reference):
    images = [smaller(image, 0.5) for image in demo_cells(demo_pbc, 40)]
    estimate = estimate_scale([measure(image) for image in images], reference)  # a run's scale
    window = to_reference(images[0], reference, estimate)
    # the window covers the training field in µm: at half the scale, half the training field's pixels
    assert window.size[0] == window.size[1] == pytest.approx(reference.field_px * estimate.ratio, abs=2)


def test_tight_crops_without_red_cells_fall_back_to_the_white_cells_then_to_unknown(demo_pbc, reference):
    crops = [image.crop((120, 120, 240, 240)) for image in demo_cells(demo_pbc, 30)]  # 120 px round the cell
    run = estimate_scale([measure(crop) for crop in crops], reference)
    assert run.source in ("white cell", "red cells") and run.ratio is not None
    blank = Image.new("RGB", (120, 120), (230, 220, 210))
    alone = estimate_scale([measure(blank)], reference)
    assert alone.source == "unknown" and alone.flag.startswith("scale unknown")
    assert to_reference(blank, reference, alone) is blank  # classified at the default scale, flagged
    stated = estimate_scale([measure(blank)], reference, stated_um_per_px=1 / reference.px_per_um)
    assert stated.source == "stated" and stated.ratio == pytest.approx(1.0)


def test_an_absurd_scale_is_flagged_and_not_applied(reference):
    blank = Image.new("RGB", (64, 64), "white")
    tiny = estimate_scale([measure(blank)], reference, stated_um_per_px=100 / reference.px_per_um)  # 100× fewer px/µm
    assert tiny.flag.startswith("scale not believed") and tiny.applied == 1.0
    assert to_reference(blank, reference, tiny) is blank


def test_greyscale_sixteen_bit_and_alpha_images_become_rgb(demo_pbc):
    image = demo_cells(demo_pbc, 1)[0]
    grey = image.convert("L")
    sixteen = Image.fromarray((np.asarray(grey, dtype=np.uint16) * 257).astype(np.uint16))
    alpha = image.convert("RGBA")
    alpha.putalpha(0)  # all transparent: laid on white
    assert as_rgb(sixteen).mode == "RGB"
    assert np.abs(np.asarray(as_rgb(sixteen), dtype=int) - np.asarray(as_rgb(grey), dtype=int)).max() <= 1
    assert np.asarray(as_rgb(alpha)).min() == 255
    assert resize_uint8(sixteen, 32).shape == (3, 32, 32)


def test_white_balance_undoes_a_dim_tinted_exposure(demo_pbc):
    original = torch.stack([resize_uint8(image, 64) for image in demo_cells(demo_pbc, 8)]).float() / 255
    shifted = ((original * torch.tensor([0.3, 0.27, 0.18]).view(1, 3, 1, 1)) * 255).round() / 255
    reference = white_balance(original, [1.0, 1.0, 1.0])[1].median(dim=0).values
    restored, found = white_balance(shifted, reference)
    assert (found.mean(dim=0) < 0.35).all()  # the dim background was found
    before, after = (shifted - original).abs().mean(), (restored - original).abs().mean()
    assert after < 0.03 < before


def test_the_lab_shift_is_seeded_and_stays_an_image():
    batch = torch.rand(4, 3, 48, 48)
    a, b = LabShift(seed=3)(batch), LabShift(seed=3)(batch)
    assert torch.equal(a, b) and a.shape == batch.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a, LabShift(seed=4)(batch))


@pytest.fixture
def scaled_set(tiny_set_folder, tmp_path, demo_pbc, reference):
    """The tiny set with a colour and a scale in its cards, as a cross-lab training writes them."""
    folder = tmp_path / "tiny-scaled"
    shutil.copytree(tiny_set_folder, folder)
    for card_path in folder.glob("*.json"):
        if card_path.name == "set.json":
            continue
        card = json.loads(card_path.read_text())
        card.update(colour=colour_card([0.99, 0.9, 0.8]), scale=reference.as_card())
        card_path.write_text(json.dumps(card))
    return folder


def test_a_set_with_a_scale_resamples_and_balances_and_says_so(scaled_set, tiny_set_folder, demo_pbc):
    tree = CellTree.default()
    images = [smaller(image, 0.5) for image in demo_cells(demo_pbc, 40)]
    scaled = TreeClassifier(scaled_set, tree).classify(images)
    plain = TreeClassifier(tiny_set_folder, tree).classify(images)
    assert all(p.scale["source"] == "red cells" and 0.4 < p.scale["ratio"] < 0.6 for p in scaled)
    assert all(len(p.background) == 3 for p in scaled) and not any(p.scale for p in plain)
    batch = resize_uint8(images[0], 32).unsqueeze(0)
    balanced = model_input(batch, TreeClassifier(scaled_set, tree).input_card)
    as_before = model_input(batch, TreeClassifier(tiny_set_folder, tree).input_card)
    assert not torch.allclose(balanced, as_before)
    blank = Image.new("RGB", (100, 100), (200, 200, 200))
    assert any(flag.startswith("scale unknown") for flag in TreeClassifier(scaled_set, tree).classify([blank])[0].flags)


def test_evaluation_reports_the_scale_and_colour_it_used(scaled_set, demo_pbc):
    rows = list(csv.DictReader(open(demo_pbc / "labels.csv")))[:20]
    label_map = {r["label"]: r["cell_type_code"] for r in csv.DictReader(open(demo_pbc / "label_map.csv"))}
    items = [((lambda p=demo_pbc / r["path"]: smaller(Image.open(p).convert("RGB"), 0.5)), label_map[r["label"]])
             for r in rows]
    result = evaluate_tree(TreeClassifier(scaled_set, CellTree.default()), items)
    assert result["scale"]["run"]["source"] == "red cells" and 0.4 < result["scale"]["run"]["ratio"] < 0.6
    assert result["scale"]["resampled"] == 20
    assert result["colour"]["normalised"] and len(result["colour"]["background_median"]) == 3


def test_a_large_run_keeps_the_own_scale_of_a_spread_sample_of_its_cells(scaled_set, tree, settings, lab_user,
                                                                          demo_pbc, monkeypatch):
    """Every cell is classified at the run's scale; only every n-th also pays for its own red-cell measure."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.analysis import services
    from apps.classifiers.services import register_model_set

    folder = settings.MODELS_DIR / "tiny-scaled"
    shutil.copytree(scaled_set, folder)
    register_model_set(folder, name="tiny-scaled", activate=True)
    monkeypatch.setattr(services, "OWN_MEASURE_SAMPLE", 4)
    rows = list(csv.DictReader(open(demo_pbc / "labels.csv")))[:12]
    files = [SimpleUploadedFile(Path(r["path"]).name, (demo_pbc / r["path"]).read_bytes(), "image/jpeg") for r in rows]
    run = services.start_run(owner=lab_user, files=files)
    assert run.status == run.Status.SUCCEEDED, run.error
    cells = list(run.cells.order_by("index"))
    measured = [cell.index for cell in cells if cell.scale["own_red_cells"] is not None]
    assert measured == [0, 3, 6, 9]  # 12 cells, a sample of 4: every third
    assert len({cell.scale["px_per_um"] for cell in cells}) == 1, [c.scale for c in cells[:2]]
    assert run.scale["own_measured"] <= 4 and run.scale["own_px_per_um_median"]
