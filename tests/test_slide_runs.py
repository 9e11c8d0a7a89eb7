"""Slide runs: the fields of one slide → the shipped detector → white cells classified by the tiny set as one run."""

import io
import os
import time
import zipfile

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from PIL import Image

from apps.analysis import services, slides
from apps.analysis.models import ClassificationRun
from apps.detection.services import register_detector
from hemoweb.ml import detect as ml
from tests.shared_db import SharedDatabase

from .conftest import DEMO
from .test_detection_ml import SHIPPED, _png_header_only

FIELDS = DEMO / "bccd" / "BCCD" / "JPEGImages"
ANNOTATIONS = DEMO / "bccd" / "BCCD" / "Annotations"


@pytest.fixture
def detector(db):
    return register_detector(SHIPPED, name="BCCD default", activate=True)


def _field(name: str) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, (FIELDS / name).read_bytes(), content_type="image/jpeg")


def _perturbed(name: str, seed: int) -> bytes:
    """The field with a few pixels changed: another sha256, the same cells."""
    image = Image.open(FIELDS / name).convert("RGB")
    image.putpixel((seed % image.width, 0), (seed % 256, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _annotated_white(name: str) -> list[list[float]]:
    result = ml.read_voc(DEMO / "bccd" / "BCCD")
    image = next(item for item in result.images if item.name.endswith(name))
    return [[b.x1, b.y1, b.x2, b.y2] for b in image.boxes if b.label == "WBC"]


def test_a_few_fields_become_one_run_whose_cells_know_their_field_and_box(tiny_model_set, detector, lab_user):
    names = ["BloodImage_00000.jpg", "BloodImage_00001.jpg", "BloodImage_00002.jpg"]
    run = slides.start_slide_run(owner=lab_user, files=[_field(name) for name in names], identity={"accession": "A-17"},
                                 run_async=False)
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    assert run.kind == ClassificationRun.Kind.SLIDE and run.detector == detector
    assert run.detector_name == "BCCD default" and run.accession == "A-17" and run.n_done == run.n_total == 3
    fields = list(run.fields.order_by("index"))
    assert [f.original_name for f in fields] == names and all(f.image and f.width == 640 for f in fields)
    cells = list(run.cells.select_related("field").order_by("index"))
    assert len(cells) == sum(f.n_white for f in fields) >= 3
    for field in fields:
        white = [box for box in field.boxes if box["kind"] == "white"]
        assert field.n_white == len(white) and field.n_red == sum(box["kind"] == "red" for box in field.boxes)
        assert field.n_red > 5 and field.error == ""
        assert {box["cell"] for box in white} == {cell.pk for cell in cells if cell.field_id == field.pk}
        for box in white:  # each white box is a cell on this field with that box, near an annotated white cell
            cell = next(cell for cell in cells if cell.pk == box["cell"])
            assert cell.box == box["box"] and cell.field == field
            assert max(slides.box_iou(cell.box, truth) for truth in _annotated_white(field.original_name)) >= 0.5
    assert all(default_storage.exists(cell.image.name) for cell in cells)
    summary = slides.slide_summary(run)
    assert summary["usable"] == 3 and summary["white"] == len(cells)
    estimate = summary["platelet_estimate"]
    assert estimate["mean_per_field"] == round(sum(f.n_platelets for f in fields) / 3, 2)
    assert estimate["estimate_per_l"] is not None and "at the measured scale" in estimate["assumes"]
    assert run.scale["run"]["source"] == "red cells" and 10 < run.scale["run"]["px_per_um"] < 15  # BCCD: ~12
    # the run works like any other: counts, CSV with the field and box of each cell
    assert services.run_differential(run).total == len(cells)
    out = io.StringIO()
    assert services.write_csv(run, out) == len(cells)


def test_bad_fields_each_say_why_and_nothing_else_is_lost(tiny_model_set, detector, lab_user):
    blank = io.BytesIO()
    Image.new("RGB", (640, 480), (236, 226, 230)).save(blank, format="PNG")
    tiny = io.BytesIO()
    Image.open(FIELDS / "BloodImage_00003.jpg").convert("RGB").resize((160, 120)).save(tiny, format="JPEG")
    files = [
        _field("BloodImage_00000.jpg"),
        SimpleUploadedFile("again.jpg", (FIELDS / "BloodImage_00000.jpg").read_bytes()),  # the same field again
        SimpleUploadedFile("notes.jpg", b"this is not an image"),
        SimpleUploadedFile("empty.png", blank.getvalue()),
        SimpleUploadedFile("small.jpg", tiny.getvalue()),
        SimpleUploadedFile("huge.png", _png_header_only(20_000, 20_000)),  # 400 megapixels if it were decoded
        _field("BloodImage_00001.jpg"),
    ]
    run = slides.start_slide_run(owner=lab_user, files=files, run_async=False)
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    by_name = {f.original_name: f for f in run.fields.all()}
    assert len(by_name) == 7 and run.n_done == 7
    assert "the same image as field 1 (BloodImage_00000.jpg)" in by_name["again.jpg"].error
    assert not by_name["again.jpg"].image and by_name["again.jpg"].n_white == 0
    assert "not an image" in by_name["notes.jpg"].error
    assert "no cells were found" in by_name["empty.png"].error and by_name["empty.png"].boxes == []
    assert "160×120 pixels, the slide's fields 640×480" in by_name["small.jpg"].error
    assert "pixels, over the limit" in by_name["huge.png"].error
    skipped = dict(run.skipped)
    assert set(skipped) == {"again.jpg", "notes.jpg", "empty.png", "small.jpg", "huge.png"}
    good = [by_name["BloodImage_00000.jpg"], by_name["BloodImage_00001.jpg"]]
    assert all(not f.error and f.n_white >= 1 for f in good)
    assert run.cells.count() == sum(f.n_white for f in good)
    assert slides.slide_summary(run)["usable"] == 2


def test_a_field_seen_twice_through_offsets_counts_its_white_cell_once(tiny_model_set, detector, lab_user):
    """Two fields of a fields.csv that overlap: the white cell on both is one cell of the run."""
    whole = Image.open(FIELDS / "BloodImage_00000.jpg").convert("RGB")
    left, right = io.BytesIO(), io.BytesIO()
    whole.crop((0, 0, 480, 480)).save(left, format="PNG")
    whole.crop((160, 0, 640, 480)).save(right, format="PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("left.png", left.getvalue())
        handle.writestr("right.png", right.getvalue())
        handle.writestr("fields.csv", "name,x,y\nleft.png,0,0\nright.png,160,0\n")
    alone = slides.start_slide_run(owner=lab_user, files=[_field("BloodImage_00000.jpg")], run_async=False)
    run = slides.start_slide_run(owner=lab_user, files=[SimpleUploadedFile("slide.zip", archive.getvalue())],
                                 run_async=False)
    assert run.status == ClassificationRun.Status.SUCCEEDED and run.n_total == 2, run.error
    first, second = run.fields.order_by("index")
    duplicates = [box for box in second.boxes if box["duplicate_of"]]
    assert duplicates and all(box["cell"] is None for box in duplicates)
    assert {box["duplicate_of"] for box in duplicates} <= {box["cell"] for box in first.boxes if box["cell"]}
    assert run.cells.count() == alone.cells.count()  # each white cell of the slide once


def test_a_slide_run_needs_fields_a_detector_and_a_known_specimen(tiny_model_set, lab_user, db):
    with pytest.raises(services.AnalysisError, match="No detector is active"):
        slides.start_slide_run(owner=lab_user, files=[_field("BloodImage_00000.jpg")], run_async=False)
    register_detector(SHIPPED, name="BCCD default", activate=True)
    with pytest.raises(services.AnalysisError, match="Choose the slide's fields"):
        slides.start_slide_run(owner=lab_user, files=[], run_async=False)
    with pytest.raises(services.AnalysisError, match="specimen type must be one of"):
        slides.start_slide_run(owner=lab_user, files=[_field("BloodImage_00000.jpg")],
                               identity={"specimen_type": "urine"})
    with pytest.raises(services.AnalysisError, match="No detector with the id or name 'nope'"):
        slides.start_slide_run(owner=lab_user, files=[_field("BloodImage_00000.jpg")], detector="nope")
    assert not ClassificationRun.objects.exists() and not default_storage.exists("analysis/uploads")


def test_platelet_estimate_scales_camera_fields_to_an_eyepiece_field():
    plain = slides.platelet_estimate([2, 4], None)
    assert plain["mean_per_field"] == 3 and plain["estimate_per_l"] == 60 and "not scaled" in plain["assumes"]
    quarter = slides.platelet_estimate([2, 4], slides.EYEPIECE_FIELD_MM2 / 4)
    assert quarter["estimate_per_l"] == 240 and slides.platelet_estimate([], None)["estimate_per_l"] is None


def test_the_slide_page_starts_a_run_whose_page_lists_fields_and_opens_a_cell_on_its_field(
        tiny_model_set, detector, lab_client):
    page = lab_client.get(reverse("analysis:slide-upload"))
    assert page.status_code == 200 and b"data-slide-form" in page.content
    response = lab_client.post(reverse("analysis:slide-upload"), {
        "files": [_field("BloodImage_00000.jpg"), _field("BloodImage_00001.jpg")], "model_set": tiny_model_set.pk,
        "count_target": 100, "accession": "S-1", "specimen_type": "bone-marrow"})
    run = ClassificationRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("analysis:run", args=[run.pk])
    assert run.accession == "S-1" and run.specimen_type == "bone-marrow" and run.kind == "slide"
    html = lab_client.get(reverse("analysis:run", args=[run.pk])).content.decode()
    cell = run.cells.select_related("field").first()
    assert 'id="field-list"' in html and html.count('class="box kind-white') == run.cells.count()
    assert f'href="{reverse("analysis:cell-field", args=[run.pk, cell.pk])}"' in html  # the gallery's link
    assert "× 10⁹/L" in html and "An estimate from the smear" in html
    report = lab_client.get(reverse("analysis:report", args=[run.pk])).content.decode()
    slide_row = report.split('id="report-slide"')[1].split("</td>")[0]  # the printed report carries the slide too
    assert "2 fields (2 usable)" in slide_row and "per field" in slide_row and "not a count" in slide_row
    opened = lab_client.get(reverse("analysis:cell-field", args=[run.pk, cell.pk]))
    assert opened["Location"] == reverse("analysis:field", args=[run.pk, cell.field.index]) + f"?cell={cell.pk}"
    field_page = lab_client.get(opened["Location"]).content.decode()
    assert "selected" in field_page and cell.field.image.url in field_page and 'id="selected-cell"' in field_page
    # a bad upload says why and starts nothing
    refused = lab_client.post(reverse("analysis:slide-upload"), {"files": [], "count_target": 100,
                                                                  "specimen_type": "peripheral-blood"})
    assert refused.status_code == 400 and b"Choose the slide&#x27;s fields" in refused.content
    assert ClassificationRun.objects.count() == 1


def test_the_api_takes_a_slide_and_gives_its_fields_with_counts(tiny_model_set, detector, lab_user):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(lab_user)
    created = api.post("/api/classification-runs/slides/", {
        "files": [_field("BloodImage_00002.jpg"), SimpleUploadedFile("bad.jpg", b"no")],
        "accession": "API-3", "detector": "BCCD default"}, format="multipart")
    assert created.status_code == 201, created.content
    body = api.get(f"/api/classification-runs/{created.json()['id']}/").json()
    assert body["kind"] == "slide" and body["accession"] == "API-3" and body["detector"] == "BCCD default"
    assert [f["name"] for f in body["fields"]] == ["BloodImage_00002.jpg", "bad.jpg"]
    good, bad = body["fields"]
    assert good["n_white"] == len(body["cells"]) and good["n_red"] > 5 and "not an image" in bad["error"]
    assert body["slide"]["usable"] == 1 and body["slide"]["platelet_estimate"]["fields"] == 1
    refused = api.post("/api/classification-runs/slides/", {"files": [_field("BloodImage_00002.jpg")],
                                                             "detector": "missing"}, format="multipart")
    assert refused.status_code == 400 and "No detector" in refused.json()["detail"]


def _slide_zip(n_fields: int) -> bytes:
    names = sorted(path.name for path in FIELDS.glob("*.jpg"))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        for number in range(n_fields):
            handle.writestr(f"field_{number:03d}.jpg", _perturbed(names[number % len(names)], number))
    return archive.getvalue()


def _row(database: SharedDatabase, run_id: int) -> tuple[str, int, int]:
    return database.row('SELECT status, n_done, n_total FROM "ClassificationRuns" WHERE id = ?', (run_id,),
                        lambda: ClassificationRun.objects.values_list("status", "n_done", "n_total").get(pk=run_id))


@pytest.mark.slow
def test_slides_run_as_django_q2_jobs_and_a_killed_worker_fails_the_run_keeping_its_cells(
        transactional_db, tiny_model_set, detector, lab_user, lab_client, tmp_path):
    small = slides.start_slide_run(owner=lab_user, files=[SimpleUploadedFile("small.zip", _slide_zip(3))],
                                   run_async=True)
    large = slides.start_slide_run(owner=lab_user, files=[SimpleUploadedFile("large.zip", _slide_zip(64))])
    assert small.status == large.status == ClassificationRun.Status.QUEUED and large.n_total == 64  # > SYNC_MAX
    database = SharedDatabase(tmp_path, Q_WORKERS="1", SLIDE_FIELD_CHUNK="4", VAR_DIR=str(tmp_path / "var"))
    database.push()
    log_path = tmp_path / "qcluster.log"
    (status, done, total), cluster_pid = database.qcluster_killed_midway(log_path, lambda: _row(database, large.pk),
                                                                         timeout=120)
    assert status == "running" and 0 < done < total, (status, done, total, log_path.read_text()[-3000:])
    database.pull()

    small.refresh_from_db()  # the first slide finished in the worker, as one run with its fields
    assert small.status == "succeeded" and small.n_done == 3 and small.fields.count() == 3, small.error
    assert small.cells.count() == sum(small.fields.values_list("n_white", flat=True)) > 0
    assert small.worker_pid not in (None, os.getpid(), cluster_pid)

    large.refresh_from_db()
    n_done = large.n_done
    assert large.status == "running" and n_done % 4 == 0
    deadline = time.monotonic() + 10  # the orphaned worker may need a moment to be reaped
    while time.monotonic() < deadline and services.check_worker(large).status == "running":
        time.sleep(0.2)
    response = lab_client.get(reverse("analysis:progress", args=[large.pk]), HTTP_HX_REQUEST="true")
    large.refresh_from_db()
    assert response["HX-Refresh"] == "true" and large.status == "failed"
    assert f"after {n_done} of 64" in large.error and "killed" in large.error and "kept" in large.error
    fields = list(large.fields.order_by("index"))  # whole groups only: every field done, with its cells
    assert [f.index for f in fields] == list(range(n_done))
    assert large.cells.count() == sum(f.n_white for f in fields) > 0
    assert all(cell.field_id and cell.box for cell in large.cells.all())
    assert all(default_storage.exists(cell.image.name) for cell in large.cells.all())
    stored = set(default_storage.listdir(f"analysis/{large.pk}/fields")[1])  # no field of the unfinished group left
    assert stored == {os.path.basename(f.image.name) for f in fields if f.image}
    assert large.upload == ""


def test_a_dim_field_at_a_lower_magnification_is_detected_as_the_detector_saw_its_training_fields():
    """hemoweb.ml.fields: white balanced to the training background, resampled to the training scale."""
    import numpy as np

    from hemoweb.ml.fields import detect_field, standardised

    model = ml.cached_detector(SHIPPED)
    assert model.card.reference["px_per_um"] == 11.2
    field = Image.open(FIELDS / "BloodImage_00000.jpg").convert("RGB")
    same, factor = standardised(field, model.card.reference, 11.5)
    assert same is field and factor == 1.0  # a field like the training ones is detected as it is
    small = field.resize((352, 264), Image.Resampling.BILINEAR)  # 0.55×: a lower magnification
    dim = Image.fromarray((np.asarray(small, dtype=np.float32) * 0.25).astype(np.uint8))  # a dim camera
    standard, factor = standardised(dim, model.card.reference, 11.2 * 0.55)
    assert abs(factor - 1 / 0.55) < 0.01 and standard.width == round(352 / 0.55)
    assert np.asarray(standard).mean() > 3 * np.asarray(dim).mean()
    found = detect_field(model, dim, 11.2 * 0.55)
    truth = [[v * 0.55 for v in box] for box in _annotated_white("BloodImage_00000.jpg")]
    white = [[b.x1, b.y1, b.x2, b.y2] for b in found.boxes if b.label == "WBC"]
    assert (found.width, found.height) == (352, 264) and white
    assert max(slides.box_iou(box, truth[0]) for box in white) >= 0.5
    as_it_is = ml.detect(model, dim).counts(model.card.classes)["RBC"]  # the dim field unchanged: red cells missed
    assert found.counts(model.card.classes)["RBC"] >= max(10, 3 * as_it_is)


def test_slide_standardise_detects_a_dim_low_magnification_slide_as_the_detector_saw_its_training_fields(
        tiny_model_set, detector, lab_user, settings):
    import numpy as np

    def dim_small(name: str) -> SimpleUploadedFile:
        small = Image.open(FIELDS / name).convert("RGB").resize((352, 264), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        Image.fromarray((np.asarray(small, dtype=np.float32) * 0.25).astype(np.uint8)).save(buffer, format="PNG")
        return SimpleUploadedFile(name.replace(".jpg", ".png"), buffer.getvalue())

    names = ["BloodImage_00000.jpg", "BloodImage_00001.jpg"]
    as_they_are = slides.start_slide_run(owner=lab_user, files=[dim_small(n) for n in names], run_async=False)
    settings.HEMOWEB_SLIDE_STANDARDISE = True
    standardised = slides.start_slide_run(owner=lab_user, files=[dim_small(n) for n in names], run_async=False)
    red = [sum(run.fields.values_list("n_red", flat=True)) for run in (as_they_are, standardised)]
    assert red[1] >= max(20, 3 * red[0]), red
    assert all(max(box["box"][2] for box in f.boxes) <= 352 for f in standardised.fields.all())  # field pixels
