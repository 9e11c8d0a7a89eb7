"""The training loop on real demo images with a tiny timm model: a loadable set, cancel + resume, bad input."""

import csv
import json

import pytest
import torch
from PIL import Image

from hemoweb.ml.data import assign_splits
from hemoweb.ml.evaluate import evaluate_tree, score_predictions
from hemoweb.ml.infer import TreeClassifier, TreePrediction
from hemoweb.ml.train import CellRecord, TrainConfig, TrainingCancelled, TrainingError, train_tree
from hemoweb.ml.tree import CellTree
from hemoweb.ml.weights import read_card, read_set

TINY = dict(architecture="mobilenetv3_small_050", epochs=2, image_size=32, batch_size=16, min_images=3, threads=1)


def demo_cells(demo_pbc) -> list[CellRecord]:
    label_map = {r["label"]: r["cell_type_code"] for r in csv.DictReader(open(demo_pbc / "label_map.csv"))}
    rows = list(csv.DictReader(open(demo_pbc / "labels.csv")))
    labels = [label_map[r["label"]] for r in rows]
    splits = assign_splits([r["path"] for r in rows], labels, seed=0)
    return [CellRecord(str(demo_pbc / r["path"]), label, split) for r, label, split in zip(rows, labels, splits)]


@pytest.fixture(scope="module")
def trained_set(tmp_path_factory):
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "demo" / "pbc"
    folder = tmp_path_factory.mktemp("sets") / "tiny"
    events = []
    card = train_tree(CellTree.default(), demo_cells(demo), TrainConfig(**TINY), folder, name="tiny",
                      callback=events.append)
    return folder, card, events


def test_training_writes_a_set_that_the_tree_classifier_runs(trained_set, demo_pbc):
    folder, card, events = trained_set
    assert set(card.nodes) == {"ROOT", "MYE", "MYI", "MYM", "NEU"}
    assert read_set(folder).architecture == "mobilenetv3_small_050"
    root = read_card(folder / "ROOT.safetensors")
    assert root.classes == ["ERY", "LYM", "MYE", "MEG"]
    assert root.resolves_to == {"ERY": "EBO", "LYM": "LYT", "MEG": "PLT"}
    assert root.input_size == 32 and 0.0 <= root.threshold < 1.0
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion"} <= set(root.metrics["test"])
    assert len(root.metrics["history"]) == 2 and "val_loss" in root.metrics["history"][0]
    assert not (folder / "checkpoints" / "ROOT.safetensors").exists()
    kinds = {event.kind for event in events}
    assert {"plan", "decode", "step", "epoch", "node"} <= kinds
    steps = [e for e in events if e.kind == "step"]
    assert steps[0].node_count == 5 and steps[0].node_index == 1
    images = [Image.open(path) for path in sorted(demo_pbc.glob("*/*.jpg"))[:6]]
    predictions = TreeClassifier(folder, CellTree.default()).classify(images)
    tree = CellTree.default()
    assert all(p.code in tree and p.path and p.path[0].node == "ROOT" for p in predictions)


def test_cancel_keeps_the_epoch_checkpoint_and_resume_finishes(tmp_path, demo_pbc):
    cells = demo_cells(demo_pbc)
    folder = tmp_path / "set"
    config = TrainConfig(**{**TINY, "epochs": 3, "nodes": ["ROOT", "NEU"]})

    def cancel_after_first_epoch(event):
        if event.kind == "epoch" and event.node == "ROOT" and event.epoch == 1:
            raise TrainingCancelled()

    with pytest.raises(TrainingCancelled):
        train_tree(CellTree.default(), cells, config, folder, callback=cancel_after_first_epoch)
    checkpoint = json.loads((folder / "checkpoints" / "ROOT.json").read_text())
    assert checkpoint["epoch"] == 1
    assert not (folder / "set.json").exists()  # nothing half-written looks like a set
    messages = []
    card = train_tree(CellTree.default(), cells, config, folder, callback=lambda e: messages.append(e.message))
    assert any("resumed after epoch 1" in m for m in messages)
    history = read_card(folder / "ROOT.safetensors").metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(card.nodes) == {"ROOT", "NEU"}


