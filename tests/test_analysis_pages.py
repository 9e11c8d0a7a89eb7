"""Classification pages with the Django client: upload, progress, verify (htmx), sign off, export, report."""

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from tests.review_helpers import SMALL_RUN, review_flagged, sign_off_small_run
from tests.test_analysis_services import demo_zip, upload

HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def run(tiny_model_set, lab_user):
    return services.start_run(owner=lab_user, files=[upload(demo_zip(1))])


def test_the_classify_page_offers_the_active_set_and_is_in_the_navigation(lab_client, tiny_model_set):
    response = lab_client.get(reverse("analysis:home"))
    html = response.content.decode()
    assert response.status_code == 200
    assert re.search(r'<option value="%d" selected>tiny</option>' % tiny_model_set.pk, html)
    assert 'href="/analysis/"' in html and "Classification" in html


def test_uploading_a_zip_classifies_it_and_shows_counts_table_and_gallery(lab_client, tiny_model_set):
    response = lab_client.post(reverse("analysis:home"), {
        "files": SimpleUploadedFile("smear-17.zip", demo_zip(1)), "model_set": tiny_model_set.pk, "count_target": 200,
        "name": "smear 17"})
    run = ClassificationRun.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("analysis:run", args=[run.pk])
    assert run.status == "succeeded" and run.count_target == 200 and run.name == "smear 17"
    page = lab_client.get(response["Location"]).content.decode()
    assert "Differential count" in page and "M:E ratio" in page and "of target 200" in page
    assert page.count("data-cell ") == 8
    assert 'src="/static/js/analysis.js"' in page and "<script>" not in page
    table = lab_client.get(response["Location"] + "?view=table").content.decode()
    assert table.count("<tr><td><img") == 8 and "ROOT" not in table.split("cells-table")[0][-5:]


def test_bad_uploads_get_a_clear_message_on_the_page(lab_client, tree):
    response = lab_client.post(reverse("analysis:home"), {"files": SimpleUploadedFile("a.zip", demo_zip(1))})
    assert response.status_code == 400 and "No model set is active" in response.content.decode()
    assert ClassificationRun.objects.count() == 0


def test_a_large_upload_shows_a_progress_bar_that_polls(lab_client, tiny_model_set, settings, lab_user):
    settings.HEMOWEB_CLASSIFY_SYNC_MAX = 2
    lab_client.post(reverse("analysis:home"), {"files": SimpleUploadedFile("a.zip", demo_zip(1))})
    run = ClassificationRun.objects.get()
    assert run.status == "queued"
    progress = lab_client.get(reverse("analysis:progress", args=[run.pk]), **HX)
    assert 'hx-trigger="every 1s"' in progress.content.decode() and "HX-Refresh" not in progress
    services.classify_run(run.pk)
    done = lab_client.get(reverse("analysis:progress", args=[run.pk]), **HX)
    assert done["HX-Refresh"] == "true" and 'aria-valuenow="100"' in done.content.decode()


def test_a_correction_through_htmx_updates_the_cell_and_the_counts_at_once(lab_client, run):
    cell = run.cells.exclude(final_type__code="MON").first()
    response = lab_client.post(reverse("analysis:correct", args=[run.pk, cell.pk]), {"code": "MON", "version": 0}, **HX)
    html = response.content.decode()
    assert response.status_code == 200
    assert f'id="cell-{cell.pk}"' in html and f"was {cell.predicted_type.code}" in html
    assert 'id="counts" class="card" hx-swap-oob="true"' in html
    assert re.search(r'data-code="MON"><td><code>MON</code>[^<]*</td><td>\d+', html)
    assert "7 of 8 cells unchanged" in html


def test_a_stale_correction_is_refused_in_the_cell_with_who_changed_it(lab_client, curator, run):
    cell = run.cells.first()
    services.correct_cell(cell_id=cell.pk, code="LYT", user=curator, expected_version=0)
    response = lab_client.post(reverse("analysis:correct", args=[run.pk, cell.pk]), {"code": "EOS", "version": 0}, **HX)
    html = response.content.decode()
    assert "cura changed this cell to LYT" in html and 'role="alert"' in html
    cell.refresh_from_db()
    assert cell.final_type.code == "LYT"


def test_sign_off_locks_the_page_and_a_second_sign_off_says_so(lab_client, lab_user, run):
    url = reverse("analysis:sign-off", args=[run.pk])
    review_flagged(run, lab_user)
    page = lab_client.post(url, {"confirm": "yes", "reason": SMALL_RUN}, follow=True).content.decode()
    assert "signed off and locked" in page and "<select" not in page
    again = lab_client.post(url, {"confirm": "yes"}, follow=True).content.decode()
    assert "already signed off by tech" in again
    cell = run.cells.first()
    refused = lab_client.post(reverse("analysis:correct", args=[run.pk, cell.pk]), {"code": "EOS"}, **HX)
    assert "locked" in refused.content.decode()


def test_send_corrected_cells_to_a_dataset_in_one_action(lab_client, lab_user, run):
    cell = run.cells.exclude(final_type__code="EOS").first()
    services.correct_cell(cell_id=cell.pk, code="EOS", user=lab_user)
    sign_off_small_run(run, lab_user)
    page = lab_client.post(reverse("analysis:send", args=[run.pk]), {"dataset": "Lab corrections"}, follow=True)
    assert "1 corrected cells added to the dataset Lab corrections" in page.content.decode()


def test_csv_export_and_printable_report(lab_client, lab_user, run):
    csv_response = lab_client.get(reverse("analysis:export", args=[run.pk]))
    assert csv_response["Content-Type"].startswith("text/csv")
    assert csv_response.content.decode().count("\n") == 9
    sign_off_small_run(run, lab_user)
    report = lab_client.get(reverse("analysis:report", args=[run.pk])).content.decode()
    assert "signed off by <strong>tech</strong>" in report and "tiny" in report and "95 % CI" in report


def test_runs_of_others_are_hidden_from_lab_staff_but_not_from_curators(client, run, curator, outsider):
    from django.contrib.auth.models import Group, User

    from apps.accounts.roles import LAB_STAFF

    other = User.objects.create_user("other", password="pw-other")
    other.groups.add(Group.objects.get(name=LAB_STAFF))
    client.force_login(other)
    assert client.get(reverse("analysis:run", args=[run.pk])).status_code == 404
    assert client.get(reverse("analysis:export", args=[run.pk])).status_code == 404
    client.force_login(curator)
    assert client.get(reverse("analysis:run", args=[run.pk])).status_code == 200
    client.force_login(outsider)
    assert client.get(reverse("analysis:home")).status_code in (302, 403)
