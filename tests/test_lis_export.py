"""Specimen identity (upload form, API, command, run page, report) and the LIS export (command, API, download)."""

import io
import json
import logging
from datetime import datetime, timezone as dt_timezone

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse
from fhir.resources.R4B.bundle import Bundle

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from apps.analysis.specimen import search_runs
from tests.review_helpers import sign_off_small_run
from tests.test_analysis_api import token_client
from tests.test_analysis_services import demo_zip
from tests.test_lis_messages import parsed

PATIENT = "PATIENT-SECRET-77"


@pytest.fixture
def run(lab_user, tiny_model_set):
    return services.start_run(owner=lab_user, files=[SimpleUploadedFile("s.zip", demo_zip(1))],
                              identity={"accession": "ACC-100", "patient_identifier": PATIENT,
                                        "collected_at": datetime(2026, 11, 30, 8, 0, tzinfo=dt_timezone.utc)})


def test_export_run_writes_a_valid_hl7_message_and_fhir_bundle(run, lab_user, tmp_path):
    sign_off_small_run(run, lab_user)
    out = io.StringIO()
    call_command("export_run", str(run.pk), "--format", "hl7", "--out", str(tmp_path / "r.hl7"), stdout=out)
    assert "ORU^R01" in out.getvalue()
    text = (tmp_path / "r.hl7").read_bytes().decode("utf-8")  # read_text would turn CR into LF
    assert "\n" not in text and parsed(text)
    call_command("export_run", str(run.pk), "--format", "fhir", "--out", str(tmp_path / "r.json"), stdout=out)
    bundle = Bundle.model_validate(json.loads((tmp_path / "r.json").read_text(encoding="utf-8")))
    assert bundle.entry[0].resource.__resource_type__ == "DiagnosticReport"


def test_export_run_refuses_a_run_not_signed_off_and_writes_nothing(run, tmp_path):
    target = tmp_path / "r.hl7"
    with pytest.raises(CommandError, match="not signed off"):
        call_command("export_run", str(run.pk), "--format", "hl7", "--out", str(target))
    assert not target.exists()
    with pytest.raises(CommandError, match="no run 999"):
        call_command("export_run", "999", "--format", "fhir", "--out", str(target))
    with pytest.raises(CommandError, match="does not exist"):
        call_command("export_run", str(run.pk), "--format", "fhir", "--out", str(tmp_path / "missing" / "r.json"))


def test_api_hl7_and_fhir_answer_200_when_signed_off_409_before(run, lab_user, outsider):
    api = token_client(lab_user)
    refused = api.get(f"/api/classification-runs/{run.pk}/hl7/")
    assert refused.status_code == 409 and "not signed off" in refused.json()["detail"]
    assert api.get(f"/api/classification-runs/{run.pk}/fhir/").status_code == 409
    sign_off_small_run(run, lab_user)
    hl7 = api.get(f"/api/classification-runs/{run.pk}/hl7/")
    assert hl7.status_code == 200 and hl7["Content-Type"].startswith("application/hl7-v2")
    assert parsed(hl7.content.decode())
    plain = api.get(f"/api/classification-runs/{run.pk}/hl7/", HTTP_ACCEPT="text/plain")
    assert plain.status_code == 200 and plain.content.decode().startswith("MSH|")
    fhir = api.get(f"/api/classification-runs/{run.pk}/fhir/")
    assert fhir.status_code == 200 and fhir["Content-Type"].startswith("application/fhir+json")
    assert Bundle.model_validate(json.loads(fhir.content)).type == "collection"
    other = token_client(outsider).get(f"/api/classification-runs/{run.pk}/hl7/")
    assert other.status_code == 403


def test_a_signed_off_run_without_accession_is_refused_until_one_is_added(lab_user, lab_client, tiny_model_set):
    run = services.start_run(owner=lab_user, files=[SimpleUploadedFile("s.zip", demo_zip(1))])
    sign_off_small_run(run, lab_user)
    api = token_client(lab_user)
    refused = api.get(f"/api/classification-runs/{run.pk}/fhir/")
    assert refused.status_code == 409 and "no accession number" in refused.json()["detail"]
    page = lab_client.get(reverse("analysis:run", args=[run.pk])).content.decode()
    assert "needs the specimen's accession number" in page and "Add accession number" in page
    lab_client.post(reverse("analysis:specimen", args=[run.pk]), {"accession": "LATE-1"})
    assert api.get(f"/api/classification-runs/{run.pk}/fhir/").status_code == 200
    again = lab_client.post(reverse("analysis:specimen", args=[run.pk]), {"accession": "LATE-2"}, follow=True)
    assert "locked" in again.content.decode()
    run.refresh_from_db()
    assert run.accession == "LATE-1"


