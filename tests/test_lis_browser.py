"""A technologist in a real browser: the specimen on the upload form and the run page, then the LIS download."""

import pytest

from apps.analysis.models import ClassificationRun
from tests.conftest import login, screenshot
from tests.review_helpers import sign_off_small_run
from tests.test_analysis_services import demo_zip
from tests.test_lis_messages import parsed

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_specimen_from_the_upload_form_to_the_hl7_download(page, live_server, lab_user, tiny_model_set, tmp_path):
    archive = tmp_path / "smear.zip"
    archive.write_bytes(demo_zip(1))
    login(page, live_server, "tech")
    page.goto(live_server.url + "/analysis/")
    page.set_input_files("#id_files", str(archive))
    page.fill("#id_accession", "H-26-0042")
    page.fill("#id_patient_identifier", "PAT-9")
    page.fill("#id_collected_at", "2026-11-30T08:45")
    page.click("button:has-text('Classify')")
    page.wait_for_selector("text=Differential count")
    run = ClassificationRun.objects.get()
    assert run.accession == "H-26-0042" and "PAT-9" not in page.url
    assert page.locator("#lis-export").inner_text().strip().endswith("available once the run is signed off")

    page.fill("#specimen #id_accession", "H-26-0043")  # corrected before sign-off
    page.click("#specimen button:has-text('Save specimen')")
    page.wait_for_selector("text=Specimen saved.")
    run.refresh_from_db()
    assert run.accession == "H-26-0043"

    sign_off_small_run(run, lab_user)
    page.reload()
    assert "the specimen identity is locked" in page.locator("#specimen").inner_text()
    with page.expect_download() as info:
        page.click("#lis-export >> text=HL7 v2")
    download = info.value
    assert download.suggested_filename == f"run-{run.pk}.hl7"
    text = open(download.path(), "rb").read().decode()
    assert parsed(text) and "|H-26-0043^HEMOWEB|" in text and "|PAT-9^" in text
    screenshot(page, "lis-export")
