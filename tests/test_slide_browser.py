"""A technologist in a real browser: upload a slide's fields, see the fields with their boxes, open a cell's field."""

import pytest

from apps.analysis.models import ClassificationRun
from apps.detection.services import register_detector
from tests.conftest import DEMO, login, screenshot
from tests.test_detection_ml import SHIPPED

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
FIELDS = DEMO / "bccd" / "BCCD" / "JPEGImages"


def test_upload_a_slide_see_its_fields_with_boxes_and_open_a_cell_on_its_field(page, live_server, lab_user,
                                                                                 tiny_model_set):
    register_detector(SHIPPED, name="BCCD default", activate=True)
    login(page, live_server, "tech")
    page.click("nav >> text=Classification")
    page.click("#slide-fields >> text=Analyse a slide")
    page.wait_for_selector("[data-slide-form]")
    page.set_input_files("#id_slide_files", [str(FIELDS / name) for name in ("BloodImage_00000.jpg",
                                                                             "BloodImage_00001.jpg")])
    page.fill("#id_accession", "B-42")
    page.click("button:has-text('Analyse slide')")
    page.wait_for_selector("#field-list")
    run = ClassificationRun.objects.get()
    assert run.kind == "slide" and run.accession == "B-42" and run.status == "succeeded"
    assert page.locator("#field-list > li").count() == 2
    white = page.locator("#field-list rect.kind-white")
    assert white.count() == run.cells.count() >= 2 and page.locator("#field-list rect.kind-red").count() > 10
    assert page.locator("#field-list svg").first.bounding_box()["width"] > 100  # drawn over the field image
    assert "× 10⁹/L" in page.inner_text("#platelet-estimate")
    screenshot(page, "slide-run")

    # a cell of the gallery shows its crop and opens its field with its box highlighted
    cell = page.locator("[data-cell]").first
    cell.scroll_into_view_if_needed()
    image = cell.locator("img")
    for _ in range(100):  # lazy: loaded once in view (polled from here: the page's CSP forbids eval)
        if image.evaluate("img => img.complete && img.naturalWidth") > 0:
            break
        page.wait_for_timeout(100)
    assert image.evaluate("img => img.naturalWidth") > 0
    cell_id = int(cell.get_attribute("id").split("-")[1])
    page.goto(live_server.url + cell.locator("a.field-link").get_attribute("href"))
    page.wait_for_selector("#selected-cell")
    assert page.locator("rect.selected").count() == 1
    assert page.get_attribute("rect.selected", "x") == f"{run.cells.get(pk=cell_id).box[0]:.1f}"
    screenshot(page, "slide-field")

    # a white box on the field opens that cell
    other = page.locator("a[data-cell-box]").last
    other_id = other.get_attribute("data-cell-box")
    other.click()
    page.wait_for_url(f"**?cell={other_id}")
    page.wait_for_selector("#selected-cell")
