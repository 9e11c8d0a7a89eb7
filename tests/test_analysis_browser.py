"""A technologist in a real browser: classify the demo zip, correct cells with the keyboard, sign off."""

import json

import pytest

from apps.analysis.models import ClassifiedCell
from tests.conftest import login, screenshot
from tests.review_helpers import SMALL_RUN, review_flagged
from tests.test_analysis_services import demo_zip

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_classify_correct_with_the_keyboard_and_sign_off(page, live_server, lab_user, tiny_model_set, tmp_path):
    archive = tmp_path / "demo-sample.zip"
    archive.write_bytes(demo_zip(1))
    tiny_model_set.node_models.filter(node__code="MYE").update(threshold=1.01)  # myeloid cells stop unresolved
    login(page, live_server, "tech")
    page.click("nav >> text=Classification")
    page.wait_for_selector("text=New run")
    page.set_input_files("#id_files", str(archive))
    page.click("button:has-text('Classify')")
    page.wait_for_selector("text=Differential count")
    assert page.locator("[data-cell]").count() == 8
    screenshot(page, "analysis-run")

    keys = json.loads(page.get_attribute("#keymap", "data-keys"))
    key_for = {code: key for key, code in keys.items()}
    first = page.locator("[data-cell]").first
    first.focus()
    page.keyboard.press("ArrowRight")
    second_id = page.evaluate("document.activeElement.id")
    cell = ClassifiedCell.objects.get(pk=int(second_id.split("-")[1]))
    target = "MON" if cell.final_type.code != "MON" else "LYT"
    page.keyboard.press(key_for[target])
    page.wait_for_selector(f"#{second_id}[data-code='{target}']")
    page.wait_for_selector("#agreement >> text=7 of 8 cells unchanged")
    assert page.evaluate("document.activeElement.id") == second_id  # focus stays for the next key
    cell.refresh_from_db()
    assert cell.final_type.code == target and cell.corrected_by.username == "tech"
    screenshot(page, "analysis-corrected")

    # Enter accepts the best guess of a cell that stopped at MYE
    unresolved = page.locator("[data-guess]")
    assert unresolved.count() >= 3  # the demo's BAS, EOS, MON, NEU and immature granulocyte cells
    guess_id = unresolved.first.get_attribute("id")
    guess = unresolved.first.get_attribute("data-guess")
    assert page.get_attribute(f"#{guess_id}", "data-code") == "MYE" and guess != "MYE"
    page.focus(f"#{guess_id}")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#{guess_id}[data-code='{guess}']:not([data-guess])")
    page.wait_for_selector("#agreement >> text=7 of 8 cells unchanged")  # an accepted best guess is no correction
    accepted = ClassifiedCell.objects.select_related("final_type", "guess_type").get(pk=int(guess_id.split("-")[1]))
    assert accepted.final_type.code == accepted.guess_type.code == guess and accepted.predicted_type.code == "MYE"
    assert accepted.review_state == "accepted"

    review_flagged(cell.run, cell.run.owner)
    page.reload()
    page.click("button:has-text('Sign off and lock…')")
    page.fill("#sign-off-reason", SMALL_RUN)
    page.click("#sign-off-dialog button[type=submit]")
    page.wait_for_selector("text=is signed off and locked")
    assert page.locator("select[name=code]").count() == 0
    screenshot(page, "analysis-signed-off")
