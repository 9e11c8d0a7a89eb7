"""A real browser: each explanation shows its deletion and insertion figures; the page's timings are measured ones."""

import re

import pytest

from tests.conftest import login, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_explanations_show_faithfulness_figures_and_measured_timings(page, live_server, lab_user, pbc_dataset,
                                                                      tiny_model_set, settings):
    settings.HEMOWEB_EXPLAIN_INLINE_SECONDS = 60  # in the request even on a loaded machine
    cell = pbc_dataset.cells.order_by("id").first()
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/explain/?cell={cell.pk}")
    lead = page.inner_text("#explain-timings")
    assert "about a second" not in lead and "(expected)" in lead and "one timed pass through the model" in lead
    figures = {}
    for method in ("gradcam", "ig"):
        page.select_option("#id_method", method)
        page.click("#explain-form button[type=submit]")
        panel = page.locator("#result .faithfulness")
        panel.wait_for()
        page.wait_for_function(f"() => document.querySelector('#result h2').innerText.includes("
                               f"'{'Grad-CAM' if method == 'gradcam' else 'Integrated Gradients'}')")
        text = panel.inner_text()
        assert "Deletion" in text and "lower is better" in text and "Insertion" in text and "higher is better" in text
        assert "How to read it" in text
        deletion = float(panel.locator(".deletion-auc").inner_text())
        insertion = float(panel.locator(".insertion-auc").inner_text())
        assert 0 <= deletion <= 1 and 0 <= insertion <= 1
        assert panel.locator("svg polyline.deletion").get_attribute("points").count(",") == 11
        figures[method] = (deletion, insertion)
        # the curves sit beside the picture, not in place of it
        assert page.locator("#result .explain-result img[alt^='Original, attribution and overlay']").is_visible()
    screenshot(page, "explain-faithfulness")
    page.goto(f"{live_server.url}/explain/?cell={cell.pk}")
    lead = page.inner_text("#explain-timings")
    assert re.search(r"Grad-CAM \d+\.\d s \(median of the last 1\)", lead), lead
    assert re.search(r"Integrated Gradients \d+\.\d s \(median of the last 1\)", lead), lead
    assert "Occlusion" in lead and "expected" in lead
