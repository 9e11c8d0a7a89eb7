"""The inference engine: ONNX Runtime on the CPU gives PyTorch's predictions; its exports are cached, renewed and
repaired; a failed export leaves PyTorch in charge; the setting is honoured and the run shows its engine."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from apps.analysis import services
from hemoweb.ml import engine
from hemoweb.ml.engine import CACHE_FOLDER, EXPORT_TOLERANCE, EngineError, cached_export, load_onnx, resolve_engine
from hemoweb.ml.infer import TreeClassifier
from hemoweb.ml.tree import CellTree
from hemoweb.ml.weights import load_model, read_state, write_safetensors

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "default"
DEMO_PBC = REPO / "demo" / "pbc"


def demo_cells(step: int = 1) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(DEMO_PBC.rglob("*.jpg"))[::step]]


def assert_same_predictions(onnx: list, reference: list, probability: float = 1e-3, familiarity: float = 1e-2):
    """Same codes, guesses, flags and views; every step's probability and the familiarity score within tolerance."""
    assert len(onnx) == len(reference)
    for got, expected in zip(onnx, reference, strict=True):
        assert (got.code, got.guess, got.resolved, got.views) == (expected.code, expected.guess, expected.resolved,
                                                                  expected.views)
        assert [step.node for step in got.path] == [step.node for step in expected.path]
        assert [step.code for step in got.path] == [step.code for step in expected.path]
        for mine, theirs in zip(got.path, expected.path, strict=True):
            assert abs(mine.probability - theirs.probability) <= probability
        assert [flag.split(":")[0] for flag in got.flags] == [flag.split(":")[0] for flag in expected.flags]
        if expected.familiarity is None:
            assert got.familiarity is None
        else:
            assert abs(got.familiarity - expected.familiarity) <= familiarity


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory) -> Path:
    """The shipped set in a temporary folder (its export goes there, not into the repository)."""
    if not (SHIPPED / "backbone.safetensors").is_file():
        pytest.skip("the shipped set models/default is not here")
    folder = tmp_path_factory.mktemp("shipped") / "default"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    return folder


