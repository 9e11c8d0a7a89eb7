"""Familiarity per cell and per run: a tiny shared-backbone set trained on the demo cells, scored on them and on
inputs unlike them (noise, flat images, inverted colours)."""

import csv
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from hemoweb.ml.data import assign_splits
from hemoweb.ml.evaluate import score_predictions
from hemoweb.ml.familiarity import FAMILIARITY_FILE, SHIFT_MESSAGE, site_shift
from hemoweb.ml.infer import Step, TreeClassifier, TreePrediction
from hemoweb.ml.train import CellRecord, TrainConfig, store_half, train_tree
from hemoweb.ml.tree import CellTree
from hemoweb.ml.weights import ModelFileError, read_set, write_set

DEMO_PBC = Path(__file__).resolve().parent.parent / "demo" / "pbc"
TINY = dict(architecture="mobilenetv3_small_050", epochs=2, image_size=32, batch_size=16, min_images=3, threads=1)
FLAG = re.compile(r"^unfamiliar: not like the cells this set was trained on \(score \d+\.\d > \d+\.\d\)$")


def demo_cells() -> list[CellRecord]:
    label_map = {r["label"]: r["cell_type_code"] for r in csv.DictReader(open(DEMO_PBC / "label_map.csv"))}
    rows = list(csv.DictReader(open(DEMO_PBC / "labels.csv")))
    labels = [label_map[r["label"]] for r in rows]
    splits = assign_splits([r["path"] for r in rows], labels, seed=0)
    return [CellRecord(str(DEMO_PBC / r["path"]), label, split) for r, label, split in zip(rows, labels, splits)]


def rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def noise(n: int, side: int = 96) -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))
            for seed in range(n)]


