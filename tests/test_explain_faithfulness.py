"""Deletion and insertion curves on real models and shipped demo cells; baselines from the slide's background."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hemoweb.ml.explain import BASELINES, baseline_input, explain, prepare, resolve_settings
from hemoweb.ml.faithfulness import STEPS, area, deletion_insertion, masks
from hemoweb.ml.standardise import background_of
from hemoweb.ml.weights import cached_model, read_set

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "default"
CELL = REPO / "demo" / "pbc" / "neutrophil" / "SNE_305627.jpg"
LIGHT_CELLS = [REPO / "demo" / "pbc" / name for name in
               ("lymphocyte/LY_357552.jpg", "monocyte/MO_157821.jpg", "eosinophil/EO_199651.jpg")]


@pytest.fixture(scope="module")
def shipped_root():
    return cached_model(SHIPPED / read_set(SHIPPED).nodes["ROOT"], "cpu")


@pytest.fixture
def tiny_root(tiny_set_folder):
    return cached_model(tiny_set_folder / "ROOT.safetensors", "cpu")


def random_deletion_auc(model, card, image: Image.Image, target: int, seeds=range(5)) -> float:
    """Mean deletion area of random attribution maps on the same image, with the same reference."""
    inputs, _ = prepare(image, card)
    reference = baseline_input(inputs, "background", card)
    generator = np.random.default_rng(0)
    areas = [deletion_insertion(model, inputs, reference, generator.random(inputs.shape[-2:]), target).deletion_auc
             for _ in seeds]
    return float(np.mean(areas))


def check_curves(curves: dict, probability: float) -> None:
    assert len(curves["fractions"]) == len(curves["deletion"]) == len(curves["insertion"]) == STEPS + 1
    for name in ("deletion", "insertion"):
        assert all(0.0 <= p <= 1.0 for p in curves[name]), curves[name]
    assert 0.0 <= curves["deletion_auc"] <= 1.0 and 0.0 <= curves["insertion_auc"] <= 1.0
    # both curves run between the whole cell and the bare reference
    assert curves["deletion"][0] == pytest.approx(probability, abs=1e-3) == curves["insertion"][-1]
    assert curves["deletion"][-1] == curves["insertion"][0]


def test_masks_cover_the_most_attributed_squares_first():
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    stacked = masks(values, steps=4, patches=4)  # one pixel per square
    assert stacked.shape == (5, 1, 4, 4)
    assert [int(m.sum()) for m in stacked] == [0, 4, 8, 12, 16]
    assert stacked[1, 0, 3].tolist() == [1, 1, 1, 1]  # the largest values: the last row
    squares = masks(np.kron([[0.0, 1.0], [2.0, 3.0]], np.ones((3, 3))), steps=4, patches=2)  # 3 × 3 px squares
    assert squares.shape == (5, 1, 6, 6) and squares[1, 0, 3:, 3:].all() and int(squares[1].sum()) == 9
    odd = masks(np.random.default_rng(1).random((7, 7)), steps=2, patches=3)  # 3 px squares, the last ones 1 px
    assert odd.shape == (3, 1, 7, 7) and odd[2].all() and not odd[0].any()
    assert area([0, 0.5, 1], [1, 1, 1]) == pytest.approx(1.0) and area([0, 1], [1, 0]) == pytest.approx(0.5)


def test_the_default_baseline_is_the_image_background_colour_not_black(shipped_root):
    model, card = shipped_root
    assert BASELINES[0] == "background"
    assert resolve_settings("ig", 224)["baseline"] == "background"
    assert resolve_settings("occlusion", 224)["baseline"] == "background"
    image = Image.open(CELL).convert("RGB")
    inputs, shown = prepare(image, card)
    mean, std = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
    pixels = (baseline_input(inputs, "background", card) * std + mean)[0]  # back to RGB in [0, 1]
    colour = pixels.flatten(1).mean(dim=1)
    assert pixels.flatten(1).std(dim=1).max() < 1e-5  # one colour everywhere
    # the light slide's colour as the white balance measures it on the cell the network sees
    expected = background_of(np.asarray(shown, dtype=np.float32) / 255.0)
    assert colour.numpy() == pytest.approx(expected, abs=0.03)
    assert colour.mean() > 0.7  # light: nowhere near black
    black = (baseline_input(inputs, "black", card) * std + mean)[0]
    assert black.abs().max() < 1e-5


def test_curves_of_a_tiny_model_on_a_demo_cell_stay_in_range(tiny_root):
    model, card = tiny_root
    image = Image.open(CELL).convert("RGB")
    for method in ("gradcam", "ig", "occlusion"):
        attribution = explain(model, image, method, card=card)
        curves = attribution.summary()["faithfulness"]
        assert curves["reference"] == "background"
        check_curves(curves, attribution.probabilities[attribution.target])


def test_tiny_model_ig_removes_evidence_faster_than_random_pixels(tiny_root):
    model, card = tiny_root
    image = Image.open(CELL).convert("RGB")
    attribution = explain(model, image, "ig", card=card, n_steps=16)
    real = attribution.faithfulness["deletion_auc"]
    assert real < random_deletion_auc(model, card, image, attribution.target)


@pytest.fixture(scope="module")
def random_areas():
    """Random deletion areas per (cell, class), computed once for the methods that share them."""
    return {}


@pytest.mark.parametrize("method", ["ig", "gradcam", "occlusion"])
def test_shipped_set_attribution_removes_evidence_faster_than_random_pixels(shipped_root, random_areas, method):
    """On real cells the methods' most attributed squares matter more to the network than random ones (on average
    over three cells: on one cell a method may lose, Grad-CAM does on the monocyte)."""
    model, card = shipped_root
    real, random = [], []
    for path in LIGHT_CELLS:
        image = Image.open(path).convert("RGB")
        attribution = explain(model, image, method, card=card)
        check_curves(attribution.faithfulness, attribution.probabilities[attribution.target])
        real.append(attribution.faithfulness["deletion_auc"])
        key = (path.name, attribution.target)
        if key not in random_areas:
            random_areas[key] = random_deletion_auc(model, card, image, attribution.target, seeds=range(3))
        random.append(random_areas[key])
    assert np.mean(real) < np.mean(random), (real, random)


def test_the_black_baseline_puts_less_evidence_on_the_cell_than_the_background(shipped_root):
    """The defect seen on the page: from black, IG credits the light background around the cell."""
    model, card = shipped_root
    shares = {}
    for baseline in ("black", "background"):
        shares[baseline] = np.mean([explain(model, Image.open(path).convert("RGB"), "ig", card=card, curves=False,
                                            baseline=baseline).summary()["central_share"] for path in LIGHT_CELLS])
    assert shares["background"] > shares["black"], shares
