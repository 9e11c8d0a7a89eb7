"""A curator in a real browser: start a verification study at a site, watch it finish, open the printable report."""

import pytest

from apps.sites import services
from apps.sites.models import VerificationStudy
from tests.conftest import login, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_start_a_study_watch_it_finish_and_open_its_report(page, live_server, curator, tiny_model_set, pbc_dataset,
                                                           monkeypatch):
    monkeypatch.setattr(services, "_enqueue", lambda study_id: None)  # the test runs it, as a worker would
    login(page, live_server, "cura")
    page.click("nav >> text=Sites")
    page.click("table >> a:has-text('Main lab')")
    page.wait_for_selector("#routine-warning >> text=tiny has no verification study at Main lab")
    page.select_option("#start-study select[name=dataset]", label="Demo PBC")
    page.click("button:has-text('Start verification study')")
    page.wait_for_selector("#study-progress >> text=Queued")
    study = VerificationStudy.objects.get()
    services.run_study(study.pk)
    page.wait_for_selector("#confusion")  # the progress partial polled and brought the results
    assert page.locator("#per-type tbody tr").count() == 13
    assert page.locator("#confusion tbody tr").count() == 13
    screenshot(page, "sites-study")
    page.click("text=Printable report")
    page.wait_for_selector("button[data-print]")
    assert page.locator("#study-facts >> text=FAILED").count() == 1
    page.goto(live_server.url + f"/sites/{study.site_id}/")
    page.wait_for_selector("#quality-control svg circle")
    screenshot(page, "sites-site")
