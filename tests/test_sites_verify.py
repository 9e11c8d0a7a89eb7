"""verify_set and the study service: a tiny real model set classifies the demo PBC cells; bad input is refused
or skipped with the reason; a site's set in routine use, quality control when it changes."""

import io
import json

import pytest
from django.core.management import CommandError, call_command

from apps.cells.models import Cell, Dataset
from apps.classifiers.models import ModelSet
from apps.classifiers.services import register_model_set
from apps.sites import services
from apps.sites.models import Site, VerificationStudy
from hemoweb.ml.weights import read_set, write_set


@pytest.fixture
def finished_study(tiny_model_set, pbc_dataset, curator):
    """A study of the tiny set on the 130 demo cells at the default site, run in this process."""
    study = services.start_study(dataset=pbc_dataset, user=curator, enqueue=False)
    return services.run_study(study.pk)


def _move(dataset: Dataset, spec: dict[str, int]) -> None:
    """Move the first n cells of each type of Demo PBC into `dataset`."""
    for code, n in spec.items():
        ids = list(Cell.objects.filter(dataset__name="Demo PBC", cell_type__code=code).values_list("pk", flat=True)[:n])
        Cell.objects.filter(pk__in=ids).update(dataset=dataset)


def test_verify_set_scores_every_type_and_writes_the_json(tiny_model_set, pbc_dataset, tmp_path):
    out, target = io.StringIO(), tmp_path / "study.json"
    call_command("verify_set", "--dataset", "Demo PBC", "--json", str(target), stdout=out)
    result = json.loads(target.read_text())
    study = VerificationStudy.objects.get()
    assert study.status == "succeeded" and study.site == Site.objects.default() and study.trigger == "command"
    assert result["study"] == study.pk and result["n"] == 130 and study.n == 130
    assert len(result["per_type"]) == 13 and set(result["per_type"]["NGS"]) >= {"n", "sensitivity", "ppv", "f1"}
    assert sum(row["n"] for row in result["per_type"].values()) == 130
    assert sum(map(sum, result["confusion"]["matrix"])) == 130
    tp = sum(row["tp"] for row in result["per_type"].values())
    assert result["agreement"]["value"] == round(tp / 130, 4) == round(study.agreement, 4)
    assert -1 <= result["kappa"] <= 1 and 0 <= result["coverage"] <= 1
    assert result["left_out"]["training_overlap"] == 0 and result["left_out"]["training_datasets_checked"] == []
    assert result["verdicts"]["NGS"]["judged"] is False  # 10 cells < 20
    assert result["passed"] is False and study.passed is False
    text = out.getvalue()
    assert "n 130: agreement" in text and "NGS" in text and "FAILED under the acceptance criteria of Main lab" in text
    assert "training cells are not in this database" in text


def test_the_study_uses_the_sites_criteria_and_its_set(tiny_model_set, pbc_dataset, settings, tiny_set_folder):
    import shutil

    shutil.copytree(tiny_set_folder, settings.MODELS_DIR / "other")
    other = register_model_set(settings.MODELS_DIR / "other", name="other")
    site = Site.objects.create(name="Ward 2", model_set=other, min_n=5, min_sensitivity=0.0, type_minimums={})
    study = services.run_study(services.start_study(dataset=pbc_dataset, site="Ward 2", enqueue=False).pk)
    assert study.model_set == other and study.site == site
    assert all(verdict["judged"] for verdict in study.results["verdicts"].values())
    assert study.passed is True  # sensitivity ≥ 0: every judged type passes


def test_a_dataset_with_one_type_only_is_refused(tiny_model_set, pbc_dataset):
    single = Dataset.objects.create(name="Only NGS")
    _move(single, {"NGS": 10})
    with pytest.raises(CommandError, match=r"Only NGS: .*only NGS \(10 cells\)"):
        call_command("verify_set", "--dataset", "Only NGS")
    assert not VerificationStudy.objects.exists()


def test_a_type_with_one_cell_is_skipped_with_the_reason(tiny_model_set, pbc_dataset, tmp_path):
    small = Dataset.objects.create(name="Small")
    _move(small, {"NGS": 10, "LYT": 10, "BAS": 1})
    out = io.StringIO()
    call_command("verify_set", "--dataset", "Small", "--json", str(tmp_path / "s.json"), stdout=out)
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["n"] == 20 and result["n_given"] == 21 and set(result["per_type"]) == {"LYT", "NGS"}
    assert result["left_out"]["too_few"] == {"BAS": {"n": 1, "reason": "only 1 cell: a type needs at least 2"}}
    assert "Skipped BAS: only 1 cell" in out.getvalue()