@pytest.fixture(scope="module")
def shared_set(tmp_path_factory) -> Path:
    """A tiny shared-backbone set; its training fits the familiarity statistics at the end (read-only: copy it)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("familiarity") / "shared"
    train_tree(CellTree.default(), demo_cells(), TrainConfig(**TINY, shared_backbone=True), folder, name="shared")
    return folder


@pytest.fixture(scope="module")
def bare_set(shared_set, tmp_path_factory) -> Path:
    """The same set without its familiarity statistics (a set trained before they existed)."""
    folder = tmp_path_factory.mktemp("familiarity") / "bare"
    shutil.copytree(shared_set, folder)
    (folder / FAMILIARITY_FILE).unlink()
    (folder / "familiarity.json").unlink()
    card = read_set(folder)
    card.familiarity = ""
    card.metrics.pop("familiarity")
    write_set(folder, card)
    return folder


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    shutil.copytree(folder, tmp_path / name)
    return tmp_path / name


# --- fitting ----------------------------------------------------------------------------------------


def test_a_shared_training_writes_the_statistics_and_names_them_in_set_json(shared_set):
    set_card = read_set(shared_set)
    assert set_card.familiarity == FAMILIARITY_FILE
    tensors = load_file(str(shared_set / FAMILIARITY_FILE))
    card = json.loads((shared_set / "familiarity.json").read_text())
    assert card["backbone"] == "backbone.safetensors" and len(card["backbone_fingerprint"]) == 64
    assert tensors["means"].shape == (len(card["classes"]), card["dimension"]) and card["dimension"] == 1024
    assert tensors["precision"].shape == (1024, 1024) and tensors["precision"].dtype == torch.float32
    assert card["quantile"] == 0.98 and card["threshold"] > card["train_median"] > 0
    cells = demo_cells()
    assert card["n_train"] == sum(c.split == "train" for c in cells)
    assert card["n_val"] == sum(c.split == "val" for c in cells)
    histogram = card["histogram"]
    assert len(histogram["counts"]) == 30 and len(histogram["edges"]) == 31
    assert sum(histogram["counts"]) == card["n_val"]
    assert set_card.metrics["familiarity"]["threshold"] == card["threshold"]  # for the model set page
    assert card["created"] and set(card["classes"]) == {c.label for c in cells if c.split == "train"}
    assert TreeClassifier(shared_set, CellTree.default()).familiarity_fitted


# --- classifying ------------------------------------------------------------------------------------


def test_demo_cells_mostly_pass_and_unlike_inputs_are_flagged_unresolved_with_a_best_guess(shared_set):
    tree = CellTree.default()
    classifier = TreeClassifier(shared_set, tree)
    threshold = classifier.familiarity().threshold
    held_out = [rgb(c.path) for c in demo_cells() if c.split in ("val", "test")]
    familiar = classifier.classify(held_out)
    assert all(p.familiarity is not None and p.as_dict()["familiarity"] == p.familiarity for p in familiar)
    # the set's own lab: most pass (a tiny set of 104 training cells, its threshold set on 13 validation cells,
    # flags more of its own cells than a real one does: 2 % by design)
    assert sum(p.unfamiliar for p in familiar) <= len(familiar) / 3
    assert all(p.unfamiliar == (p.familiarity > threshold) for p in familiar)
    inverted = [ImageOps.invert(image) for image in held_out[:8]]
    strange = noise(6) + inverted
    predictions = classifier.classify(strange)
    for prediction in predictions:
        assert prediction.unfamiliar and prediction.familiarity > threshold
        assert [flag for flag in prediction.flags if FLAG.match(flag)], prediction.flags
        assert not prediction.resolved
        assert not tree.is_leaf(prediction.code)  # stopped above a leaf, for review
        assert prediction.guess in tree and prediction.code in tree.path(prediction.guess)  # its best guess kept
    # strange inputs score far from the training cells, the held-out demo cells near them
    assert np.median([p.familiarity for p in predictions]) > 1.2 * np.median([p.familiarity for p in familiar])


def test_a_familiar_leaf_stays_resolved_and_an_unfamiliar_one_stops_at_its_parent(shared_set):
    tree = CellTree.default()
    classifier = TreeClassifier(shared_set, tree)
    image = rgb(next(c.path for c in demo_cells() if c.label == "EBO"))
    kept = classifier._thresholds
    classifier._thresholds = dict.fromkeys(classifier.node_files, 0.0)  # no unsure stop: only familiarity decides
    try:
        first = classifier.classify([image])[0]
        assert tree.is_leaf(first.code) and first.resolved == (not first.unfamiliar)
        judged = TreePrediction(code=first.guess, path=list(first.path), guess=first.guess)
        classifier.judge_familiarity(judged, 1e6, classifier.familiarity().threshold)
        classifier._finish(judged)
        assert judged.code == tree.parents[first.guess] and not judged.resolved and judged.guess == first.guess
    finally:
        classifier._thresholds = kept


def test_familiarity_costs_no_extra_network_pass(shared_set, bare_set):
    """The scores come from the features the tree's first pass computed: the backbone runs as often as without."""
    images = [rgb(c.path) for c in demo_cells()[::5]] + noise(3)
    calls = {}
    for name, folder in (("fitted", shared_set), ("bare", bare_set)):
        classifier = TreeClassifier(folder, CellTree.default())
        backbone = classifier.backbone()[0]
        seen = []
        handle = backbone.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
        try:
            classifier.classify(images, batch_size=8)
        finally:
            handle.remove()
        calls[name] = seen
    assert calls["fitted"] == calls["bare"] and calls["fitted"]


def test_a_set_without_statistics_classifies_as_before(shared_set, bare_set):
    images = [rgb(c.path) for c in demo_cells()[::4]] + noise(2)
    bare = TreeClassifier(bare_set, CellTree.default())
    assert not bare.familiarity_fitted and bare.familiarity() is None
    bare.check()
    before = bare.classify(images)
    assert all(p.familiarity is None and not p.unfamiliar for p in before)
    fitted = TreeClassifier(shared_set, CellTree.default()).classify(images)
    for plain, scored in zip(before, fitted, strict=True):
        assert [(s.node, s.code) for s in plain.path] == [(s.node, s.code) for s in scored.path]
        assert plain.guess == scored.guess
        if not scored.unfamiliar:  # a familiar cell comes out exactly as without statistics
            assert (plain.code, plain.resolved, plain.flags) == (scored.code, scored.resolved, scored.flags)


# --- refusing statistics that do not belong to the backbone -------------------------------------------


