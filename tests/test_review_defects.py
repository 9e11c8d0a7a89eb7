"""Issue 20, part 7: the defects seen in review, each shown on the real services and pages.

Cells stopped at ROOT, skipped files (their names and reasons), runs with no usable image, early progress,
bad files on the detection page, activating a model set, the comparison's n, the admin's model set page and
queued jobs nobody runs."""

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.models import OrmQ

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from apps.classifiers.models import ModelSet
from apps.sites.models import Site, VerificationStudy
from apps.training import services as training
from apps.training.models import TrainingJob
from hemoweb.ml.sources import BadImage, read_header

from .test_analysis_services import demo_images, demo_zip, upload
from .test_detection_api import detector  # noqa: F401 (the shipped detector, active)
from .test_detection_ml import _png_header_only as png_header_only


def image_files(*extra: tuple[str, bytes]) -> list[SimpleUploadedFile]:
    """Two real demo cells uploaded as separate image files (not a zip), then `extra` (name, bytes)."""
    files = [SimpleUploadedFile(path.name, path.read_bytes(), content_type="image/jpeg")
             for path in demo_images(1)[:2]]
    return files + [SimpleUploadedFile(name, data) for name, data in extra]


# --- a cell unresolved at ROOT ----------------------------------------------------------------------


@pytest.fixture
def root_run(tiny_model_set, lab_user):
    tiny_model_set.node_models.filter(node__code="ROOT").update(threshold=1.01)  # every cell stops at ROOT
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    assert run.status == "succeeded" and {cell.final_type.code for cell in run.cells.all()} == {"ROOT"}
    return run


def test_a_cell_unresolved_at_root_shows_no_type_as_chosen_in_its_list(lab_client, root_run):
    html = lab_client.get(reverse("analysis:run", args=[root_run.pk])).content.decode()
    cell = root_run.cells.order_by("index").first()
    select = re.search(rf'id="cell-{cell.pk}".*?<select name="code"[^>]*>(.*?)</select>', html, re.S).group(1)
    options = re.findall(r"<option[^>]*>[^<]*</option>", select)
    assert 'value="" selected disabled' in options[0] and "ROOT, unresolved: choose a type" in options[0]
    assert not any(" selected" in option for option in options[1:])  # ERY is no longer shown as its type
    assert any('value="ERY"' in option for option in options[1:])


# --- skipped files: names and reasons ---------------------------------------------------------------


def test_skipped_and_classified_image_files_keep_the_names_they_were_uploaded_with(tiny_model_set, lab_user):
    run = services.start_run(owner=lab_user, files=image_files(("notes.txt", b"not an image")))
    assert run.status == "succeeded", run.error
    assert [name for name, _ in run.skipped] == ["notes.txt"]
    assert sorted(cell.original_name for cell in run.cells.all()) == sorted(p.name for p in demo_images(1)[:2])


def test_a_huge_image_is_refused_with_hemowebs_limit_not_pillows(tiny_model_set, lab_user, settings):
    settings.HEMOWEB_MAX_IMAGE_PIXELS = 1_000_000
    bomb = png_header_only(20_000, 20_000)  # 400 million pixels: over Pillow's own bomb limit too
    with pytest.raises(BadImage) as refused:
        read_header(bomb, settings.HEMOWEB_MAX_IMAGE_PIXELS)
    assert "400,000,000 pixels" in str(refused.value) and "1,000,000 pixels (MAX_IMAGE_PIXELS)" in str(refused.value)
    run = services.start_run(owner=lab_user, files=image_files(("scan.png", bomb)))
    reason = dict(run.skipped)["scan.png"]
    assert "over the limit of 1,000,000 pixels (MAX_IMAGE_PIXELS)" in reason
    assert "89478485" not in reason and "178956970" not in reason and "DOS" not in reason


# --- a run in which every file was skipped ----------------------------------------------------------


def test_a_run_of_only_unusable_files_says_so_and_shows_the_reasons_open(tiny_model_set, lab_user, lab_client):
    cut = demo_images(1)[0].read_bytes()[:3000]  # a real cell image cut short
    run = services.start_run(owner=lab_user, files=[SimpleUploadedFile("scan.jpg", cut)])
    assert run.status == ClassificationRun.Status.FAILED and run.no_usable_images
    assert run.error.startswith("No usable images") and run.cells.count() == 0
    html = lab_client.get(reverse("analysis:run", args=[run.pk])).content.decode()
    progress = html[html.index('id="progress"'):html.index("</details>")]
    assert "No usable images" in progress and "Done" not in progress and "1 of 1" not in progress
    assert "0 of 1 files classified" in progress and 'aria-label="Classification progress"' not in progress
    assert '<details id="skipped" open>' in progress and "scan.jpg</code>: the image is damaged" in progress
    assert "00000_" not in html