def test_cells_the_set_was_trained_on_are_left_out_and_counted(tiny_model_set, pbc_dataset, tmp_path):
    card = read_set(tiny_model_set.path)
    card.data = {"dataset": "Demo PBC"}
    write_set(tiny_model_set.path, card)
    trained = list(pbc_dataset.cells.filter(cell_type__code__in=["NGS", "LYT"]).values_list("pk", flat=True)[:7])
    Cell.objects.filter(pk__in=trained[:4]).update(split="train")
    Cell.objects.filter(pk__in=trained[4:]).update(split="val")
    out = io.StringIO()
    call_command("verify_set", "--dataset", "Demo PBC", "--json", str(tmp_path / "o.json"), stdout=out)
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["left_out"]["training_overlap"] == 7 and result["n"] == 123
    assert result["left_out"]["training_datasets_checked"] == ["Demo PBC"]
    assert "Left out: 7 cells the set was trained on" in out.getvalue()


def test_unknown_dataset_set_or_site_say_so(tiny_model_set, pbc_dataset):
    with pytest.raises(CommandError, match="No dataset named 'nope'"):
        call_command("verify_set", "--dataset", "nope")
    with pytest.raises(CommandError, match="No model set named 'nope'"):
        call_command("verify_set", "--dataset", "Demo PBC", "--models", "nope")
    with pytest.raises(CommandError, match="No site named 'nope'. Sites: Main lab"):
        call_command("verify_set", "--dataset", "Demo PBC", "--site", "nope")


def test_damaged_weights_fail_the_study_with_the_reason(tiny_model_set, pbc_dataset):
    study = services.start_study(dataset=pbc_dataset, enqueue=False)
    (tiny_model_set.path / "ROOT.safetensors").write_bytes(b"broken")
    study = services.run_study(study.pk)
    assert study.status == "failed" and "corrupt" in study.error


def test_using_a_set_at_a_site_shows_its_latest_study_and_warns_without_one(finished_study, tiny_model_set):
    site = Site.objects.default()
    use = services.use_model_set(site=site, model_set=tiny_model_set)
    assert use.study == finished_study
    assert "failed: no type had enough cells to judge" in use.warning
    fresh = ModelSet.objects.create(name="fresh", folder="fresh")
    use = services.use_model_set(site=site, model_set=fresh)
    assert use.study is None and "fresh has no verification study at Main lab" in use.warning
    assert Site.objects.default().model_set == fresh


def test_a_site_with_reference_cells_verifies_its_new_set_at_once(tiny_model_set, pbc_dataset, curator,
                                                                   django_capture_on_commit_callbacks, monkeypatch):
    queued = []
    monkeypatch.setattr(services, "_enqueue", queued.append)
    site = Site.objects.create(name="QC lab", reference_dataset=pbc_dataset)
    with django_capture_on_commit_callbacks(execute=True):
        use = services.use_model_set(site=site, model_set=tiny_model_set, user=curator)
    assert use.queued is not None and use.queued.trigger == "set-changed" and queued == [use.queued.pk]
    assert services.after_activation(tiny_model_set) == []  # it names its own set: activation does not concern it
    site.model_set = None
    site.save()
    notes = services.after_activation(tiny_model_set, curator)
    assert len(notes) == 1 and "QC lab follows the active set" in notes[0]
    services.run_study(use.queued.pk)
    study = services.quality_control(site=site, user=curator, enqueue=False)
    services.run_study(study.pk)
    chart = services.agreement_over_time(site)
    assert chart["n"] == 2 and len(chart["points"]) == 2 and chart["agreement"].count(",") == 2
    with pytest.raises(services.StudyError, match="Main lab has no reference cells"):
        services.quality_control(site=Site.objects.default())


def test_runs_and_datasets_belong_to_the_default_site_by_default(tree):
    dataset = Dataset.objects.create(name="New")
    assert dataset.site == Site.objects.default() and Site.objects.filter(is_default=True).count() == 1
    second = Site.objects.create(name="B", is_default=True)
    assert Site.objects.default() == second and Site.objects.filter(is_default=True).count() == 1
