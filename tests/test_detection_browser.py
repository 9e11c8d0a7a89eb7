"""One real browser run of the detection page: upload a smear, see boxes and white cells, hide a class."""

import pytest

from apps.detection.services import register_detector

from .conftest import DEMO, login, screenshot
from .test_detection_ml import SHIPPED


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_upload_a_smear_and_toggle_a_class(page, live_server, lab_user, tiny_model_set):
    register_detector(SHIPPED, name="BCCD default", activate=True)
    login(page, live_server, lab_user.username)
    page.goto(live_server.url + "/detection/")
    page.set_input_files("#id_image", str(DEMO / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00007.jpg"))
    page.click("#detect-form button[type=submit]")
    page.wait_for_selector(".detection-canvas rect[data-class='WBC']", state="attached")
    assert page.locator("[data-count='WBC']").inner_text() == "1"
    assert page.locator("#wbc-gallery .wbc-code").count() == 1
    rbc = page.locator(".detection-canvas rect[data-class='RBC']")
    assert rbc.count() >= 5 and rbc.first.is_visible()
    screenshot(page, "detection-result")
    page.uncheck("input[data-toggle-class='RBC']")
    assert not rbc.first.is_visible()
    assert page.locator(".detection-canvas rect[data-class='WBC']").first.is_visible()
    screenshot(page, "detection-rbc-hidden")
