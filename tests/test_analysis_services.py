"""Classification runs end to end on the tiny real model set and the real demo images."""

import csv
import io
import zipfile
from pathlib import Path

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from apps.analysis import services
from apps.analysis.models import ClassificationRun, ClassifiedCell, Correction
from apps.analysis.services import AnalysisError, ConflictError
from apps.cells.models import Cell
from apps.classifiers.models import ModelSet
from hemoweb.ml.infer import TreeClassifier, TreePrediction
from hemoweb.ml.tree import CellTree
from hemoweb.ml.weights import read_set
from tests.review_helpers import sign_off_small_run

DEMO_PBC = Path(__file__).resolve().parent.parent / "demo" / "pbc"


def demo_images(per_folder: int = 2) -> list[Path]:
    """The first images of each demo folder (real PBC cells)."""
    found = []
    for folder in sorted(path for path in DEMO_PBC.iterdir() if path.is_dir()):
        found += sorted(folder.glob("*.jpg"))[:per_folder]
    return found


def demo_zip(per_folder: int = 2, extra: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for path in demo_images(per_folder):
            archive.write(path, f"{path.parent.name}/{path.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upload(data: bytes, name: str = "sample.zip") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/zip")


@pytest.fixture
def finished_run(tiny_model_set, lab_user):
    return services.start_run(owner=lab_user, files=[upload(demo_zip(1))])


# --- the ML core: paths, thresholds, flags --------------------------------------------------------


def _images(folder: str, n: int = 3) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted((DEMO_PBC / folder).glob("*.jpg"))[:n]]


def test_tree_inference_follows_the_tree_with_a_probability_per_step(tiny_set_folder):
    classifier = TreeClassifier(tiny_set_folder, CellTree.default())
    erythroblasts = classifier.classify(_images("erythroblast"), batch_size=2)
    for prediction in erythroblasts:
        assert prediction.code == "EBO"  # ROOT says ERY; all ERY data is EBO, so ERY resolves to EBO
        assert [step.node for step in prediction.path] == ["ROOT"]
        assert prediction.resolved and not prediction.flags
    neutrophils = classifier.classify(_images("neutrophil"), batch_size=2)
    for prediction in neutrophils:
        assert [step.node for step in prediction.path] == ["ROOT", "MYE", "MYM", "NEU"][: len(prediction.path)]
        assert len(prediction.path) >= 3
        assert all(0.0 < step.probability <= 1.0 for step in prediction.path)
        assert 0.0 < prediction.confidence <= min(step.probability for step in prediction.path)


def test_a_cell_below_the_node_threshold_stops_there_unresolved_and_flagged(tiny_set_folder):
    eosinophils = _images("eosinophil")
    sure = TreeClassifier(tiny_set_folder, CellTree.default(), thresholds=dict.fromkeys(read_set(tiny_set_folder).nodes, 0.0))
    forced = sure.classify(eosinophils, batch_size=8)
    unsure_at_mye = TreeClassifier(tiny_set_folder, CellTree.default(), thresholds={"MYE": 1.01})
    for prediction, whole in zip(unsure_at_mye.classify(eosinophils, batch_size=8), forced, strict=True):
        assert prediction.code == "MYE"
        assert not prediction.resolved
        assert any(flag.startswith("unsure at MYE") for flag in prediction.flags)
        assert [step.node for step in prediction.path] == ["ROOT", "MYE"]  # the path stops where the cell did
        # the best guess is where the cell would have gone without the threshold
        assert prediction.guess == whole.code == whole.guess and whole.resolved
        assert prediction.guess != "MYE" and "MYE" in CellTree.default().path(prediction.guess)
    unsure_at_root = TreeClassifier(tiny_set_folder, CellTree.default(), thresholds={"ROOT": 1.01})
    prediction = unsure_at_root.classify(_images("lymphocyte", 1))[0]
    assert prediction.code == "ROOT" and not prediction.resolved and len(prediction.path) == 1