@pytest.fixture
def tiny_copy(tiny_set_folder, tmp_path) -> Path:
    """A writable copy of the tiny set (one network per node), without its exports."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_set_folder, folder, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    return folder


# --- the same predictions ------------------------------------------------------------------------


@pytest.mark.slow
def test_onnxruntime_classifies_the_demo_cells_of_the_shipped_set_as_pytorch_does(shipped_copy):
    tree, cells = CellTree.default(), demo_cells()
    onnx = TreeClassifier(shipped_copy, tree, engine="onnxruntime")
    torch_ = TreeClassifier(shipped_copy, tree, engine="torch")
    assert (onnx.engine, torch_.engine) == ("onnxruntime", "torch")
    got, expected = onnx.classify(cells), torch_.classify(cells)
    assert onnx.engine == "onnxruntime"
    assert any(p.views > 1 for p in expected), "the demo cells include some the set looks at twice"
    assert all(p.familiarity is not None for p in expected)
    assert_same_predictions(got, expected)
    assert [p.code for p in got] == [p.code for p in expected]
    assert [p.background for p in got] == [p.background for p in expected]


def test_features_of_the_shipped_backbone_match_within_float_rounding(shipped_copy):
    classifier = TreeClassifier(shipped_copy, CellTree.default(), engine="onnxruntime")
    batch = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = classifier.backbone()[0](batch)
    got = classifier.network()(batch)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-3


def test_a_set_with_one_network_per_node_classifies_alike_in_both_engines(tiny_copy):
    tree, cells = CellTree.default(), demo_cells(step=3)
    onnx = TreeClassifier(tiny_copy, tree, engine="onnxruntime")
    onnx.check()
    exports = (tiny_copy / CACHE_FOLDER).glob("*.onnx")
    assert sorted(path.name.split("-")[0] for path in exports) == sorted(onnx.node_files)  # one per node
    assert_same_predictions(onnx.classify(cells), TreeClassifier(tiny_copy, tree, engine="torch").classify(cells))


# --- the cache -------------------------------------------------------------------------------------


def test_the_export_is_reused_and_made_again_when_the_weights_change(tiny_copy, monkeypatch):
    weights = tiny_copy / "ROOT.safetensors"
    first = cached_export(weights, load_model)
    card = json.loads(first.with_suffix(".json").read_text())
    assert card["weights_sha256"][:16] in first.name and card["max_difference_to_torch"] <= EXPORT_TOLERANCE

    def no_export(*args):
        raise AssertionError("a valid cached export was exported again")

    monkeypatch.setattr(engine, "_export", no_export)
    assert cached_export(weights, load_model) == first
    monkeypatch.undo()

    state = read_state(weights, "ROOT")  # other weights: a new export under a new name, the old one gone
    write_safetensors(weights, {key: value * 1.01 if key.endswith("weight") else value for key, value in state.items()})
    second = cached_export(weights, load_model)
    assert second != first and second.is_file()
    assert not first.exists() and not first.with_suffix(".json").exists()


def test_a_damaged_cached_export_is_made_again(tiny_copy, caplog):
    weights = tiny_copy / "ROOT.safetensors"
    path = cached_export(weights, load_model)
    path.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="hemoweb.ml.engine"):
        network = load_onnx(weights, load_model)
    assert "damaged" in caplog.text
    batch = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(network(batch), load_model(weights)[0](batch), atol=EXPORT_TOLERANCE)


def test_an_export_the_runtime_refuses_is_made_again_even_when_its_card_agrees(tiny_copy, caplog):
    weights = tiny_copy / "ROOT.safetensors"
    path = cached_export(weights, load_model)
    path.write_bytes(b"\x08\x07garbage")
    card_path = path.with_suffix(".json")
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "sha256": engine.file_sha256(path)}))
    with caplog.at_level(logging.WARNING, logger="hemoweb.ml.engine"):
        network = load_onnx(weights, load_model)
    assert "cannot load" in caplog.text
    assert network(torch.randn(1, 3, 32, 32)).shape == (1, len(load_model(weights)[1].classes))


def test_a_read_only_set_folder_exports_into_the_fallback_cache(tiny_copy, tmp_path, monkeypatch):
    beside = tiny_copy / CACHE_FOLDER
    monkeypatch.setattr(engine, "_writable", lambda folder: Path(folder) != beside)
    path = cached_export(tiny_copy / "ROOT.safetensors", load_model, fallback_dir=tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and not beside.exists()


def test_a_failed_export_leaves_pytorch_in_charge_with_a_log_line(tiny_copy, monkeypatch, caplog):
    def broken(*args):
        raise EngineError("the exporter broke")

    monkeypatch.setattr(engine, "_export", broken)
    classifier = TreeClassifier(tiny_copy, CellTree.default(), engine="onnxruntime")
    with caplog.at_level(logging.WARNING, logger="hemoweb.ml.infer"):
        classifier.check()
        predictions = classifier.classify(demo_cells(step=13))
    assert classifier.engine == "torch" and "the exporter broke" in classifier.engine_note
    assert "PyTorch classifies" in caplog.text
    assert predictions and all(p.path for p in predictions)


# --- choosing the engine -----------------------------------------------------------------------------


def test_auto_is_onnxruntime_on_the_cpu_and_pytorch_on_a_gpu(monkeypatch):
    assert resolve_engine("auto", "cpu") == "onnxruntime"
    assert resolve_engine("auto", "cuda") == "torch"
    assert resolve_engine("onnxruntime", "cuda") == "torch"
    assert resolve_engine("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="Unknown inference engine"):
        resolve_engine("tensorrt", "cpu")
    monkeypatch.setattr(engine, "onnxruntime_version", lambda: None)
    assert resolve_engine("auto", "cpu") == resolve_engine("onnxruntime", "cpu") == "torch"


@pytest.mark.parametrize("setting", ["torch", "onnxruntime", "auto"])
def test_the_run_records_the_engine_of_the_setting_and_shows_it(setting, tiny_model_set, lab_user, lab_client,
                                                                  settings):
    settings.HEMOWEB_INFERENCE_ENGINE = setting
    files = [SimpleUploadedFile(path.name, path.read_bytes()) for path in sorted(DEMO_PBC.rglob("*.jpg"))[:3]]
    run = services.start_run(owner=lab_user, files=files)
    assert run.status == "succeeded", run.error
    used = "torch" if setting == "torch" else "onnxruntime"
    assert run.engine == used
    assert f"engine {used}" in lab_client.get(f"/analysis/runs/{run.pk}/").content.decode()
    assert lab_client.get(f"/api/classification-runs/{run.pk}/").json()["engine"] == used


def test_damaged_backbone_weights_are_refused_before_any_work_with_onnxruntime(shipped_copy, tmp_path):
    from hemoweb.ml.weights import ModelFileError

    folder = tmp_path / "damaged"
    shutil.copytree(shipped_copy, folder)
    weights = folder / "backbone.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="corrupt"):
        TreeClassifier(folder, CellTree.default(), engine="onnxruntime").check()


def test_decoding_in_a_pool_beside_the_network_gives_the_rows_of_decoding_in_turn(tiny_model_set, lab_user, settings,
                                                                                   monkeypatch):
    monkeypatch.setattr(services, "CHUNK", 4)  # several chunks: each decoded while the one before is classified
    paths = sorted(DEMO_PBC.rglob("*.jpg"))[:10]
    rows = {}
    for workers in (0, 2):
        settings.HEMOWEB_CLASSIFY_DECODE_WORKERS = workers
        files = [SimpleUploadedFile(path.name, path.read_bytes()) for path in paths]
        files.append(SimpleUploadedFile("broken.jpg", b"not an image"))
        run = services.start_run(owner=lab_user, files=files)
        assert run.status == "succeeded", run.error
        rows[workers] = ([(c.index, c.predicted_type.code, c.path) for c in run.cells.order_by("index")],
                         [name for name, _ in run.skipped])  # as uploaded, without the stored order prefix
    assert rows[0] == rows[2]
    assert len(rows[0][0]) == 10 and rows[0][1] == ["broken.jpg"]