def test_a_zip_of_only_unusable_files_is_failed_too(tiny_model_set, lab_user):
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(0, extra={"a.txt": b"x", "b.jpg": b""}))])
    assert run.status == "failed" and run.no_usable_images and "none of the 2 files is a cell image" in run.error
    assert dict(run.skipped) == {"a.txt": "not an image (the content is not a known image format)",
                                 "b.jpg": "the file is empty"}


# --- progress that moves early ----------------------------------------------------------------------


def test_chunks_start_small_and_grow_to_the_full_chunk():
    assert services.chunk_bounds(320, 256) == [(0, 16), (16, 48), (48, 112), (112, 240), (240, 320)]
    assert services.chunk_bounds(10, 256) == [(0, 10)]
    assert services.chunk_bounds(40, 8) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]  # never over `chunk`


def test_the_first_progress_is_stored_after_the_first_few_files(tiny_model_set, lab_user, monkeypatch):
    stored = []
    classify_chunk = services._classify_chunk

    def watched(run, *args, **kwargs):
        classify_chunk(run, *args, **kwargs)
        stored.append(ClassificationRun.objects.values_list("n_done", flat=True).get(pk=run.pk))

    monkeypatch.setattr(services, "_classify_chunk", watched)
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(3))])  # 24 files, under one full chunk
    assert run.status == "succeeded" and stored == [16, 24]


def test_the_page_hands_more_than_a_few_files_to_the_worker_and_shows_the_run_at_once(lab_client, tiny_model_set,
                                                                                      settings):
    settings.HEMOWEB_QUEUE_HINT_SECONDS = 0
    response = lab_client.post(reverse("analysis:home"), {"files": SimpleUploadedFile("forty.zip", demo_zip(5))})
    run = ClassificationRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("analysis:run", args=[run.pk])
    assert run.status == "queued" and run.n_total == 40 and run.cells.count() == 0
    task = OrmQ.objects.get(key=settings.Q_CLUSTER["name"])
    assert task.task["args"] == (run.pk,)
    progress = lab_client.get(reverse("analysis:progress", args=[run.pk]), HTTP_HX_REQUEST="true").content.decode()
    assert "every 1s" in progress and "0 of 40 files" in progress
    assert "no worker has taken it" in progress and "python manage.py qcluster" in progress
    OrmQ.objects.update(lock=timezone.now() + timedelta(minutes=5))  # a worker pulled it: no hint
    assert "no worker" not in lab_client.get(reverse("analysis:progress", args=[run.pk])).content.decode()
    assert services.classify_run(run.pk).status == "succeeded"  # what the worker runs
    small = lab_client.post(reverse("analysis:home"), {"files": SimpleUploadedFile("few.zip", demo_zip(1))})
    assert ClassificationRun.objects.get(pk=int(small["Location"].split("/")[-2])).status == "succeeded"


# --- detection: a bad file stays inside the page ----------------------------------------------------


def test_an_empty_file_on_the_detection_page_says_it_is_empty(lab_client, detector):
    empty = SimpleUploadedFile("field.jpg", b"")
    response = lab_client.post(reverse("detection:detect"), {"image": empty}, HTTP_HX_REQUEST="true",
                               HTTP_HX_TARGET="result")
    html = response.content.decode()
    assert response.status_code == 200 and 'id="detect-error"' in html and "empty (0 bytes)" in html
    assert "Choose a smear image" not in html.replace("choose a smear image with content", "")
    plain = lab_client.post(reverse("detection:detect"), {"image": SimpleUploadedFile("field.jpg", b"")})
    assert plain.status_code == 400 and b"<h1>Detection</h1>" in plain.content and b"empty (0 bytes)" in plain.content
    nothing = lab_client.post(reverse("detection:detect"), {}, HTTP_HX_REQUEST="true")
    assert b"Choose a smear image to upload." in nothing.content


# --- activating a model set, comparing sets -----------------------------------------------------------


def _set(name: str, accuracy: float, n: int, architecture: str = "resnet18") -> ModelSet:
    metrics = {"n": n, "accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy - 0.05,
               "coverage": 0.9, "coarse8": {"accuracy": accuracy + 0.05},
               "nodes": {"ROOT": {"n": n, "accuracy": accuracy, "macro_f1": accuracy - 0.05}}}
    return ModelSet.objects.create(name=name, folder=name, architecture=architecture, mode="scratch", metrics=metrics)


