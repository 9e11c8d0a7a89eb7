"""A real browser logs in, opens the tree and a dataset gallery."""

import pytest

from tests.conftest import login, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_login_tree_and_gallery_in_chromium(page, live_server, lab_user, pbc_dataset):
    login(page, live_server, "tech")
    screenshot(page, "start-page")
    page.click("nav >> text=Cell tree")
    page.wait_for_selector("text=Segmented neutrophil")
    screenshot(page, "tree")
    page.goto(live_server.url + "/datasets/")
    page.click("text=Demo PBC")
    page.wait_for_selector("img[alt^='EBO cell']")
    page.select_option("#type-filter", "EOS")
    page.wait_for_function("() => !document.querySelector(\"img[alt^='EBO cell']\")")
    assert page.locator("img[alt^='EOS cell']").count() == 10
    # The first thumbnails are in view: they must have really loaded from the media URL.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#gallery img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)"
    )
    screenshot(page, "gallery")