def test_blasts_and_the_abnormal_branch_are_always_flagged():
    classifier = TreeClassifier.__new__(TreeClassifier)
    classifier.tree, classifier.node_files = CellTree.default(), {}
    for code, flagged in (("BLA", True), ("KSC", True), ("NGS", False)):
        prediction = TreePrediction(code=code)
        classifier._finish(prediction)
        assert prediction.flagged is flagged, code


# --- runs ------------------------------------------------------------------------------------------


def test_a_zip_is_classified_into_one_row_per_cell_with_the_model_set_recorded(tiny_model_set, lab_user):
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(3))], count_target=200)
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    assert run.n_total == run.n_done == 24 and run.progress == 1.0
    cells = ClassifiedCell.objects.filter(run=run).select_related("predicted_type")
    assert cells.count() == 24
    ebo = [cell for cell in cells if cell.original_name.startswith("erythroblast/")]
    assert {cell.predicted_type.code for cell in ebo} == {"EBO"}
    assert all(cell.final_type_id == cell.predicted_type_id for cell in cells)
    assert all(cell.model_set_id == tiny_model_set.pk and cell.model_set_name == "tiny" for cell in cells)
    assert all(cell.path and cell.path[0]["node"] == "ROOT" for cell in cells)
    assert run.model_set_name == "tiny" and run.model_set_version
    assert not run.upload  # the stored upload is removed when done
    counts = services.run_differential(run)
    assert counts.total == 24 and counts.target == 200
    assert counts.counted == 18 and counts.nrbc == 3  # platelets listed, erythroblasts per 100 WBC: not counted


def test_image_files_can_be_uploaded_without_a_zip(tiny_model_set, lab_user):
    files = [SimpleUploadedFile(path.name, path.read_bytes(), "image/jpeg") for path in demo_images(1)[:4]]
    run = services.start_run(owner=lab_user, files=files)
    assert run.status == ClassificationRun.Status.SUCCEEDED
    assert run.cells.count() == 4 and run.name == "4 images"


def test_deleting_the_model_set_keeps_the_results(finished_run, tiny_model_set):
    n = finished_run.cells.count()
    tiny_model_set.delete()
    finished_run.refresh_from_db()
    assert finished_run.model_set is None and finished_run.model_set_name == "tiny"
    assert finished_run.cells.count() == n
    assert set(finished_run.cells.values_list("model_set_name", flat=True)) == {"tiny"}


def test_a_large_upload_becomes_a_background_job_with_progress(tiny_model_set, lab_user, settings):
    from django_q.models import OrmQ

    from apps.analysis.tasks import classify_run_task

    settings.HEMOWEB_CLASSIFY_SYNC_MAX = 5
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    assert run.status == ClassificationRun.Status.QUEUED and run.progress == 0.0
    assert OrmQ.objects.count() == 1  # queued for the worker
    assert "run" in classify_run_task(run.pk)  # what the worker runs
    run.refresh_from_db()
    assert run.status == ClassificationRun.Status.SUCCEEDED and run.cells.count() == 8


def test_a_failure_midway_marks_the_run_failed_and_keeps_the_cells_done(tiny_model_set, lab_user, monkeypatch):
    data = bytearray(demo_zip(4, compression=zipfile.ZIP_STORED))
    names = sorted(zipfile.ZipFile(io.BytesIO(bytes(data))).namelist())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo(names[20])
    # damage the 21st image's bytes inside the archive: its CRC no longer matches
    start = info.header_offset + 30 + len(info.filename.encode()) + 500
    data[start:start + 20] = b"\x00" * 20
    monkeypatch.setattr(services, "CHUNK", 8)
    run = services.start_run(owner=lab_user, files=[upload(bytes(data))])
    assert run.status == ClassificationRun.Status.FAILED
    assert "damaged" in run.error and names[20] in run.error
    assert run.cells.count() == 16  # the two chunks before the damaged entry
    assert run.n_done == 16


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_decode", ["off", "on"])
def test_non_images_and_truncated_files_are_skipped_with_a_reason(tiny_model_set, lab_user, settings, batch_decode):
    settings.HEMOWEB_BATCH_DECODE = batch_decode  # "on": the GPU path (torchvision batch decoding) run on the CPU
    jpeg = (DEMO_PBC / "basophil").glob("*.jpg").__next__().read_bytes()
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1, extra={
        "notes.txt": b"patient list", "fake.jpg": b"MZ\x90\x00 not a picture", "cut.jpg": jpeg[: len(jpeg) // 2],
    }))])
    assert run.status == ClassificationRun.Status.SUCCEEDED
    assert run.cells.count() == 8
    reasons = dict(run.skipped)
    assert set(reasons) == {"notes.txt", "fake.jpg", "cut.jpg"}
    assert "not an image" in reasons["fake.jpg"] and "truncated" in reasons["cut.jpg"]