def test_make_active_asks_first_with_the_sets_figures_and_its_verification(curator_client, lab_user, tree):
    good = _set("good", 0.91, 670)
    good.activate()
    weak = _set("weak", 0.15, 13, architecture="mobilenetv3_small_050")
    site = Site.objects.default()
    study = VerificationStudy.objects.create(site=site, dataset_name="Reference cells", model_set=weak,
                                             model_set_name="weak", status="succeeded", n=40, agreement=0.2,
                                             kappa=0.1, passed=False, results={"verdicts": {"NGS": {"passed": False}}})
    url = reverse("classifiers:activate", args=[weak.pk])
    lab_client = Client()
    lab_client.force_login(lab_user)
    assert lab_client.post(url).status_code in (302, 403)
    for response in (curator_client.post(url), curator_client.get(url)):
        html = response.content.decode()
        assert response.status_code == 200 and "Make weak the active model set?" in html
        assert "<strong>15 %</strong>" in html and "13" in html and "670" in html  # this set beside the one in use
        assert "lower than that of the set in use" in html and "only 13 test cells" in html
        assert f'href="{reverse("sites:study", args=[study.pk])}"' in html and "agreement 0.200" in html
        assert "failed: NGS below the acceptance criteria" in html
    assert ModelSet.objects.active() == good  # nothing changed before the confirmation
    done = curator_client.post(url, {"confirmed": "yes"}, follow=True)
    assert "weak is now the active model set." in done.content.decode() and ModelSet.objects.active() == weak


def test_a_set_without_a_study_at_the_site_says_so_before_activation(curator_client, tree):
    fresh = _set("fresh", 0.8, 300)
    html = curator_client.get(reverse("classifiers:activate", args=[fresh.pk])).content.decode()
    assert "fresh has no verification study at" in html


def test_compare_shows_the_number_of_test_cells_of_every_figure(lab_client, tree):
    _set("small test", 0.95, 13)
    _set("large test", 0.91, 670, architecture="mobilenetv3_small_050")
    html = lab_client.get(reverse("training:compare")).content.decode()
    assert html.count("n = 13") == 2 and html.count("n = 670") == 2  # the ROOT row and the whole tree


# --- the admin's model set page -----------------------------------------------------------------------


def test_the_admin_model_set_page_is_readable_and_activation_there_asks_too(curator_client, tiny_model_set):
    tiny_model_set.node_models.filter(node__code="ROOT").update(threshold=0.8500000000000001)
    tiny_model_set.metrics = {"n": 130, "accuracy": 0.15384615384615385, "coverage": 0.9076923076923077}
    tiny_model_set.save()
    html = curator_client.get(reverse("admin:classifiers_modelset_change", args=[tiny_model_set.pk])).content.decode()
    assert "0.8500000000000001" not in html and "0.15384615384615385" not in html
    assert "130 test cells · accuracy 0.154 · coverage 0.908" in html and ">0.85<" in html
    assert '<pre class="readable-json">' in html and "&quot;accuracy&quot;: 0.1538" in html
    other = _set("other", 0.9, 500)
    response = curator_client.post(reverse("admin:classifiers_modelset_changelist"),
                                   {"action": "make_active", "_selected_action": [other.pk]})
    assert response.status_code == 302 and response["Location"] == reverse("classifiers:activate", args=[other.pk])
    assert ModelSet.objects.active() == tiny_model_set


# --- a training nobody runs ---------------------------------------------------------------------------


def test_a_training_queued_with_no_training_worker_says_which_worker_to_start(pbc_dataset, curator, curator_client,
                                                                               django_capture_on_commit_callbacks):
    tiny = {"architecture": "mobilenetv3_small_050", "epochs": 1, "image_size": 32, "batch_size": 16}
    with django_capture_on_commit_callbacks(execute=True):
        job = training.start_training(dataset=pbc_dataset, name="waiting", params=tiny, user=curator)
    page = reverse("training:job", args=[job.pk])
    assert "queue-hint" not in curator_client.get(page).content.decode()  # just queued: it may start any moment
    TrainingJob.objects.filter(pk=job.pk).update(created=timezone.now() - timedelta(minutes=3))
    OrmQ.objects.filter(key=settings.HEMOWEB_TRAINING_CLUSTER).update(lock=timezone.now() - timedelta(minutes=3))
    html = curator_client.get(page).content.decode()
    assert "Queued for 3 min and no worker has taken it" in html
    assert f"Q_CLUSTER_NAME={settings.HEMOWEB_TRAINING_CLUSTER} python manage.py qcluster" in html
    running = TrainingJob.objects.create(name="first", dataset=pbc_dataset, status="running")
    assert f"Waiting behind training #{running.pk} (first)" in curator_client.get(page).content.decode()
    running.delete()
    OrmQ.objects.update(lock=timezone.now() + timedelta(hours=1))  # the worker pulled it: it starts now
    assert "queue-hint" not in curator_client.get(page).content.decode()
