"""Start a tiny training from the page and watch its progress bar finish (Playwright + chromium)."""

import pytest

from apps.training import services
from apps.training.models import TrainingJob

from .conftest import fill_tiny_training, login, screenshot


@pytest.mark.browser
def test_start_a_training_and_watch_the_progress_bar_finish(page, live_server, curator, pbc_dataset):
    login(page, live_server, "cura")
    page.goto(live_server.url + "/training/")
    screenshot(page, "training-home")
    page.click("text=Start a training")
    fill_tiny_training(page, "Demo PBC", "browser set")
    screenshot(page, "training-form")
    page.click("button:has-text('Start training')")
    page.wait_for_selector("[data-status=queued]")
    screenshot(page, "training-queued")
    job = TrainingJob.objects.get(name="browser set")
    assert job.params["nodes"] == ["ROOT", "NEU"] and job.params["image_size"] == 32
    # The training worker's function, run here while the page keeps polling its progress partial.
    services.run_training_job(job.pk)
    page.wait_for_selector("[data-status=succeeded]", timeout=30_000)
    assert page.inner_text("#job-percent") == "100"
    assert page.locator("#job-progress svg polyline").count() >= 4  # train + val curves for ROOT and NEU
    screenshot(page, "training-finished")
    page.goto(live_server.url + f"/training/jobs/{job.pk}/")
    assert page.locator("table.confusion").count() == 2
    assert page.locator("#job-progress .tag.ok", has_text="active").count() == 1  # the first set becomes active
    page.goto(live_server.url + "/training/compare/")
    assert page.locator("text=mobilenetv3_small_050").count() >= 1
    screenshot(page, "training-compare")