def test_api_creates_runs_with_their_specimen_and_filters_by_accession(lab_user, tiny_model_set):
    api = token_client(lab_user)
    created = api.post("/api/classification-runs/", {
        "files": [SimpleUploadedFile("s.zip", demo_zip(1))], "accession": "H-2026-0001", "patient_identifier": PATIENT,
        "specimen_type": "bone-marrow", "collected_at": "2026-11-30T08:15:00Z", "wbc_count": 7.2}, format="multipart")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["accession"] == "H-2026-0001" and body["specimen_type"] == "bone-marrow"
    assert body["patient_identifier"] == PATIENT and body["wbc_count"] == 7.2
    assert body["collected_at"].startswith("2026-11-30T08:15")
    api.post("/api/classification-runs/", {"files": [SimpleUploadedFile("s.zip", demo_zip(1))],
                                           "accession": "H-2026-0002"}, format="multipart")
    found = api.get("/api/classification-runs/?accession=0001").json()
    assert found["count"] == 1 and found["results"][0]["accession"] == "H-2026-0001"
    assert api.get("/api/classification-runs/").json()["count"] == 2
    bad = api.post("/api/classification-runs/", {"files": [SimpleUploadedFile("s.zip", demo_zip(1))],
                                                 "specimen_type": "urine", "accession": "x" * 65}, format="multipart")
    assert bad.status_code == 400 and {"specimen_type", "accession"} <= set(bad.json())
    assert ClassificationRun.objects.count() == 2


def test_the_api_changes_the_specimen_until_sign_off_then_only_adds_a_missing_accession(run, lab_user, outsider):
    api = token_client(lab_user)
    url = f"/api/classification-runs/{run.pk}/specimen/"
    changed = api.patch(url, {"specimen_type": "bone-marrow", "wbc_count": 5.5}, format="json")
    assert changed.status_code == 200 and changed.json()["specimen_type"] == "bone-marrow"
    run.refresh_from_db()
    assert (run.specimen_type, run.wbc_count, run.accession) == ("bone-marrow", 5.5, "ACC-100")  # the rest kept
    assert api.patch(url, {"collected_at": "someday"}, format="json").status_code == 400
    assert token_client(outsider).patch(url, {"accession": "X"}, format="json").status_code in (403, 404)
    sign_off_small_run(run, lab_user)
    locked = api.patch(url, {"accession": "ACC-999"}, format="json")
    assert locked.status_code == 409 and "locked" in locked.json()["detail"]
    run.refresh_from_db()
    assert run.accession == "ACC-100"


def test_search_runs_by_accession(run, lab_user):
    runs = services.runs_for(lab_user)
    assert list(search_runs(runs, accession="acc-1")) == [run]
    assert not search_runs(runs, accession="ACC-2").exists()
    assert search_runs(runs, accession="  ").count() == 1


def test_the_upload_form_takes_the_specimen_identity(lab_client, tiny_model_set):
    page = lab_client.get(reverse("analysis:home")).content.decode()
    assert 'name="accession"' in page and 'name="patient_identifier"' in page and 'name="collected_at"' in page
    response = lab_client.post(reverse("analysis:home"), {
        "files": SimpleUploadedFile("smear.zip", demo_zip(1)), "model_set": tiny_model_set.pk, "count_target": 100,
        "accession": "ACC-7", "patient_identifier": PATIENT, "specimen_type": "bone-marrow",
        "collected_at": "2026-11-30T09:10", "wbc_count": "4.5"})
    run = ClassificationRun.objects.get()
    assert response.status_code == 302 and PATIENT not in response["Location"]
    assert (run.accession, run.patient_identifier, run.specimen_type, run.wbc_count) == (
        "ACC-7", PATIENT, "bone-marrow", 4.5)
    assert run.collected_at.strftime("%Y-%m-%d %H:%M") == "2026-11-30 09:10"
    bad = lab_client.post(reverse("analysis:home"), {"files": SimpleUploadedFile("smear.zip", demo_zip(1)),
                                                    "model_set": tiny_model_set.pk, "wbc_count": "-3"})
    assert bad.status_code == 400 and ClassificationRun.objects.count() == 1