def test_statistics_of_another_backbone_are_refused(shared_set, tmp_path):
    changed = copy_of(shared_set, tmp_path, "changed")
    weights = load_file(str(changed / "backbone.safetensors"))
    name = next(key for key, value in weights.items() if value.is_floating_point() and value.dim() == 4)
    weights[name] = weights[name] + 0.01  # retrained in place: the statistics describe other features
    save_file(weights, str(changed / "backbone.safetensors"))
    with pytest.raises(ModelFileError, match=r"fitted on another backbone than backbone\.safetensors.*fit_familiarity"):
        TreeClassifier(changed, CellTree.default()).check()

    narrow = copy_of(shared_set, tmp_path, "narrow")
    save_file({"means": torch.zeros(3, 8), "precision": torch.eye(8)}, str(narrow / FAMILIARITY_FILE))
    card = json.loads((narrow / "familiarity.json").read_text())
    (narrow / "familiarity.json").write_text(json.dumps({**card, "dimension": 8}))
    with pytest.raises(ModelFileError, match=r"are for 8 features, but the backbone backbone\.safetensors gives 1024"):
        TreeClassifier(narrow, CellTree.default()).classify(noise(1))

    missing = copy_of(shared_set, tmp_path, "missing")
    (missing / FAMILIARITY_FILE).unlink()
    with pytest.raises(ModelFileError, match="familiarity statistics"):
        TreeClassifier(missing, CellTree.default()).check()


def test_statistics_written_before_the_neighbours_still_score_by_mahalanobis(shared_set, tmp_path):
    from hemoweb.ml.familiarity import Familiarity, Neighbours

    assert isinstance(TreeClassifier(shared_set, CellTree.default()).familiarity(), Neighbours)
    older = copy_of(shared_set, tmp_path, "older")
    state = load_file(str(older / FAMILIARITY_FILE))
    save_file({"means": state["means"], "precision": state["precision"]}, str(older / FAMILIARITY_FILE))
    statistics = TreeClassifier(older, CellTree.default()).familiarity()
    assert type(statistics) is Familiarity
    predictions = TreeClassifier(older, CellTree.default()).classify(noise(3))
    assert all(p.familiarity is not None for p in predictions)

    damaged = copy_of(shared_set, tmp_path, "damaged")
    save_file({**state, "bank": state["bank"][:, :5].contiguous()}, str(damaged / FAMILIARITY_FILE))
    with pytest.raises(ModelFileError, match="do not match"):
        TreeClassifier(damaged, CellTree.default()).check()


def test_half_precision_weights_keep_their_statistics(shared_set, tmp_path):
    half = copy_of(shared_set, tmp_path, "half")
    store_half(half)
    assert {value.dtype for value in load_file(str(half / "backbone.safetensors")).values()
            if value.is_floating_point()} == {torch.float16}
    assert load_file(str(half / FAMILIARITY_FILE))["precision"].dtype == torch.float32  # statistics stay float32
    images = [rgb(c.path) for c in demo_cells()[::10]]
    scores = [p.familiarity for p in TreeClassifier(half, CellTree.default()).classify(images)]
    full = [p.familiarity for p in TreeClassifier(shared_set, CellTree.default()).classify(images)]
    # float16 rounding moves the features a little, and this tiny set (104 cells in 1,024 dimensions) has directions
    # of tiny variance that magnify it: close, not equal
    assert scores == pytest.approx(full, rel=0.15)


# --- evaluation ---------------------------------------------------------------------------------------


def _prediction(code: str, confidence: float, resolved: bool = True, guess: str = "", flags=()) -> TreePrediction:
    return TreePrediction(code=code, path=[Step("ROOT", code, confidence)], resolved=resolved,
                          guess=guess or code, flags=list(flags))


def test_scores_add_selective_accuracy_flag_shares_and_a_risk_coverage_curve():
    tree = CellTree.default()
    labels = ["NGS", "LYT", "EOS", "NGS", "BAS"]
    predictions = [
        _prediction("NGS", 0.95),  # right, taken
        _prediction("LYM", 0.9, resolved=False, guess="LYT",
                    flags=["unfamiliar: not like the cells this set was trained on (score 9.0 > 5.0)"]),
        _prediction("EOS", 0.8, flags=["scale unknown: no red cells"]),  # right but flagged: not taken
        _prediction("NGB", 0.6),  # wrong, taken
        _prediction("MYE", 0.3, resolved=False, guess="EOS", flags=["unsure at MYE: 0.30 < 0.50"]),
    ]
    result = score_predictions(tree, labels, predictions)
    assert result["accuracy"] == pytest.approx(2 / 5, abs=1e-3)  # the existing keys stay
    assert {"coverage", "per_code", "confusion", "coarse8", "forced"} <= set(result)
    assert result["selective_accuracy"] == 0.5 and result["selective_n"] == 2
    assert result["flagged_share"] == 0.6 and result["unfamiliar_share"] == 0.2
    curve = result["risk_coverage"]
    assert len(curve) == 20 and [point["coverage"] for point in curve] == sorted(point["coverage"] for point in curve)
    # by confidence: NGS, LYT (guess right), EOS, NGB (wrong), EOS for BAS (wrong)
    assert curve[0] == {"coverage": 0.2, "risk": 0.0}
    assert {"coverage": 0.6, "risk": 0.0} in curve and {"coverage": 0.8, "risk": 0.25} in curve
    assert curve[-1] == {"coverage": 1.0, "risk": 0.4}
    # a confidence that ranks the wrong answers first shows at low coverage
    predictions[3].path[0].probability = 0.99
    assert score_predictions(tree, labels, predictions)["risk_coverage"][0] == {"coverage": 0.2, "risk": 1.0}
    nothing_taken = score_predictions(tree, ["NGS"], [_prediction("MYE", 0.3, resolved=False)])
    assert nothing_taken["selective_accuracy"] is None and nothing_taken["flagged_share"] == 0.0


