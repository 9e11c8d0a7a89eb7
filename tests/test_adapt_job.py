"""An adaptation as a background job on the training queue: started from the training page or the API, with a
progress bar, cancelled half-way (nothing registered) and resumed."""

import pytest
from django.urls import reverse

from apps.cells.models import Dataset
from apps.cells.services import import_cells
from apps.classifiers.models import ModelSet
from apps.training import services
from apps.training.models import TrainingJob
from hemoweb.ml import adapt as ml_adapt

from .test_adapt_command import lab_folder, tiny_set  # noqa: F401  (the fixture)


@pytest.fixture
def lab_dataset(tiny_set, demo_pbc, tmp_path):  # noqa: F811
    import_cells(lab_folder(tmp_path, demo_pbc), dataset="Lab")
    return Dataset.objects.get(name="Lab")


def test_the_api_queues_an_adaptation_that_registers_its_set_without_activating_it(
        lab_dataset, tiny_set, curator_client, monkeypatch, django_capture_on_commit_callbacks):  # noqa: F811
    monkeypatch.setattr(ml_adapt, "judge", lambda before, after, max_loss: (True, []))
    with django_capture_on_commit_callbacks(execute=True):
        created = curator_client.post("/api/training-jobs/", {"dataset": "Lab", "name": "tiny at the lab",
                                                              "adapt_from": "tiny", "per_type": 4},
                                      content_type="application/json")
    assert created.status_code == 201, created.content
    job = TrainingJob.objects.get(pk=created.json()["id"])
    assert job.params["kind"] == "adapt" and job.params["from_set"] == "tiny" and job.status == "queued"
    job = services.run_training_job(job.pk)
    assert job.status == "succeeded", job.error
    assert job.result.name == "tiny at the lab" and not job.result.is_active
    assert job.metrics["adaptation"]["after"]["lab"]["n"] == 16 and job.percent == 100
    assert "lab cells kept aside (n 16): balanced accuracy" in job.log
    assert not job.work_dir.exists()
    assert curator_client.get(reverse("training:job", args=[job.pk])).status_code == 200


def test_an_adaptation_to_a_taken_name_is_refused(lab_dataset, tiny_set, curator_client):  # noqa: F811
    refused = curator_client.post("/api/training-jobs/", {"dataset": "Lab", "name": "tiny", "adapt_from": "tiny"},
                                  content_type="application/json")
    assert refused.status_code == 400 and "exists already" in refused.json()["detail"]


def test_an_adaptation_cancelled_half_way_registers_nothing_and_can_be_resumed(
        lab_dataset, tiny_set, monkeypatch, settings):  # noqa: F811
    from apps.training.adaptation import start_adaptation

    monkeypatch.setattr(ml_adapt, "judge", lambda before, after, max_loss: (True, []))
    job = start_adaptation(dataset=lab_dataset, from_set=tiny_set, name="cancelled", per_type=4, enqueue=False)
    train = ml_adapt._train_heads_on_features

    def cancelled_while_training(*args, **kwargs):
        TrainingJob.objects.filter(pk=job.pk).update(cancel_requested=True)  # the curator presses Cancel
        return train(*args, **kwargs)

    monkeypatch.setattr(ml_adapt, "_train_heads_on_features", cancelled_while_training)
    job = services.run_training_job(job.pk)
    assert job.status == "cancelled"
    assert not ModelSet.objects.filter(name="cancelled").exists() and not (settings.MODELS_DIR / "cancelled").exists()
    assert [p.name for p in job.work_dir.iterdir()] == []  # no half-written set
    monkeypatch.setattr(ml_adapt, "_train_heads_on_features", train)
    job = services.resume_job(job, enqueue=False)
    job = services.run_training_job(job.pk)
    assert job.status == "succeeded", job.error
    assert ModelSet.objects.get(name="cancelled").is_active is False


def test_the_training_page_offers_adaptation_and_queues_it(lab_dataset, tiny_set, curator_client):  # noqa: F811
    page = curator_client.get(reverse("training:start"))
    assert b"Adapt a trained set instead" in page.content
    response = curator_client.post(reverse("training:start"), {
        "dataset": lab_dataset.pk, "name": "from the page", "architecture": "mobilenetv3_small_050",
        "mode": "scratch", "epochs": 1, "image_size": 32, "batch_size": 8, "device": "cpu",
        "adapt_from": tiny_set.pk, "adapt_mode": "norm"})
    job = TrainingJob.objects.get(name="from the page")
    assert response.status_code == 302 and job.params == {"kind": "adapt", "from_set": "tiny", "mode": "norm",
                                                           "per_type": 0, "seed": 0}