@pytest.mark.parametrize("name, data, message", [
    ("../../etc/evil.jpg", b"x", "outside the archive"),
    ("bomb.jpg", b"\x00" * (3 * 1024 * 1024), "zip bomb"),
])
def test_a_dangerous_zip_is_refused_and_nothing_is_stored(tiny_model_set, lab_user, name, data, message, settings):
    with pytest.raises(AnalysisError, match=message):
        services.start_run(owner=lab_user, files=[upload(demo_zip(1, extra={name: data}))])
    assert ClassificationRun.objects.count() == 0
    uploads = Path(settings.MEDIA_ROOT) / "analysis" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_a_file_that_is_not_a_zip_is_refused(tiny_model_set, lab_user):
    with pytest.raises(AnalysisError, match="readable .zip"):
        services.start_run(owner=lab_user, files=[upload(b"PK\x03\x04 broken")])


def test_an_upload_over_the_size_limit_is_refused(tiny_model_set, lab_user, settings):
    settings.HEMOWEB_UPLOAD_MAX_BYTES = 10_000
    with pytest.raises(AnalysisError, match="at most 0 MB|MB are accepted"):
        services.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    assert ClassificationRun.objects.count() == 0


def test_without_an_active_model_set_the_run_is_refused(tree, lab_user):
    with pytest.raises(AnalysisError, match="No model set is active"):
        services.start_run(owner=lab_user, files=[upload(demo_zip(1))])


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_weights_file_is_refused_with_a_clear_message(tiny_model_set, lab_user, damage):
    weights = tiny_model_set.path / "MYE.safetensors"
    if damage == "corrupt":
        weights.write_bytes(b"\x00garbage" * 100)
    else:
        weights.unlink()
    with pytest.raises(AnalysisError, match=f"cannot be used.*{damage}"):
        services.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    assert ModelSet.objects.get(pk=tiny_model_set.pk).status == ModelSet.Status.BROKEN
    assert ClassificationRun.objects.count() == 0


# --- verification ----------------------------------------------------------------------------------


def test_a_correction_keeps_the_prediction_and_records_who_and_when(finished_run, lab_user, tree):
    cell = finished_run.cells.exclude(predicted_type__code="MON").first()
    predicted = cell.predicted_type
    services.correct_cell(cell_id=cell.pk, code="MON", user=lab_user, expected_version=0)
    cell.refresh_from_db()
    assert cell.final_type.code == "MON" and cell.predicted_type == predicted
    assert cell.corrected_by == lab_user and cell.corrected_at is not None and cell.version == 1
    correction = Correction.objects.get(cell=cell)
    assert (correction.from_type, correction.to_type.code, correction.user) == (predicted, "MON", lab_user)
    summary = services.run_summary(finished_run)
    assert summary.total == 8 and summary.unchanged == 7 and summary.agreement == pytest.approx(7 / 8)


def test_two_technologists_correcting_one_cell_the_second_is_told_and_nothing_is_lost(finished_run, lab_user,
                                                                                      curator):
    cell = finished_run.cells.first()
    seen_by_both = cell.version
    services.correct_cell(cell_id=cell.pk, code="LYT", user=lab_user, expected_version=seen_by_both)
    with pytest.raises(ConflictError, match="tech changed this cell to LYT"):
        services.correct_cell(cell_id=cell.pk, code="MON", user=curator, expected_version=seen_by_both)
    cell.refresh_from_db()
    assert cell.final_type.code == "LYT" and cell.corrected_by == lab_user
    # having seen the new state, the second technologist may still change it, and both stay recorded
    services.correct_cell(cell_id=cell.pk, code="MON", user=curator, expected_version=cell.version)
    assert list(Correction.objects.filter(cell=cell).values_list("to_type__code", "user__username")) == [
        ("LYT", "tech"), ("MON", "cura")]