# --- the run's verdict --------------------------------------------------------------------------------


def test_site_shift_levels_for_crafted_runs():
    familiar = [1.0] * 99 + [6.0]  # 1 % over a threshold of 5
    calm_scale, calm_colour = {"ratio": 1.02}, {"gain": [1.0, 1.05, 0.97]}
    ok = site_shift(familiar, calm_scale, calm_colour, threshold=5.0)
    assert ok["level"] == "ok" and ok["unfamiliar_share"] == 0.01 and ok["score"] == 0.2 and not ok["reasons"]
    assert SHIFT_MESSAGE not in ok["message"]
    some = [1.0] * 93 + [6.0] * 7  # 7 %: more than 3 × the validation 2 %
    warn = site_shift(some, calm_scale, calm_colour, threshold=5.0)
    assert warn["level"] == "warn" and warn["message"] == SHIFT_MESSAGE and "7%" in warn["reasons"][0]
    assert site_shift(some, calm_scale, calm_colour, threshold=5.0, validation_rate=0.05)["level"] == "ok"
    assert site_shift(familiar, {"ratio": 0.7}, calm_colour, threshold=5.0)["level"] == "warn"
    assert site_shift(familiar, {"run": {"ratio": 1.4}}, {}, threshold=5.0)["level"] == "warn"
    tinted = site_shift(familiar, calm_scale, {"gain": [1.0, 1.0, 1.7]}, threshold=5.0)
    assert tinted["level"] == "warn" and "1.70" in tinted["reasons"][0]
    many = [1.0] * 75 + [6.0] * 25
    alarm = site_shift(many, calm_scale, calm_colour, threshold=5.0)
    assert alarm["level"] == "alarm" and alarm["unfamiliar_share"] == 0.25 and alarm["message"] == SHIFT_MESSAGE
    # predictions and their dicts count the same as scores
    as_predictions = [TreePrediction(code="NGS", familiarity=value) for value in many]
    assert site_shift(as_predictions, calm_scale, calm_colour, threshold=5.0) == alarm
    assert site_shift([p.as_dict() for p in as_predictions], calm_scale, calm_colour, threshold=5.0) == alarm
    one = site_shift([9.0], calm_scale, calm_colour, threshold=5.0)
    assert one["level"] == "none" and one["message"] == "Too few cells for a run-level verdict."
    unknown = site_shift([None] * 50, calm_scale, calm_colour, threshold=None)
    assert unknown["level"] == "unknown" and "no familiarity statistics" in unknown["message"]
    assert "fit_familiarity" in unknown["message"]


# --- through the application ---------------------------------------------------------------------------


@pytest.fixture
def shared_model_set(tree, shared_set, settings):
    from apps.classifiers.services import register_model_set

    folder = settings.MODELS_DIR / "shared-tiny"
    shutil.copytree(shared_set, folder)
    return register_model_set(folder, name="shared-tiny", activate=True)


