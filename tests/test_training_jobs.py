"""Training jobs through the service, the CLI, the pages and the API (in-process worker)."""

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from apps.cells.models import Cell, Dataset
from apps.classifiers.models import ModelSet
from apps.training import services
from apps.training.models import TrainingJob

@pytest.fixture
def lab_only(lab_user):
    """A second client (curator_client and lab_client share one client object)."""
    from django.test import Client

    client = Client()
    client.force_login(lab_user)
    return client


TINY = {"architecture": "mobilenetv3_small_050", "epochs": 1, "image_size": 32, "batch_size": 16, "min_images": 3,
        "threads": 1}


@pytest.fixture
def finished_job(pbc_dataset, curator):
    job = services.start_training(dataset=pbc_dataset, name="tiny set", params=TINY, user=curator, enqueue=False)
    return services.run_training_job(job.pk)


def test_a_job_trains_registers_its_set_and_stores_the_splits(finished_job, pbc_dataset):
    job = finished_job
    assert job.status == TrainingJob.Status.SUCCEEDED, job.error
    assert job.percent == 100 and job.started and job.finished
    model_set = job.result
    assert model_set.name == "tiny set"
    assert model_set.is_active  # not asked to activate, but the first set a site registers is the one in use
    assert set(model_set.node_models.values_list("node__code", flat=True)) == {"ROOT", "MYE", "MYI", "MYM", "NEU"}
    assert (model_set.path / "set.json").is_file() and not job.work_dir.exists()
    assert {"n", "accuracy", "coarse8", "nodes"} <= set(model_set.metrics)
    splits = dict(pbc_dataset.cells.values_list("split").annotate(n=__import__("django").db.models.Count("id")))
    assert splits == {"train": 104, "val": 13, "test": 13}
    assert model_set.metrics["n"] == 13  # evaluated on exactly the stored test cells
    assert "ROOT" in job.metrics["history"] and job.metrics["nodes"]["NEU"]["accuracy"] is not None
    assert "ERY skipped" in job.log


def test_bad_requests_are_refused_with_a_clear_message(pbc_dataset, tree):
    with pytest.raises(services.TrainingRequestError, match="not a timm model name"):
        services.start_training(dataset=pbc_dataset, name="x", params={**TINY, "architecture": "no_such_net"})
    with pytest.raises(services.TrainingRequestError, match="expected the file .*tf_efficientnet_lite0.safetensors"):
        services.start_training(dataset=pbc_dataset, name="x",
                                params={**TINY, "architecture": "tf_efficientnet_lite0", "mode": "pretrained"})
    one_class = Dataset.objects.create(name="one class")
    Cell.objects.filter(pk__in=list(pbc_dataset.cells.filter(cell_type__code="NGS").values_list("pk", flat=True))
                        ).update(dataset=one_class)
    with pytest.raises(services.TrainingRequestError, match="only one cell type"):
        services.start_training(dataset=one_class, name="x", params=TINY)
    empty = Dataset.objects.create(name="empty")
    with pytest.raises(services.TrainingRequestError, match="no images"):
        services.start_training(dataset=empty, name="x", params=TINY)
    assert not TrainingJob.objects.exists()


def test_a_node_with_too_few_images_fails_the_job_without_a_set(pbc_dataset, tree):
    job = services.start_training(dataset=pbc_dataset, name="few", params={**TINY, "min_images": 50,
                                                                              "nodes": ["NEU"]}, enqueue=False)
    job = services.run_training_job(job.pk)
    assert job.status == TrainingJob.Status.FAILED
    assert "NGB has 10" in job.error and "at least 50" in job.error
    assert not ModelSet.objects.exists()


