"""A technologist reviews with the keyboard and signs off in a real browser (issue 20's sign-off rules): Enter
accepts a best guess, Space the shown type, the progress follows; the confirmation dialog refuses unreviewed
flagged cells, asks a reason under the count target; a supervisor gives the second sign-off."""

from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from apps.accounts.roles import SUPERVISOR
from apps.analysis.models import ClassificationRun
from apps.sites.models import Site
from tests.conftest import DEMO, login, screenshot
from tests.review_helpers import make_run

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
JPEGS = sorted((DEMO / "pbc").glob("*/*.jpg"))


def with_images(run: ClassificationRun) -> ClassificationRun:
    """Store a real demo cell image behind each cell, so the gallery shows cells."""
    for cell, path in zip(run.cells.order_by("index"), JPEGS[::7], strict=False):
        default_storage.save(cell.image.name, ContentFile(Path(path).read_bytes()))
    return run


def progress(page) -> str:
    return page.inner_text("#review-progress")


def test_keyboard_review_updates_progress_and_the_dialog_refuses_then_asks_a_reason(page, live_server, tree,
                                                                                    lab_user):
    run = with_images(make_run(lab_user, [
        {"predicted": "MYE", "guess": "EOS", "resolved": False, "flags": ["unsure at MYE"]},
        {"predicted": "LYT", "flags": ["BLA is always reviewed"]},
        {"predicted": "NGS"}, {"predicted": "NGS"},
    ]))
    unsure, flagged = run.cells.get(index=0), run.cells.get(index=1)
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/analysis/runs/{run.pk}/")
    assert "flagged 0 / 2 reviewed" in progress(page)
    assert page.is_visible("text=Unresolved (review)")

    page.click("button:has-text('Sign off and lock…')")
    dialog = page.locator("#sign-off-dialog")
    dialog.wait_for(state="visible")
    assert page.evaluate("document.getElementById('sign-off-dialog').matches(':modal')")
    assert "2 of the 2 flagged cells are not reviewed yet" in page.inner_text("#sign-off-refusals")
    assert page.is_disabled("#sign-off-dialog button[type=submit]")
    screenshot(page, "review-sign-off-refused")
    page.click("#sign-off-dialog button:has-text('Cancel')")
    dialog.wait_for(state="hidden")

    page.focus(f"#cell-{unsure.pk}")
    page.keyboard.press("Enter")  # the best guess
    page.wait_for_selector(f"#cell-{unsure.pk}[data-code='EOS'][data-review='accepted']")
    page.wait_for_selector("#review-progress >> text=flagged 1 / 2 reviewed")
    assert "0 changed" in progress(page) and page.locator("text=Unresolved (review)").count() == 0
    page.focus(f"#cell-{flagged.pk}")
    page.keyboard.press(" ")  # accept the shown type
    page.wait_for_selector(f"#cell-{flagged.pk}[data-code='LYT'][data-review='accepted']")
    page.wait_for_selector("#review-progress >> text=flagged 2 / 2 reviewed")
    flagged.refresh_from_db()
    assert flagged.review_state == "accepted" and flagged.reviewed_by == lab_user and flagged.final_type.code == "LYT"
    plain = run.cells.get(index=2)
    page.focus(f"#cell-{plain.pk}")
    page.keyboard.press("Enter")  # no best guess: Enter accepts the shown type
    page.wait_for_selector(f"#cell-{plain.pk}[data-code='NGS'][data-review='accepted']")
    page.wait_for_selector("#review-progress >> text=3 of 4 cells reviewed (3 accepted, 0 changed)")

    page.click("button:has-text('Sign off and lock…')")
    dialog.wait_for(state="visible")
    assert page.locator("#sign-off-refusals").count() == 0
    assert "The count target of 100 cells is not reached: 4 counted." in page.inner_text("#sign-off-needs-reason")
    assert "3 of 4 cells · flagged 2 / 2 reviewed" in page.inner_text("#sign-off-reviewed")
    page.click("#sign-off-dialog button[type=submit]")  # no reason: the form is not sent
    assert page.evaluate("document.getElementById('sign-off-reason').validity.valueMissing")
    run.refresh_from_db()
    assert not run.locked
    page.fill("#sign-off-reason", "Leukopenic sample: four cells on the whole slide.")
    screenshot(page, "review-sign-off-reason")
    page.click("#sign-off-dialog button[type=submit]")
    page.wait_for_selector("text=is signed off and locked")
    run.refresh_from_db()
    assert run.locked and run.signoff_reason == "Leukopenic sample: four cells on the whole slide."
    page.click("text=Printable report")
    page.wait_for_selector("#report-signoff-rules >> text=The count target of 100 cells is not reached")
    assert "Leukopenic sample: four cells on the whole slide." in page.inner_text("article.report")


def test_over_the_blast_limit_a_supervisor_gives_the_second_sign_off(page, browser, live_server, tree, lab_user):
    supervisor = User.objects.create_user("super", password="pw-super")
    supervisor.groups.add(Group.objects.get_or_create(name=SUPERVISOR)[0])
    site = Site.objects.create(name="Haematology B", second_review_blast_share=0.2)
    run = with_images(make_run(lab_user, [{"predicted": "BLA", "flags": ["BLA is always reviewed"]}] * 3 +
                               [{"predicted": "NGS"}] * 97, site=site))
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/analysis/runs/{run.pk}/?flagged=1")
    for cell in run.cells.exclude(flags=[]):
        page.focus(f"#cell-{cell.pk}")
        page.keyboard.press(" ")
        page.wait_for_selector(f"#cell-{cell.pk}[data-review='accepted']")
    page.wait_for_selector("#review-progress >> text=flagged 3 / 3 reviewed")
    page.click("button:has-text('Sign off and lock…')")
    assert "blasts 3.0 % of the cells counted" not in page.inner_text("#sign-off-dialog")  # under 20 %: none
    page.click("#sign-off-dialog button:has-text('Cancel')")
    Site.objects.filter(pk=site.pk).update(second_review_blast_share=0.02)
    page.reload()
    page.click("button:has-text('Sign off and lock…')")
    assert "blasts 3.0 % of the cells counted, over the site's limit of 2 %" in page.inner_text("#sign-off-dialog")
    page.click("#sign-off-dialog button:has-text('Sign off for a second sign-off')")
    page.wait_for_selector("text=awaits a supervisor's second sign-off")
    page.wait_for_selector("#second-sign-off-status >> text=awaiting second sign-off")
    assert page.locator("button:has-text('Confirm the sign-off as supervisor')").count() == 0  # not a supervisor
    run.refresh_from_db()
    assert not run.locked and run.signed_off_by == lab_user

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    other = context.new_page()
    other.set_default_timeout(20_000)
    try:
        login(other, live_server, "super")
        other.goto(f"{live_server.url}/analysis/runs/{run.pk}/")
        other.click("button:has-text('Confirm the sign-off as supervisor and lock')")
        other.wait_for_selector("text=is signed off by a second person and locked")
        screenshot(other, "review-second-sign-off")
    finally:
        context.close()
    run.refresh_from_db()
    assert run.locked and run.second_signed_off_by == supervisor