def _zip(images: dict[str, Image.Image | Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, image in images.items():
            if isinstance(image, Path):
                archive.write(image, name)
            else:
                data = io.BytesIO()
                image.save(data, "PNG")
                archive.writestr(name, data.getvalue())
    return buffer.getvalue()


def test_a_run_stores_its_site_shift_and_each_cells_familiarity(shared_model_set, lab_user, lab_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.analysis import services
    from apps.analysis.api import ClassifiedCellSerializer, RunSerializer
    from apps.analysis.models import ClassificationRun

    demo = sorted(DEMO_PBC.glob("*/*.jpg"))[::6]
    upload = SimpleUploadedFile("demo.zip", _zip({f"{p.parent.name}/{p.name}": p for p in demo}))
    run = services.start_run(owner=lab_user, files=[upload])
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    cells = list(run.cells.order_by("index"))
    assert len(cells) == len(demo) >= 10 and all(cell.familiarity is not None for cell in cells)
    shift = run.site_shift
    assert shift["level"] in ("ok", "warn", "alarm") and shift["n"] == len(cells)
    expected = sum(cell.familiarity > shift["threshold"] for cell in cells) / len(cells)
    assert shift["unfamiliar_share"] == pytest.approx(expected, abs=1e-3)
    assert RunSerializer(run).data["site_shift"] == shift
    assert ClassifiedCellSerializer(cells[0]).data["familiarity"] == cells[0].familiarity
    out = io.StringIO()
    services.write_csv(run, out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    column = rows[0].index("familiarity")
    assert float(rows[1][column]) == cells[0].familiarity

    strange = SimpleUploadedFile("noise.zip", _zip({f"noise{i}.png": image for i, image in enumerate(noise(12))}))
    alarmed = services.start_run(owner=lab_user, files=[strange])
    assert alarmed.site_shift["level"] == "alarm" and alarmed.site_shift["unfamiliar_share"] == 1.0
    assert all(not cell.resolved and any(flag.startswith("unfamiliar") for flag in cell.flags)
               for cell in alarmed.cells.all())
    page = lab_client.get(f"/analysis/runs/{alarmed.pk}/").content.decode()
    assert 'role="alert"' in page and "Site shift: alarm" in page and "verify the model on your lab" in page


def test_a_run_with_too_few_cells_or_a_set_without_statistics_gets_no_verdict(tiny_model_set, lab_user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.analysis import services

    demo = sorted(DEMO_PBC.glob("*/*.jpg"))[:12]
    run = services.start_run(owner=lab_user, files=[SimpleUploadedFile("a.zip", _zip({p.name: p for p in demo}))])
    assert run.site_shift["level"] == "unknown"  # the tiny set has one network per node: no statistics
    assert all(cell.familiarity is None for cell in run.cells.all())


def test_a_one_cell_run_gets_no_verdict(shared_model_set, lab_user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.analysis import services

    path = sorted(DEMO_PBC.glob("*/*.jpg"))[0]
    run = services.start_run(owner=lab_user, files=[SimpleUploadedFile(path.name, path.read_bytes())])
    assert run.site_shift["level"] == "none" and run.cells.get().familiarity is not None


def test_fit_familiarity_command_fits_a_set_trained_before(tree, pbc_dataset, bare_set, settings):
    from django.core.management import CommandError, call_command

    from apps.classifiers.models import ModelSet
    from apps.classifiers.services import register_model_set
    from apps.training.services import assign_dataset_splits

    assign_dataset_splits(pbc_dataset)
    folder = settings.MODELS_DIR / "bare"
    shutil.copytree(bare_set, folder)
    model_set = register_model_set(folder, name="bare", activate=True)
    assert not model_set.card.get("familiarity")
    out = io.StringIO()
    call_command("fit_familiarity", dataset="Demo PBC", models="bare", stdout=out)
    assert "threshold" in out.getvalue() and (folder / FAMILIARITY_FILE).is_file()
    card = json.loads((folder / "familiarity.json").read_text())
    assert card["n_train"] == pbc_dataset.cells.filter(split="train").count()
    assert card["n_val"] == pbc_dataset.cells.filter(split="val").count()
    assert card["fitted_on"] == "train split of Demo PBC"
    assert read_set(folder).familiarity == FAMILIARITY_FILE
    model_set = ModelSet.objects.get(pk=model_set.pk)
    assert model_set.card["familiarity"] == FAMILIARITY_FILE
    assert model_set.metrics["familiarity"]["threshold"] == card["threshold"]
    classifier = TreeClassifier(folder, CellTree.default())
    assert classifier.familiarity().threshold == card["threshold"]
    with pytest.raises(CommandError, match="No dataset named 'Nope'"):
        call_command("fit_familiarity", dataset="Nope", models="bare")


def test_fit_familiarity_refuses_a_set_with_one_network_per_node(tree, pbc_dataset, tiny_model_set):
    from django.core.management import CommandError, call_command

    from apps.training.services import assign_dataset_splits

    assign_dataset_splits(pbc_dataset)
    with pytest.raises(CommandError, match="one network per node: familiarity statistics need a set whose nodes share"):
        call_command("fit_familiarity", dataset="Demo PBC", models="tiny")
