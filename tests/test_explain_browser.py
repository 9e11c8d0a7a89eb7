"""A real browser: from the demo gallery, explain a cell and see the pictures appear."""

import pytest

from tests.conftest import login, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_explain_a_demo_cell_from_the_gallery(page, live_server, lab_user, pbc_dataset, tiny_model_set):
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/datasets/{pbc_dataset.pk}/")
    page.locator("a[aria-label^='Explain cell']").first.click()
    page.wait_for_selector("#explain-form")
    page.select_option("#id_method", "ig")
    page.click("#explain-form button[type=submit]")
    figure = page.locator("#result img[alt^='Original, attribution and overlay']")
    figure.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#result img'); return i && i.complete && i.naturalWidth > 700; }"
    )
    assert "Explained class" in page.inner_text("#result")
    screenshot(page, "explain-result")