def test_sign_off_locks_the_run_and_a_second_sign_off_is_refused(finished_run, lab_user, curator):
    sign_off_small_run(finished_run, lab_user)
    finished_run.refresh_from_db()
    assert finished_run.locked and finished_run.signed_off_by == lab_user
    with pytest.raises(AnalysisError, match="already signed off by tech"):
        services.sign_off(run_id=finished_run.pk, user=curator)
    finished_run.refresh_from_db()
    assert finished_run.signed_off_by == lab_user
    cell = finished_run.cells.first()
    with pytest.raises(AnalysisError, match="locked"):
        services.correct_cell(cell_id=cell.pk, code="MON", user=lab_user)


def test_corrected_cells_go_to_a_dataset_once(finished_run, lab_user):
    cell = finished_run.cells.exclude(predicted_type__code="BAS").first()
    services.correct_cell(cell_id=cell.pk, code="BAS", user=lab_user)
    with pytest.raises(AnalysisError, match="Sign the run off first"):
        services.send_corrections_to_dataset(run_id=finished_run.pk)
    sign_off_small_run(finished_run, lab_user)
    report = services.send_corrections_to_dataset(run_id=finished_run.pk)
    assert report.imported == 1
    added = Cell.objects.get(dataset__name="Verified corrections")
    assert added.cell_type.code == "BAS" and added.sha256 == cell.sha256
    again = services.send_corrections_to_dataset(run_id=finished_run.pk)
    assert again.imported == 0 and again.duplicates == 1


# --- export ----------------------------------------------------------------------------------------


def test_csv_export_has_the_path_confidences_final_type_and_flags(tiny_model_set, lab_user, monkeypatch):
    jpeg = next((DEMO_PBC / "monocyte").glob("*.jpg")).read_bytes()
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1, extra={"=HYPERLINK(1).jpg": jpeg}))])
    cell = run.cells.get(original_name="basophil/" + demo_images(1)[0].name)
    services.correct_cell(cell_id=cell.pk, code="EOS", user=lab_user)
    out = io.StringIO()
    assert services.write_csv(run, out) == 9
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == services.CSV_COLUMNS
    by_file = {row["file"]: row for row in rows}
    row = by_file["basophil/" + demo_images(1)[0].name]
    assert row["final"] == "EOS" and row["changed"] == "yes" and row["corrected_by"] == "tech"
    assert row["path"].startswith("MYE ") and row["model_set"] == "tiny"
    assert all(r["best_guess"] == r["predicted"] for r in rows if r["resolved"] == "yes")
    assert "'=HYPERLINK(1).jpg" in by_file  # no formula reaches a spreadsheet


def test_an_image_over_the_pixel_limit_is_skipped_before_decoding(tiny_model_set, lab_user, settings):
    big = io.BytesIO()
    Image.new("RGB", (400, 400), "white").save(big, "PNG")
    settings.HEMOWEB_MAX_IMAGE_PIXELS = 150_000  # the 360×363 demo cells fit, 400×400 does not
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1, extra={"huge.png": big.getvalue()}))])
    assert run.cells.count() == 8
    assert "over the limit" in dict(run.skipped)["huge.png"]


def test_cells_resized_at_decode_give_the_same_predictions_as_pil_images(tiny_set_folder):
    from hemoweb.ml.preprocess import resize_uint8

    classifier = TreeClassifier(tiny_set_folder, CellTree.default())
    images = _images("monocyte", 4) + _images("ig", 4)
    from_pil = classifier.classify(images, batch_size=3)
    from_tensors = classifier.classify([resize_uint8(image, 32) for image in images], batch_size=3)
    assert [p.as_dict() for p in from_pil] == [p.as_dict() for p in from_tensors]
    with pytest.raises(ValueError, match="pre-resized"):
        classifier.classify([resize_uint8(images[0], 48)])


