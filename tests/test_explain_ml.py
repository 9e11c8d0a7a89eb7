"""The explanation core on a tiny CNN trained where only one region of the image decides the class."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hemoweb.ml.explain import (
    ExplainError,
    estimate_cost,
    explain,
    gradcam_layer,
    render,
    resolve_settings,
)
from hemoweb.ml.weights import ModelCard, create_model

SIZE = 32
SIGNAL = (0, 0, 16, 16)  # top-left quadrant (a quarter of the image) holds the only class signal
CARD = ModelCard(architecture="tiny-cnn", node="ERY", classes=["PEB", "EBO"], input_size=SIZE,
                 mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def synthetic(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise; class 1 has a white square in the top-left quadrant, class 0 a black one.

    Two distractor squares (black or white at random, unrelated to the class) lie elsewhere, so a
    model that predicts well must look at the top-left quadrant only.
    """
    images = torch.rand(n, 3, SIZE, SIZE, generator=generator) * 0.2 + 0.4
    labels = torch.randint(0, 2, (n,), generator=generator)
    where = torch.randint(0, 26, (n, 2, 2), generator=generator)
    value = torch.randint(0, 2, (n, 2), generator=generator).float()
    for i in range(n):
        row, col = int(where[i, 0, 0]), 16 + int(where[i, 0, 1]) % 10  # right half
        images[i, :, row:row + 6, col:col + 6] = value[i, 0]
        row, col = 16 + int(where[i, 1, 0]) % 10, int(where[i, 1, 1])  # bottom half
        images[i, :, row:row + 6, col:col + 6] = value[i, 1]
        images[i, :, 3:13, 3:13] = float(labels[i])
    return images, labels


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def trained():
    """A three-conv CNN trained for 200 small steps (a few seconds on one core)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 2),
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        images, labels = synthetic(32, generator)
        loss = torch.nn.functional.cross_entropy(model((images - 0.5) / 0.25), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, labels = synthetic(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model((images - 0.5) / 0.25).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95, f"the tiny model did not learn the task ({accuracy:.2f})"
    return model


@pytest.fixture(scope="module")
def signal_images():
    """Held-out images of the class whose evidence is present (a white square), as PIL images."""
    images, labels = synthetic(40, torch.Generator().manual_seed(7))
    return [to_pil(image) for image, label in zip(images, labels) if label == 1][:5]


def mean_share(model, images, method, **settings) -> float:
    shares = [explain(model, image, method, card=CARD, **settings).region_share(*SIGNAL) for image in images]
    return float(np.mean(shares))


@pytest.mark.parametrize("baseline", ["blurred", "mean"])
def test_integrated_gradients_put_most_attribution_on_the_signal_region(trained, signal_images, baseline):
    share = mean_share(trained, signal_images, "ig", baseline=baseline, n_steps=32)
    assert share > 0.5, f"IG ({baseline}) gave the decisive quarter only {share:.2f} of the attribution"


def test_integrated_gradients_from_black_still_favour_the_signal_region(trained, signal_images):
    """From a black baseline every bright pixel (the white distractors too) earns some credit, so the
    decisive quarter gets less than half here (about 0.42) — but clearly more than its area (0.25)."""
    share = mean_share(trained, signal_images, "ig", baseline="black", n_steps=32)
    assert share > 0.33, f"IG (black) gave the decisive quarter only {share:.2f} of the attribution"


def test_occlusion_puts_most_attribution_on_the_signal_region(trained, signal_images):
    # grey patches: on these noise images the brightest pixels (the default fill) are the white signal square itself
    assert mean_share(trained, signal_images, "occlusion", window=6, stride=2, baseline="mean") > 0.6


def test_gradcam_puts_most_attribution_on_the_signal_region(trained, signal_images):
    assert mean_share(trained, signal_images, "gradcam") > 0.6


def test_batched_occlusion_equals_captums_one_at_a_time(trained, signal_images):
    batched = explain(trained, signal_images[0], "occlusion", card=CARD, window=8, stride=4, perturbations_per_eval=64)
    single = explain(trained, signal_images[0], "occlusion", card=CARD, window=8, stride=4, perturbations_per_eval=1)
    np.testing.assert_allclose(batched.map, single.map, rtol=1e-4, atol=1e-5)


def test_integrated_gradients_batched_equals_unbatched(trained, signal_images):
    batched = explain(trained, signal_images[0], "ig", card=CARD, n_steps=20, internal_batch_size=20)
    steps = explain(trained, signal_images[0], "ig", card=CARD, n_steps=20, internal_batch_size=3)
    np.testing.assert_allclose(batched.map, steps.map, rtol=1e-3, atol=1e-5)


def test_target_defaults_to_prediction_and_any_class_of_the_node_can_be_chosen(trained, signal_images):
    predicted = explain(trained, signal_images[0], "gradcam", card=CARD)
    assert predicted.target_code == "EBO" and predicted.summary()["target_probability"] > 0.9
    other = explain(trained, signal_images[0], "ig", target="PEB", card=CARD, n_steps=8)
    assert other.target_code == "PEB" and other.target == 0
    assert other.summary()["predicted"] == "EBO"
    with pytest.raises(ExplainError, match="not an output of the ERY classifier"):
        explain(trained, signal_images[0], "ig", target="NGS", card=CARD)
    with pytest.raises(ExplainError, match="does not exist"):
        explain(trained, signal_images[0], "ig", target=5, card=CARD)


def test_progress_is_reported_up_to_done(trained, signal_images):
    seen = []
    explain(trained, signal_images[0], "occlusion", card=CARD, window=4, stride=2, perturbations_per_eval=16,
            progress=seen.append)
    assert len(seen) > 5 and seen == sorted(seen) and seen[-1] == 1.0


def test_any_size_and_mode_is_resized_and_converted(trained):
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 50), dtype=np.uint8), mode="L")
    rgba = grey.convert("RGBA").resize((90, 40))
    for image in (grey, rgba):
        attribution = explain(trained, image, "ig", card=CARD, n_steps=4)
        assert attribution.map.shape == (SIZE, SIZE)
        overlay, figure = render(attribution, image.convert("RGB"), "title")
        assert overlay.size == image.size  # the heat map lies on the cell at its own size


def test_pictures_are_valid_png_images(trained, signal_images):
    attribution = explain(trained, signal_images[0], "gradcam", card=CARD)
    overlay, figure = render(attribution, signal_images[0].resize((120, 120)), "Grad-CAM · ERY → EBO")
    for image, size in ((overlay, (120, 120)), (figure, figure.size)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        reopened = Image.open(io.BytesIO(buffer.getvalue()))
        reopened.verify()
        assert reopened.format == "PNG" and reopened.size == size
    width, height = figure.size
    assert width > 3 * 256 and height > 256  # three panels of 256 px and a colour bar
    # the overlay differs from the cell where the attribution is strong, not elsewhere
    original = np.asarray(signal_images[0].resize((120, 120)), dtype=float)
    changed = np.abs(np.asarray(overlay, dtype=float) - original).sum(axis=2)
    assert changed[:60, :60].mean() > 3 * changed[60:, 60:].mean()


def test_settings_are_validated_and_defaults_filled():
    assert resolve_settings("ig", 224) == {"baseline": "background", "n_steps": 8, "internal_batch_size": 8}
    assert resolve_settings("ig", 128, n_steps=50)["internal_batch_size"] == 32
    assert resolve_settings("occlusion", 224) == {"baseline": "background", "window": 56, "stride": 56,
                                                   "perturbations_per_eval": 10}
    assert resolve_settings("gradcam", 224, n_steps=9) == {}
    with pytest.raises(ExplainError, match="n_steps must be between"):
        resolve_settings("ig", 224, n_steps=100_000)
    with pytest.raises(ExplainError, match="larger than the model's input"):
        resolve_settings("occlusion", 64, window=100)
    with pytest.raises(ExplainError, match="Unknown baseline"):
        resolve_settings("ig", 64, baseline="white")
    with pytest.raises(ExplainError, match="Unknown method"):
        resolve_settings("lime", 64)


def test_cost_grows_with_steps_and_finer_occlusion():
    ig = [estimate_cost("ig", resolve_settings("ig", 224, n_steps=n), 224, 0.01).seconds for n in (10, 50, 500)]
    assert ig[0] < ig[1] < ig[2] and ig[2] > 10
    coarse = estimate_cost("occlusion", resolve_settings("occlusion", 224), 224, 0.01)
    fine = estimate_cost("occlusion", resolve_settings("occlusion", 224, window=4, stride=1), 224, 0.01)
    assert fine.passes == 1 + 1 + 221 * 221 + 20 and fine.seconds > 100 * coarse.seconds


@pytest.mark.parametrize("architecture", ["mobilenetv3_small_100", "resnet18"])
def test_gradcam_layer_is_the_last_spatial_feature_map_of_timm_models(architecture):
    model = create_model(architecture, 3).eval()
    layer = gradcam_layer(model, 64)
    assert layer is not getattr(model, "conv_head", None)  # MobileNetV3's head is 1×1 after pooling
    shapes = []
    handle = layer.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert shapes and shapes[-1][-1] == 2  # 64 px / 32 = 2: the final stage, not an earlier one
    attribution = explain(model, torch.zeros(1, 3, 64, 64), "gradcam")
    assert attribution.map.shape == (64, 64)
