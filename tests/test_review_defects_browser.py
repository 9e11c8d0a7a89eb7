"""Issue 20, part 7, in a real chromium: the defects that show in the page."""

import json

import pytest

from apps.analysis import services
from apps.analysis.models import ClassificationRun, ClassifiedCell
from apps.detection.services import register_detector

from .conftest import login, screenshot
from .test_analysis_services import demo_images, demo_zip
from .test_analysis_services import upload as services_upload
from .test_detection_ml import SHIPPED

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_cell_stopped_at_root_takes_the_erythroid_key_and_the_erythroid_choice(page, live_server, lab_user,
                                                                                  tiny_model_set, tmp_path):
    tiny_model_set.node_models.filter(node__code="ROOT").update(threshold=1.01)  # every cell stops at ROOT
    archive = tmp_path / "root.zip"
    archive.write_bytes(demo_zip(1))
    login(page, live_server, lab_user.username)
    page.goto(live_server.url + "/analysis/")
    page.set_input_files("#id_files", str(archive))
    page.click("button:has-text('Classify')")
    page.wait_for_selector("[data-cell]")
    first, second = page.locator("[data-cell]").nth(0), page.locator("[data-cell]").nth(1)
    first_id, second_id = first.get_attribute("id"), second.get_attribute("id")
    assert first.get_attribute("data-code") == "ROOT"
    select = page.locator(f"#{first_id} select[name=code]")
    assert select.evaluate("s => s.options[s.selectedIndex].text") == "ROOT, unresolved: choose a type"
    keys = json.loads(page.get_attribute("#keymap", "data-keys"))
    ery_key = {code: key for key, code in keys.items()}["ERY"]
    first.focus()
    page.keyboard.press(ery_key)  # was silently ignored: the list already "showed" ERY
    page.wait_for_selector(f"#{first_id}[data-code='ERY']")
    assert ClassifiedCell.objects.get(pk=int(first_id.split("-")[1])).final_type.code == "ERY"
    page.select_option(f"#{second_id} select[name=code]", "ERY")  # choosing it in the list works too
    page.wait_for_selector(f"#{second_id}[data-code='ERY']")
    assert ClassifiedCell.objects.get(pk=int(second_id.split("-")[1])).final_type.code == "ERY"
    screenshot(page, "review-root-unresolved")


def test_an_upload_with_no_usable_image_shows_why_at_once(page, live_server, lab_user, tiny_model_set, tmp_path):
    cut = tmp_path / "field 1.jpg"
    cut.write_bytes(demo_images(1)[0].read_bytes()[:3000])
    login(page, live_server, lab_user.username)
    page.goto(live_server.url + "/analysis/")
    page.set_input_files("#id_files", str(cut))
    page.click("button:has-text('Classify')")
    page.wait_for_selector("#run-status")
    assert page.inner_text("#run-status") == "No usable images"
    assert page.locator("[aria-label='Classification progress']").count() == 0  # no full bar
    reason = page.locator("#skipped li").first
    assert reason.is_visible() and reason.inner_text().startswith("field_1.jpg: the image is damaged")
    assert "00000_" not in page.content()
    assert page.get_by_role("button", name="Sign off and lock").count() in (0, 1)
    if page.get_by_role("button", name="Sign off and lock").count():
        assert page.get_by_role("button", name="Sign off and lock").is_disabled()
    screenshot(page, "review-no-usable-images")


def test_forty_files_show_the_run_page_at_once_and_it_fills_in_when_classified(page, live_server, lab_user,
                                                                             tiny_model_set, tmp_path):
    archive = tmp_path / "forty.zip"
    archive.write_bytes(demo_zip(5))
    login(page, live_server, lab_user.username)
    page.goto(live_server.url + "/analysis/")
    page.set_input_files("#id_files", str(archive))
    page.click("button:has-text('Classify')")
    page.wait_for_selector("#progress >> text=0 of 40 files")  # the page does not wait for the classification
    assert page.inner_text("#run-status") == "Queued"
    run = ClassificationRun.objects.get()
    assert run.status == "queued"
    services.classify_run(run.pk)  # what the short-jobs worker runs; the page keeps polling meanwhile
    page.wait_for_selector("text=Differential count")
    assert page.locator("[data-cell]").count() == 40
    screenshot(page, "review-forty-files")


@pytest.mark.parametrize("debug", [False, True])
def test_a_bad_file_on_the_detection_page_is_explained_inside_the_page(page, live_server, lab_user, tmp_path,
                                                                        settings, debug):
    settings.DEBUG = debug
    register_detector(SHIPPED, name="BCCD default", activate=True)
    notes, empty = tmp_path / "notes.jpg", tmp_path / "empty.jpg"
    notes.write_bytes(b"these are notes, not a smear")
    empty.write_bytes(b"")
    login(page, live_server, lab_user.username)
    page.goto(live_server.url + "/detection/")
    for upload, message in ((notes, "This file cannot be analysed: not an image"),
                            (empty, "The file is empty (0 bytes)")):
        page.set_input_files("#id_image", str(upload))
        page.click("#detect-form button[type=submit]")
        error = page.locator("#result #detect-error", has_text=message)
        error.wait_for()  # the answer replaced the result area, nothing else
        assert page.locator("#result #detect-error").count() == 1 and error.inner_text().startswith(message)
        assert page.locator("h1").inner_text() == "Detection" and page.locator("#detect-form").is_visible()
        colour = error.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour not in ("rgba(0, 0, 0, 0)", "transparent")  # styled by the page's CSS
    screenshot(page, f"review-detection-bad-file-debug-{int(debug)}")


def test_the_printed_report_shows_the_labs_header_and_the_flagged_cells_images(page, live_server, lab_user,
                                                                              tiny_model_set, settings):
    settings.HEMOWEB_REPORT_HEADER = ["City Hospital · Haematology laboratory", "1 Main Street, Springfield"]
    tiny_model_set.node_models.filter(node__code="MYE").update(threshold=1.01)  # myeloid cells stop: flagged
    run = services.start_run(owner=lab_user, files=[services_upload(demo_zip(1))])
    ClassificationRun.objects.filter(pk=run.pk).update(comment="Few cells on the smear.")
    login(page, live_server, lab_user.username)
    page.goto(f"{live_server.url}/analysis/runs/{run.pk}/report/")
    assert page.inner_text("#report-header .lab-name") == "City Hospital · Haematology laboratory"
    images = page.locator("#report-cells img")
    assert images.count() == run.cells.exclude(flags=[]).count() > 0
    page.wait_for_function("() => [...document.querySelectorAll('#report-cells img')].every(i => i.complete)")
    assert images.evaluate_all("imgs => imgs.every(i => i.naturalWidth > 0)")  # the cells' images really load
    assert page.inner_text("#report-comment .comment") == "Few cells on the smear."
    page.emulate_media(media="print")
    assert page.locator("#report-cells img").first.is_visible()
    screenshot(page, "review-report")