def test_batch_decoding_on_the_device_classifies_like_pil_decoding(tiny_model_set, lab_user, settings):
    """The GPU path (JPEGs decoded together by torchvision, resized as tensors), run here on the CPU."""
    settings.HEMOWEB_BATCH_DECODE = "off"
    pil = services.start_run(owner=lab_user, files=[upload(demo_zip(3))])
    settings.HEMOWEB_BATCH_DECODE = "on"
    batched = services.start_run(owner=lab_user, files=[upload(demo_zip(3))])
    assert pil.status == batched.status == ClassificationRun.Status.SUCCEEDED
    rows = [list(run.cells.order_by("index").values_list("original_name", "predicted_type__code", "width", "height"))
            for run in (pil, batched)]
    assert rows[0] == rows[1] and len(rows[0]) == 24
    confidences = [list(run.cells.order_by("index").values_list("confidence", flat=True)) for run in (pil, batched)]
    assert max(abs(a - b) for a, b in zip(*confidences, strict=True)) < 0.1  # resampling differs by < 1 grey level


def test_batch_decoder_checks_every_file_like_the_cpu_decoder():
    from hemoweb.ml.preprocess import decode_resized_batch, resize_uint8
    from hemoweb.ml.sources import BadImage, decode_checked

    jpegs = [path.read_bytes() for path in demo_images(1)[:3]]
    png = io.BytesIO()
    Image.open(demo_images(1)[0]).save(png, "PNG")
    results = decode_resized_batch([jpegs[0], b"not an image", jpegs[1][:4000], png.getvalue(), jpegs[2]], 32,
                                   max_pixels=10_000_000)
    assert [type(r).__name__ for r in results] == ["tuple", "BadImage", "BadImage", "tuple", "tuple"]
    assert "truncated" in str(results[2])
    tensor, fmt, width, height = results[0]
    assert (tuple(tensor.shape), tensor.dtype, fmt, (width, height)) == ((3, 32, 32), torch.uint8, "JPEG", (360, 363))
    reference = resize_uint8(decode_checked(jpegs[0])[0], 32)
    assert (tensor.float() - reference.float()).abs().mean() < 1.0
    assert results[3][1] == "PNG" and results[3][0].shape == (3, 32, 32)
    assert isinstance(decode_resized_batch([jpegs[0]], 32, max_pixels=1000)[0], BadImage)  # pixel limit first


def test_a_cell_the_set_looks_at_twice_records_its_views_in_the_row_the_csv_and_the_api(tiny_model_set, lab_user,
                                                                                        lab_client):
    from hemoweb.ml.weights import write_set

    card = read_set(tiny_model_set.path)
    card.second_look = 4
    write_set(tiny_model_set.path, card)
    # unsure at MYE for every myeloid cell; the others stay sure
    tiny_model_set.node_models.filter(node__code="MYE").update(threshold=1.01)
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(2))])
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    looked = [cell for cell in run.cells.all() if any(flag.startswith("unsure at MYE") for flag in cell.flags)]
    sure = [cell for cell in run.cells.all() if cell.resolved]
    assert looked and sure
    assert {cell.views for cell in looked} == {4} and {cell.views for cell in sure} == {1}
    assert all(flag.endswith("(4 views)") for cell in looked for flag in cell.flags if flag.startswith("unsure"))
    out = io.StringIO()
    services.write_csv(run, out)
    views = {row["file"]: row["views"] for row in csv.DictReader(io.StringIO(out.getvalue()))}
    assert {views[cell.original_name] for cell in looked} == {"4"}
    response = lab_client.get(f"/api/classified-cells/{looked[0].pk}/")
    assert response.status_code == 200 and response.json()["views"] == 4
    assert "second look, 4 views" in lab_client.get(f"/analysis/runs/{run.pk}/?view=table").content.decode()