def test_cancel_a_queued_job_and_a_running_one_and_resume_it_from_its_page(
        pbc_dataset, curator_client, lab_only, django_capture_on_commit_callbacks):
    from django.conf import settings
    from django_q.models import OrmQ

    queued = services.start_training(dataset=pbc_dataset, name="c1", params=TINY, enqueue=False)
    services.cancel_job(queued)
    assert queued.status == TrainingJob.Status.CANCELLED
    assert services.run_training_job(queued.pk).status == TrainingJob.Status.CANCELLED  # the worker skips it
    job = services.start_training(dataset=pbc_dataset, name="c2", params={**TINY, "epochs": 3}, enqueue=False)
    page = reverse("training:job", args=[job.pk])
    running_page = []

    def cancel_when_training(message):  # the CLI echo sees each epoch: the curator presses Cancel on the job page
        if "epoch 1/3" in message and not running_page:
            running_page.append(curator_client.get(page).content.decode())
            assert lab_only.post(reverse("training:cancel", args=[job.pk])).status_code in (302, 403)
            assert not TrainingJob.objects.get(pk=job.pk).cancel_requested  # lab staff may not cancel
            response = curator_client.post(reverse("training:cancel", args=[job.pk]), follow=True)
            assert "the job stops at its next progress report" in response.content.decode()

    job = services.run_training_job(job.pk, echo=cancel_when_training)
    cancel_button = f'action="{reverse("training:cancel", args=[job.pk])}"'
    resume_button = f'action="{reverse("training:resume", args=[job.pk])}"'
    assert cancel_button in running_page[0] and resume_button not in running_page[0]
    assert job.status == TrainingJob.Status.CANCELLED
    assert job.can_resume and not ModelSet.objects.exists()
    cancelled_page = curator_client.get(page).content.decode()
    assert resume_button in cancelled_page and cancel_button not in cancelled_page
    assert resume_button not in lab_only.get(page).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = curator_client.post(reverse("training:resume", args=[job.pk]), follow=True)
    assert "continues from its last checkpoint" in response.content.decode()
    job.refresh_from_db()
    assert job.status == TrainingJob.Status.QUEUED and not job.cancel_requested
    assert OrmQ.objects.filter(key=settings.HEMOWEB_TRAINING_CLUSTER).count() == 1  # back on the training queue
    job = services.run_training_job(job.pk)  # what the training worker runs
    assert job.status == TrainingJob.Status.SUCCEEDED, job.error
    assert "resumed after epoch 1" in job.log


def test_train_tree_command_runs_in_the_foreground(pbc_dataset, capsys):
    call_command("train_tree", "--dataset", "Demo PBC", "--arch", "mobilenetv3_small_050", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--min-images", "3", "--name", "cli set", "--activate",
                 "--nodes", "ROOT", "NEU")
    out = capsys.readouterr().out
    assert "ROOT epoch 1/1" in out and "Done: cli set" in out
    assert ModelSet.objects.get(name="cli set").is_active
    with pytest.raises(CommandError, match="No dataset named 'nope'"):
        call_command("train_tree", "--dataset", "nope")
    with pytest.raises(CommandError, match="not a timm model name"):
        call_command("train_tree", "--dataset", "Demo PBC", "--arch", "nonet")


def test_evaluate_tree_json_has_the_documented_keys(finished_job, demo_pbc, tmp_path):
    out = tmp_path / "eval.json"
    call_command("evaluate_tree", str(demo_pbc), "--models", "tiny set", "--labels", str(demo_pbc / "labels.csv"),
                 "--label-map", str(demo_pbc / "label_map.csv"), "--json", str(out))
    result = json.loads(out.read_text())
    assert {"n", "accuracy", "balanced_accuracy", "macro_f1", "coverage", "per_code", "confusion", "coarse8"} <= set(result)
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(result["coarse8"])
    assert result["n"] == 130
    assert set(result["per_code"]) == {"BAS", "EBO", "EOS", "LYT", "MON", "NGB", "NGS", "NEU", "PMO", "MYB", "MMZ",
                                       "MYI", "PLT"}
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["coverage"] <= 1.0
    # refusing a cell can only cost accuracy: the forced figures are at least the lab's figures
    assert result["forced"]["accuracy"] >= result["accuracy"]
    assert result["forced"]["coarse8"]["accuracy"] >= result["coarse8"]["accuracy"]
    with pytest.raises(CommandError, match="No model set named 'missing'"):
        call_command("evaluate_tree", str(demo_pbc), "--models", "missing")
    # the PBC folders as published (basophil, ig, neutrophil, ...) need neither CSV: the same cells at coarser labels
    by_folder = tmp_path / "folders.json"
    call_command("evaluate_tree", str(demo_pbc), "--models", "tiny set", "--json", str(by_folder))
    by_folder = json.loads(by_folder.read_text())
    assert by_folder["n"] == 130 and by_folder["unknown_labels"] == {}
    assert set(by_folder["per_code"]) == {"BAS", "EBO", "EOS", "LYT", "MON", "NEU", "MYI", "PLT"}
    assert by_folder["coarse8"]["accuracy"] == result["coarse8"]["accuracy"]


