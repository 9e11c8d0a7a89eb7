"""`adapt_set`: a lab's labelled folder adapts a registered shared-backbone set; the new set is registered (never
activated) with its before/after scores, refused with the numbers, and nothing is left when refused or cancelled."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from PIL import Image

from django.core.files.storage import default_storage

from apps.cells.models import Cell
from apps.classifiers.models import ModelSet
from apps.training import adaptation, services
from hemoweb.ml import adapt as ml_adapt
from hemoweb.ml.train import TrainingCancelled
from hemoweb.ml.weights import read_set

TINY = {"architecture": "mobilenetv3_small_050", "epochs": 1, "image_size": 32, "batch_size": 16, "min_images": 3,
        "threads": 1, "shared_backbone": True}
LAB_TYPES = {"BA": "BAS", "EO": "EOS", "LY": "LYT", "MO": "MON"}


@pytest.fixture
def tiny_set(pbc_dataset, curator):
    job = services.start_training(dataset=pbc_dataset, name="tiny", params={**TINY, "activate": True}, user=curator,
                                  enqueue=False)
    job = services.run_training_job(job.pk)
    assert job.status == "succeeded", job.error
    return job.result


def lab_folder(tmp_path: Path, demo_pbc: Path, types=LAB_TYPES, extra: dict | None = None) -> Path:
    """Demo cells of a few types as another lab's camera shows them, one sub-folder per label."""
    folder = tmp_path / "lab"
    for label in types:
        (folder / label).mkdir(parents=True)
        for i, path in enumerate(sorted(demo_pbc.glob(f"*/{label}_*"))[:8]):
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * np.array([0.95, 0.85, 0.6]) * 0.8
            Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(folder / label / f"{i}.png")
    for label, files in (extra or {}).items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(files):
            shutil.copy(source, folder / label / f"extra-{i}{source.suffix}")
    return folder


def test_adapt_set_registers_a_new_set_with_both_scores_and_never_activates_it(tiny_set, demo_pbc, tmp_path,
                                                                              monkeypatch, settings):
    monkeypatch.setattr(ml_adapt, "judge", lambda before, after, max_loss: (True, []))
    train_cell = Cell.objects.filter(split="train", cell_type__code="NGS").first()
    folder = lab_folder(tmp_path, demo_pbc, extra={"XYZ": sorted(demo_pbc.glob("*/PMY_*"))[:2],
                                                   "PLT": [Path(default_storage.path(train_cell.image.name))]})
    # a training cell of the set (same bytes): left out and counted; an unknown label: listed and skipped
    shutil.copy(default_storage.path(train_cell.image.name), folder / "LY" / "seen.png")
    out = tmp_path / "report.json"
    call_command("adapt_set", str(folder), "--from", "tiny", "--name", "tiny at the lab", "--per-type", "4",
                 "--json", str(out))
    report = json.loads(out.read_text())
    model_set = ModelSet.objects.get(name="tiny at the lab")
    assert not model_set.is_active and ModelSet.objects.active().name == "tiny"
    card = read_set(model_set.path)
    assert card.data["adapted_from"] == tiny_set.path.name
    for part in ("before", "after"):
        assert card.metrics["adaptation"][part]["lab"]["n"] == 4 * 4
        assert card.metrics["adaptation"][part]["original_test"]["n"] == Cell.objects.filter(split="test").count()
    assert report["selection"]["unknown_labels"] == {"XYZ": 2}
    assert report["selection"]["training_overlap"] == 2  # the same training cell under LY and PLT
    assert "PLT" not in report["selection"]["per_type"]  # its only cell was a training cell
    assert (model_set.path / "README.md").is_file()
    assert not (settings.MODELS_DIR / ".adapting" / model_set.path.name).exists()


def test_a_refused_adaptation_registers_nothing_and_says_why_with_the_numbers(tiny_set, demo_pbc, tmp_path,
                                                                            monkeypatch, settings, capsys):
    monkeypatch.setattr(ml_adapt, "judge", lambda before, after, max_loss: (False, ["not better on the lab's 16 cells "
                                                                                     "kept aside: 0.500 before, 0.400 after"]))
    folder = lab_folder(tmp_path, demo_pbc)
    with pytest.raises(CommandError, match="refused: not better .* 0.500 before, 0.400 after"):
        call_command("adapt_set", str(folder), "--from", "tiny", "--name", "worse", "--per-type", "4")
    assert "balanced accuracy" in capsys.readouterr().out
    assert not ModelSet.objects.filter(name="worse").exists()
    assert not (settings.MODELS_DIR / "worse").exists()
    assert not any((settings.MODELS_DIR / ".adapting").iterdir())


def test_one_type_only_is_refused_before_any_work(tiny_set, demo_pbc, tmp_path):
    folder = lab_folder(tmp_path, demo_pbc, types={"LY": "LYT"})
    with pytest.raises(CommandError, match="only LYT"):
        call_command("adapt_set", str(folder), "--from", "tiny", "--name", "one type")


def test_a_cancelled_adaptation_registers_nothing(tiny_set, demo_pbc, tmp_path, settings):
    folder = lab_folder(tmp_path, demo_pbc)

    def cancel(progress):
        if progress.kind == "step":
            raise TrainingCancelled()

    with pytest.raises(TrainingCancelled):
        adaptation.adapt_model_set(from_set="tiny", name="cancelled", source=folder, per_type=4, callback=cancel)
    assert not ModelSet.objects.filter(name="cancelled").exists()
    assert not (settings.MODELS_DIR / "cancelled").exists()
    leftovers = list((settings.MODELS_DIR / ".adapting").iterdir())
    assert not leftovers, leftovers