def test_the_run_page_edits_the_specimen_until_sign_off_then_offers_the_downloads(run, lab_client, lab_user):
    url = reverse("analysis:run", args=[run.pk])
    page = lab_client.get(url).content.decode()
    assert 'id="specimen"' in page and 'value="ACC-100"' in page and "available once the run is signed off" in page
    assert reverse("lis:hl7", args=[run.pk]) not in page
    saved = lab_client.post(reverse("analysis:specimen", args=[run.pk]), {
        "accession": "ACC-101", "patient_identifier": PATIENT, "specimen_type": "peripheral-blood",
        "collected_at": "2026-11-30T08:00", "wbc_count": "6"})
    assert saved.status_code == 302
    run.refresh_from_db()
    assert run.accession == "ACC-101" and run.wbc_count == 6.0
    early = lab_client.get(reverse("lis:hl7", args=[run.pk]), follow=True)
    assert "not signed off" in early.content.decode()
    sign_off_small_run(run, lab_user)
    page = lab_client.get(url).content.decode()
    assert reverse("lis:hl7", args=[run.pk]) in page and reverse("lis:fhir", args=[run.pk]) in page
    assert "the specimen identity is locked" in page
    refused = lab_client.post(reverse("analysis:specimen", args=[run.pk]), {"accession": "CHANGED"}, follow=True)
    assert "signed off" in refused.content.decode()
    run.refresh_from_db()
    assert run.accession == "ACC-101"
    download = lab_client.get(reverse("lis:hl7", args=[run.pk]))
    assert download.status_code == 200 and download["Content-Type"].startswith("application/hl7-v2")
    assert download["Content-Disposition"] == f'attachment; filename="run-{run.pk}.hl7"'
    assert "ACC-101" in download.content.decode()
    fhir = lab_client.get(reverse("lis:fhir", args=[run.pk]))
    assert fhir.status_code == 200 and json.loads(fhir.content)["resourceType"] == "Bundle"


def test_the_report_prints_the_specimen_identity(run, lab_client):
    report = lab_client.get(reverse("analysis:report", args=[run.pk])).content.decode()
    block = report.split('id="report-specimen">')[1].split("</td>")[0]
    assert "ACC-100" in block and PATIENT in block and "peripheral blood" in block and "2026-11-30" in block


def test_classify_command_records_the_specimen(tiny_model_set, tmp_path):
    archive = tmp_path / "s.zip"
    archive.write_bytes(demo_zip(1))
    call_command("classify", str(archive), csv=str(tmp_path / "o.csv"), accession="CLI-1", specimen="bone-marrow",
                 patient_id=PATIENT, collected="2026-11-29T10:00", stdout=io.StringIO())
    run = ClassificationRun.objects.get()
    assert (run.accession, run.specimen_type, run.patient_identifier) == ("CLI-1", "bone-marrow", PATIENT)
    assert run.collected_at.strftime("%Y-%m-%d %H:%M") == "2026-11-29 10:00"
    with pytest.raises(CommandError, match="collection time"):
        call_command("classify", str(archive), csv=str(tmp_path / "o.csv"), collected="yesterday")
    assert ClassificationRun.objects.count() == 1


def test_the_patient_identifier_is_never_logged_nor_in_file_names(lab_client, lab_user, tiny_model_set, caplog,
                                                                  tmp_path, settings, monkeypatch):
    caplog.set_level(logging.DEBUG)
    for logger in list(logging.root.manager.loggerDict.values()):  # a logging set-up earlier in the session may have
        if isinstance(logger, logging.Logger):                      # disabled the loggers that exist by then
            monkeypatch.setattr(logger, "disabled", False)
    lab_client.post(reverse("analysis:home"), {
        "files": SimpleUploadedFile("smear.zip", demo_zip(1)), "model_set": tiny_model_set.pk,
        "accession": "ACC-9", "patient_identifier": PATIENT})
    run = ClassificationRun.objects.get()
    sign_off_small_run(run, lab_user)
    api = token_client(lab_user)
    assert PATIENT in api.get(f"/api/classification-runs/{run.pk}/").content.decode()  # shown to who may see the run
    assert PATIENT in api.get(f"/api/classification-runs/{run.pk}/hl7/").content.decode()
    lab_client.get(reverse("lis:fhir", args=[run.pk]))
    call_command("export_run", str(run.pk), "--format", "hl7", "--out", str(tmp_path / "r.hl7"),
                 stdout=io.StringIO())
    assert "signed off" in caplog.text and PATIENT not in caplog.text  # the sign-off is logged, its patient is not
    assert not any(PATIENT in path.name for path in settings.MEDIA_ROOT.rglob("*"))
    assert PATIENT not in " ".join(run.cells.values_list("image", flat=True))