def test_evaluate_tree_on_a_stored_datasets_test_split(finished_job, pbc_dataset, tmp_path):
    out = tmp_path / "test-split.json"
    call_command("evaluate_tree", "--dataset", pbc_dataset.name, "--models", "tiny set", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["n"] == 13 and result["evaluated_on"] == f"test split of {pbc_dataset.name}"
    stored = finished_job.result.metrics  # the job scored the same test cells with the same set
    assert (result["accuracy"], result["coarse8"]["accuracy"]) == (stored["accuracy"], stored["coarse8"]["accuracy"])
    with pytest.raises(CommandError, match="either SOURCE"):
        call_command("evaluate_tree")
    with pytest.raises(CommandError, match="No dataset named 'nope'"):
        call_command("evaluate_tree", "--dataset", "nope")


def test_pages_show_jobs_progress_results_and_comparison(finished_job, curator_client, lab_only):
    job = finished_job
    page = lab_only.get(reverse("training:home"))
    assert page.status_code == 200 and b"tiny set" in page.content
    assert lab_only.get(reverse("training:start")).status_code in (302, 403)  # lab staff may only look
    detail = curator_client.get(reverse("training:job", args=[job.pk]))
    assert b"Results per node" in detail.content and b"Confusion" in detail.content and b"<polyline" in detail.content
    partial = curator_client.get(reverse("training:job", args=[job.pk]), HTTP_HX_REQUEST="true",
                                 HTTP_HX_TARGET="job-progress")
    assert partial.content.lstrip().startswith(b'<section id="job-progress"')
    assert b"every 1s" not in partial.content  # finished: the bar stops polling
    compare = lab_only.get(reverse("training:compare"))
    assert b"mobilenetv3_small_050" in compare.content and b"all" in compare.content

    # another set is in use: the curator makes the trained one active from the comparison (lab staff may not)
    trained = job.result
    other = ModelSet.objects.create(name="other set", folder="other", architecture="resnet18", mode="pretrained")
    other.activate()
    activate = reverse("classifiers:activate", args=[trained.pk])
    assert f'action="{activate}"' not in lab_only.get(reverse("training:compare")).content.decode()
    compare = curator_client.get(reverse("training:compare")).content.decode()
    assert compare.count("Make active") == 1 and f'action="{activate}"' in compare
    assert lab_only.post(activate).status_code in (302, 403)
    assert lab_only.get(reverse("classifiers:activate", args=[trained.pk])).status_code in (302, 403, 405)
    assert list(ModelSet.objects.filter(is_active=True)) == [other]
    assert "Yes, make tiny set active" in curator_client.post(activate).content.decode()  # asks first
    assert list(ModelSet.objects.filter(is_active=True)) == [other]
    response = curator_client.post(activate, {"confirmed": "yes"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("classifiers:model-set", args=[trained.pk])
    assert "tiny set is now the active model set." in response.content.decode()
    assert list(ModelSet.objects.filter(is_active=True)) == [trained]
    assert ModelSet.objects.active() == trained
    compare = curator_client.get(reverse("training:compare")).content.decode()
    assert f'action="{reverse("classifiers:activate", args=[other.pk])}"' in compare and f'action="{activate}"' not in compare


def test_start_form_queues_a_job_on_the_training_cluster(pbc_dataset, curator_client, django_capture_on_commit_callbacks):
    from django.conf import settings
    from django_q.models import OrmQ

    bad = curator_client.post(reverse("training:start"), {"dataset": pbc_dataset.pk, "name": "f", "architecture": "nonet",
                                                           "mode": "scratch", "epochs": 1, "image_size": 32,
                                                           "batch_size": 8, "device": "cpu"})
    assert b"not a timm model name" in bad.content
    with django_capture_on_commit_callbacks(execute=True):
        response = curator_client.post(reverse("training:start"), {
            "dataset": pbc_dataset.pk, "name": "from form", "architecture": "mobilenetv3_small_050", "mode": "scratch",
            "epochs": 1, "image_size": 32, "batch_size": 8, "device": "cpu", "nodes": ["NEU"]})
    job = TrainingJob.objects.get(name="from form")
    assert response.status_code == 302 and response["Location"] == reverse("training:job", args=[job.pk])
    assert job.params["nodes"] == ["NEU"] and job.status == "queued"
    assert OrmQ.objects.filter(key=settings.HEMOWEB_TRAINING_CLUSTER).count() == 1
    page = curator_client.get(reverse("training:job", args=[job.pk]), HTTP_HX_REQUEST="true",
                              HTTP_HX_TARGET="job-progress")
    assert b"every 1s" in page.content  # queued: the bar keeps polling


def test_api_lists_jobs_for_lab_staff_and_lets_curators_start_one(pbc_dataset, curator_client, lab_only,
                                                                   django_capture_on_commit_callbacks):
    url = "/api/training-jobs/"
    assert lab_only.post(url, {"dataset": "Demo PBC", "name": "api"}, content_type="application/json").status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        created = curator_client.post(url, {"dataset": "Demo PBC", "name": "api", **TINY}, content_type="application/json")
    assert created.status_code == 201 and created.json()["status"] == "queued"
    refused = curator_client.post(url, {"dataset": "Demo PBC", "name": "api2", "architecture": "nonet"},
                                  content_type="application/json")
    assert refused.status_code == 400 and "not a timm model name" in refused.json()["detail"]
    listed = lab_only.get(url).json()
    assert [job["name"] for job in listed["results"]] == ["api"]


def test_a_shared_backbone_job_from_the_api_registers_a_set_that_classifies_and_explains(
        pbc_dataset, curator_client, lab_only, django_capture_on_commit_callbacks, finished_job):
    from apps.explain.services import _load

    created = curator_client.post("/api/training-jobs/", {"dataset": "Demo PBC", "name": "shared set",
                                                          "shared_backbone": True, **TINY},
                                  content_type="application/json")
    assert created.status_code == 201 and created.json()["params"]["shared_backbone"] is True
    job = services.run_training_job(created.json()["id"])
    assert job.status == TrainingJob.Status.SUCCEEDED, job.error
    model_set = job.result
    assert not model_set.is_active and ModelSet.objects.active() == finished_job.result  # not asked to activate
    assert model_set.card["backbone"] == "backbone.safetensors" and (model_set.path / "backbone.safetensors").is_file()
    assert {"n", "accuracy", "coarse8"} <= set(model_set.metrics)  # the whole tree ran on the test cells
    assert "shared" in job.metrics["history"]
    # each node is still a registered model of its own, and explanations rebuild it as a whole network
    root = model_set.node_models.get(node__code="ROOT")
    net, card = _load(root)
    assert card.backbone and net.get_classifier().out_features == len(card.classes)
    compare = lab_only.get(reverse("training:compare")).content.decode()
    assert "scratch, shared backbone" in compare and compare.count("mobilenetv3_small_050") == 2
    page = lab_only.get(reverse("classifiers:model-set", args=[model_set.pk])).content.decode()
    assert "one shared backbone with a head per node" in page
    # the second look the job chose on the validation cells, with what each choice scored there
    chosen = model_set.metrics["second_look_choice"]
    assert model_set.card["second_look"] == chosen["views"]
    assert "Second look: " in page and "chosen on validation cells" in page
    assert all(f"{accuracy:.3f}" in page for accuracy in chosen["val_accuracy"].values())


def test_train_tree_fine_tunes_a_trained_sets_backbone_given_by_a_path_here(pbc_dataset, settings, monkeypatch):
    call_command("train_tree", "--dataset", "Demo PBC", "--arch", "mobilenetv3_small_050", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--min-images", "3", "--name", "first",
                 "--shared-backbone", "--nodes", "ROOT")
    backbone = services.set_folder_for("first") / "backbone.safetensors"
    monkeypatch.chdir(settings.MODELS_DIR.parent)
    relative = backbone.relative_to(settings.MODELS_DIR.parent)  # "models/first/...": from here, not under models/
    call_command("train_tree", "--dataset", "Demo PBC", "--arch", "mobilenetv3_small_050", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--min-images", "3", "--name", "tuned",
                 "--shared-backbone", "--nodes", "ROOT", "--mode", "pretrained", "--pretrained-file", str(relative))
    job = TrainingJob.objects.get(name="tuned")
    assert job.status == TrainingJob.Status.SUCCEEDED, job.error
    assert job.params["pretrained_file"] == str(backbone.resolve())


def test_choose_second_look_stores_the_choice_and_evaluate_tree_can_override_it(finished_job, pbc_dataset, tmp_path):
    from hemoweb.ml.weights import read_set, write_set

    model_set = finished_job.result
    card = read_set(model_set.path)  # as a set trained before trainings chose a second look
    card.second_look = 0
    card.metrics.pop("second_look_choice", None)
    write_set(model_set.path, card)
    call_command("choose_second_look", "--dataset", pbc_dataset.name, "--models", "tiny set")
    stored = read_set(model_set.path)
    scores = stored.metrics["second_look_choice"]["val_accuracy"]
    assert stored.metrics["second_look_choice"]["chosen_on"] == f"val split of {pbc_dataset.name}"
    assert scores[str(stored.second_look)] == max(scores.values())
    model_set.refresh_from_db()
    assert model_set.card["second_look"] == stored.second_look  # the registry shows what the folder holds
    assert model_set.metrics["second_look_choice"] == stored.metrics["second_look_choice"]
    out = tmp_path / "none.json"
    call_command("evaluate_tree", "--dataset", pbc_dataset.name, "--models", "tiny set", "--second-look", "0",
                 "--json", str(out))
    assert json.loads(out.read_text())["second_look"] == 0
    with pytest.raises(CommandError, match="0 to 8 views"):
        call_command("evaluate_tree", "--dataset", pbc_dataset.name, "--models", "tiny set", "--second-look", "9")
    with pytest.raises(CommandError, match="no val cells"):
        call_command("choose_second_look", "--dataset", Dataset.objects.create(name="empty").name)