def test_unknown_architecture_and_missing_pretrained_file_are_clear(tmp_path, demo_pbc):
    cells = demo_cells(demo_pbc)
    with pytest.raises(TrainingError, match="Unknown architecture 'resnet_nonexistent'"):
        train_tree(CellTree.default(), cells, TrainConfig(**{**TINY, "architecture": "resnet_nonexistent"}), tmp_path)
    config = TrainConfig(**{**TINY, "mode": "pretrained", "pretrained_dir": str(tmp_path / "pretrained")})
    with pytest.raises(TrainingError, match=r"expected the file .*pretrained/mobilenetv3_small_050\.safetensors"):
        train_tree(CellTree.default(), cells, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_class_dataset_is_refused(tmp_path, demo_pbc):
    cells = [c for c in demo_cells(demo_pbc) if c.label == "NGS"]
    with pytest.raises(TrainingError, match="only one cell type"):
        train_tree(CellTree.default(), cells, TrainConfig(**TINY), tmp_path)


def test_pretrained_mode_starts_from_the_converted_lite0_imagenet_weights(tmp_path, demo_pbc):
    from safetensors.torch import load_file

    from hemoweb.ml.pretrained import convert_lite0

    target = convert_lite0(tmp_path / "pretrained" / "tf_efficientnet_lite0.safetensors")
    imagenet = load_file(str(target))
    assert imagenet["classifier.weight"].shape == (1000, 1280)
    config = TrainConfig(architecture="tf_efficientnet_lite0", mode="pretrained_aug", epochs=1, image_size=32,
                         batch_size=16, min_images=3, nodes=["NEU"], max_steps_per_epoch=1, threads=1,
                         pretrained_dir=str(tmp_path / "pretrained"))
    train_tree(CellTree.default(), demo_cells(demo_pbc), config, tmp_path / "set")
    trained = load_file(str(tmp_path / "set" / "NEU.safetensors"))
    # one step of fine-tuning moves the stem only slightly away from ImageNet, and far from a random init
    stem = "conv_stem.weight"
    assert (trained[stem] - imagenet[stem]).abs().mean() < 0.05 * imagenet[stem].abs().mean() + 1e-3
    assert read_card(tmp_path / "set" / "NEU.safetensors").mean == [0.5, 0.5, 0.5]


def test_evaluation_scores_each_cell_at_its_own_level(trained_set, demo_pbc):
    tree = CellTree.default()
    right = TreePrediction(code="NGS", resolved=True)
    stopped = TreePrediction(code="MYM", resolved=False, guess="NGB")
    wrong_guess = TreePrediction(code="MYE", resolved=False, guess="PMO")
    result = score_predictions(tree, ["NEU", "NGS", "NEU", "NGS"], [right, right, stopped, wrong_guess])
    assert result["n"] == 4 and result["accuracy"] == pytest.approx(2 / 4, abs=1e-3)
    assert result["coverage"] == pytest.approx(2 / 4, abs=1e-3)
    assert result["coarse8"]["accuracy"] == pytest.approx(2 / 4, abs=1e-3)  # MYM is no 8-class answer: wrong
    # forced: the stopped cells are scored on their best guesses (NGB passes NEU; PMO is not NGS)
    assert result["forced"]["accuracy"] == pytest.approx(3 / 4, abs=1e-3)
    assert result["forced"]["coarse8"]["accuracy"] == pytest.approx(3 / 4, abs=1e-3)
    # the tiny set on the demo's real test cells, opened lazily and classified in chunks of 4
    folder, _, _ = trained_set
    classifier = TreeClassifier(folder, tree)
    cells = [cell for cell in demo_cells(demo_pbc) if cell.split == "test"]
    items = [((lambda path=cell.path: Image.open(path)), cell.label) for cell in cells]
    scored = evaluate_tree(classifier, items, chunk=4)
    assert set(scored) >= {"n", "accuracy", "balanced_accuracy", "macro_f1", "coverage", "per_code", "confusion",
                           "coarse8", "forced"}
    labels = [cell.label for cell in cells]
    at_once = score_predictions(tree, labels, classifier.classify([Image.open(cell.path) for cell in cells]))
    assert scored["n"] == len(cells) == 13
    assert {key: scored[key] for key in at_once} == at_once  # chunked and lazy, the same scores as all at once
    confusion = scored["confusion"]
    assert confusion["labels"] == sorted(set(labels), key=tree.order.index)
    assert [sum(row) for row in confusion["matrix"]] == [labels.count(code) for code in confusion["labels"]]


def test_half_precision_weights_halve_the_size_and_predict_the_same(trained_set, tmp_path, demo_pbc):
    import shutil

    from hemoweb.ml.train import store_half

    folder, _, _ = trained_set
    copy = tmp_path / "half"
    shutil.copytree(folder, copy)
    before = sum(f.stat().st_size for f in copy.glob("*.safetensors"))
    assert store_half(copy) > 0.4 * before
    images = [Image.open(path) for path in sorted(demo_pbc.glob("*/*.jpg"))[::13]]
    full = TreeClassifier(folder, CellTree.default()).classify(images)
    half = TreeClassifier(copy, CellTree.default()).classify(images)
    assert [p.code for p in full] == [p.code for p in half]


@pytest.fixture(scope="module")
def shared_set(tmp_path_factory):
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "demo" / "pbc"
    folder = tmp_path_factory.mktemp("sets") / "shared"
    events = []
    card = train_tree(CellTree.default(), demo_cells(demo), TrainConfig(**TINY, shared_backbone=True), folder,
                      name="shared", callback=events.append)
    return folder, card, events


def test_shared_backbone_trains_every_node_in_one_run_with_one_backbone_file(shared_set):
    from safetensors.torch import load_file

    folder, card, events = shared_set
    assert card.backbone == "backbone.safetensors" and set(card.nodes) == {"ROOT", "MYE", "MYI", "MYM", "NEU"}
    steps = [e for e in events if e.kind == "step"]
    assert {e.node for e in steps} == {"shared"} and steps[0].node_count == 1
    root = read_card(folder / "ROOT.safetensors")
    assert root.backbone == "backbone.safetensors" and root.classes == ["ERY", "LYM", "MYE", "MEG"]
    assert set(load_file(str(folder / "ROOT.safetensors"))) == {"weight", "bias"}  # the head only
    assert len(root.metrics["history"]) == 2 and root.metrics["test"]["n"] > 0
    assert {e.node for e in events if e.kind == "node"} == set(card.nodes)
    assert not (folder / "checkpoints" / "shared.safetensors").exists()
    # readable by the other processes of an installation (web and worker may run as different users)
    assert {(path.stat().st_mode & 0o777) for path in folder.glob("*.safetensors")} == {0o644}


def test_shared_set_classifies_like_its_nodes_whole_models(shared_set, demo_pbc):
    """The tree runs heads on features computed once; each node rebuilt as a whole timm model agrees."""
    from hemoweb.ml.preprocess import batch_for
    from hemoweb.ml.weights import load_model

    folder, _, _ = shared_set
    images = [Image.open(path).convert("RGB") for path in sorted(demo_pbc.glob("*/*.jpg"))[::9]]
    classifier = TreeClassifier(folder, CellTree.default())
    predictions = classifier.classify(images, batch_size=8)
    assert all(p.path and p.path[0].node == "ROOT" for p in predictions)
    root, card = load_model(folder / "ROOT.safetensors")
    with torch.inference_mode():
        whole = root(batch_for(images, card)).softmax(dim=1)
    for prediction, probabilities in zip(predictions, whole, strict=True):
        step = prediction.path[0]
        assert step.code == card.classes[int(probabilities.argmax())]
        assert step.probability == pytest.approx(float(probabilities.max()), abs=1e-4)


def test_shared_run_resumes_from_its_checkpoint(tmp_path, demo_pbc):
    cells = demo_cells(demo_pbc)
    folder = tmp_path / "set"
    config = TrainConfig(**{**TINY, "epochs": 3, "shared_backbone": True})

    def cancel_after_first_epoch(event):
        if event.kind == "epoch" and event.epoch == 1:
            raise TrainingCancelled()

    with pytest.raises(TrainingCancelled):
        train_tree(CellTree.default(), cells, config, folder, callback=cancel_after_first_epoch)
    assert json.loads((folder / "checkpoints" / "shared.json").read_text())["epoch"] == 1
    assert not (folder / "set.json").exists() and not (folder / "ROOT.safetensors").exists()
    messages = []
    train_tree(CellTree.default(), cells, config, folder, callback=lambda e: messages.append(e.message))
    assert any("resumed after epoch 1" in m for m in messages)
    assert [h["epoch"] for h in read_card(folder / "NEU.safetensors").metrics["history"]] == [1, 2, 3]
    # a head lost after the run (a crash while writing the heads): the set is trained again as a whole,
    # never completed with a per-node network beside the shared backbone
    (folder / "NEU.safetensors").unlink()
    card = train_tree(CellTree.default(), cells, config, folder)
    from safetensors.torch import load_file

    assert card.backbone and set(load_file(str(folder / "NEU.safetensors"))) == {"weight", "bias"}


def test_a_shared_set_without_its_backbone_file_is_a_clear_error(shared_set, tmp_path, demo_pbc):
    import shutil

    from hemoweb.ml.weights import ModelFileError

    copy = tmp_path / "broken"
    shutil.copytree(shared_set[0], copy)
    (copy / "backbone.safetensors").unlink()
    with pytest.raises(ModelFileError, match="backbone.safetensors"):
        TreeClassifier(copy, CellTree.default()).check()


def test_the_shipped_default_set_loads_and_classifies_the_demo_cells(demo_pbc):
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "models" / "default"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 40 * 1024**2
    classifier = TreeClassifier(folder, CellTree.default())
    classifier.check()
    cells = demo_cells(demo_pbc)
    result = evaluate_tree(classifier, [((lambda path=cell.path: Image.open(path)), cell.label) for cell in cells])
    # real weights on real cells (most of them were training cells, so this guards loading, not accuracy)
    assert result["n"] == 130 and result["coarse8"]["accuracy"] >= 0.9 and result["coverage"] >= 0.9
    assert read_set(folder).input_size == classifier.backbone()[1].input_size


# --- the second look at unsure cells ----------------------------------------------------------------


def test_the_views_are_the_eight_turns_and_mirrors_of_a_cell():
    from hemoweb.ml.infer import VIEW_ORDER, view

    batch = torch.arange(9).reshape(1, 1, 3, 3)
    views = [view(batch, k) for k in range(8)]
    assert torch.equal(views[0], batch) and sorted(VIEW_ORDER) == list(range(8))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all different for an asymmetric picture
    assert torch.equal(view(batch, 4), batch.flip(3)) and torch.equal(view(batch, 2), batch.flip(2).flip(3))
    assert all(v.flatten().sort().values.tolist() == list(range(9)) for v in views)  # the same pixels, moved


def test_a_second_look_averages_turned_views_for_the_unsure_cells_only(shared_set, demo_pbc):
    from hemoweb.ml.infer import VIEW_ORDER, view
    from hemoweb.ml.preprocess import batch_for
    from hemoweb.ml.weights import load_model

    folder, _, _ = shared_set
    images = [Image.open(path).convert("RGB") for path in sorted(demo_pbc.glob("*/*.jpg"))[::7]]
    first = TreeClassifier(folder, CellTree.default()).classify(images)
    at_root = sorted(p.path[0].probability for p in first)
    threshold = (at_root[len(at_root) // 2 - 1] + at_root[len(at_root) // 2]) / 2  # half the cells unsure at ROOT
    thresholds = {**dict.fromkeys(read_set(folder).nodes, 0.0), "ROOT": threshold}  # only ROOT stops cells
    plain = TreeClassifier(folder, CellTree.default(), thresholds=thresholds, second_look=0).classify(images)
    looked = TreeClassifier(folder, CellTree.default(), thresholds=thresholds, second_look=4).classify(images)
    root, card = load_model(folder / "ROOT.safetensors")
    with torch.inference_mode():
        batch = batch_for(images, card)
        mean = torch.stack([root(view(batch, k)).softmax(dim=1) for k in VIEW_ORDER[:4]]).mean(dim=0)
    unsure = [index for index, p in enumerate(plain) if p.unsure]
    assert 0 < len(unsure) < len(images)
    for index, (before, after) in enumerate(zip(plain, looked, strict=True)):
        if index in unsure:  # looked at again: ROOT's probability is the mean over the 4 views
            assert after.views == 4 and after.as_dict()["views"] == 4
            assert after.path[0].code == card.classes[int(mean[index].argmax())]
            assert after.path[0].probability == pytest.approx(float(mean[index].max()), abs=1e-4)
            assert after.unsure == (after.path[0].probability < threshold)
            assert all(flag.endswith("(4 views)") for flag in after.flags if flag.startswith("unsure"))
        else:  # a sure cell is left as the first pass had it
            assert after.views == 1 and after.as_dict() == before.as_dict()
    with pytest.raises(ValueError, match="0 to 8 views"):
        TreeClassifier(folder, CellTree.default(), second_look=9)


def test_training_chooses_the_second_look_on_its_validation_cells(shared_set):
    from hemoweb.ml.evaluate import SECOND_LOOKS

    folder, card, events = shared_set
    chosen = read_set(folder).metrics["second_look_choice"]
    scores = {int(views): accuracy for views, accuracy in chosen["val_accuracy"].items()}
    assert set(scores) == set(SECOND_LOOKS) and card.second_look == read_set(folder).second_look == chosen["views"]
    best = max(scores.values())
    assert scores[card.second_look] == best and card.second_look == min(v for v, a in scores.items() if a == best)
    assert any(event.message.startswith("Second look for unsure cells") for event in events)
    assert TreeClassifier(folder, CellTree.default()).second_look == card.second_look


def test_a_cell_gets_the_same_prediction_alone_or_in_a_padded_short_batch(shared_set, trained_set, demo_pbc):
    """Short batches are padded to a power of two rows (few input shapes); the padding changes no cell."""
    images = [Image.open(path).convert("RGB") for path in sorted(demo_pbc.glob("*/*.jpg"))[::13][:5]]
    for folder in (shared_set[0], trained_set[0]):
        classifier = TreeClassifier(folder, CellTree.default(), second_look=0)
        together = classifier.classify(images, batch_size=8)  # 5 cells padded to 8 rows
        alone = [classifier.classify([image])[0] for image in images]
        for a, b in zip(together, alone, strict=True):
            assert [(s.node, s.code) for s in a.path] == [(s.node, s.code) for s in b.path]
            assert [s.probability for s in a.path] == pytest.approx([s.probability for s in b.path], abs=1e-4)
