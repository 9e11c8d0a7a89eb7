"""What a technologist and a curator see in the browser (issue 20's defects): nucleated red cells outside the
white-cell denominator, a cell stopped at the root as "Unresolved (review)" and never a lineage "All cells", and
a model set made active only after its figures were shown."""

import shutil

import pytest

from apps.classifiers.models import ModelSet
from tests.conftest import login, screenshot
from tests.review_helpers import make_run

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_peripheral_blood_counts_nrbc_per_100_white_cells_and_lists_unresolved_cells_apart(page, live_server, tree,
                                                                                          lab_user):
    run = make_run(lab_user, [{"predicted": "NGS"}] * 3 + [{"predicted": "LYT"}] + [{"predicted": "EBO"}] * 2 + [
        {"predicted": "ROOT", "guess": "LYT", "resolved": False, "flags": ["unsure at ROOT"]}])
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/analysis/runs/{run.pk}/")
    counts = page.locator("#counts")
    assert "4 cells counted" in counts.inner_text()  # 3 NGS + 1 LYT: not the erythroblasts, not the unsure cell
    assert counts.locator("tr[data-code='NGS'] td").nth(2).inner_text() == "75.0"
    assert "50.0 per 100 WBC" in counts.locator("tr[data-code='EBO']").inner_text()
    assert "NRBC 50.0 per 100 WBC" in page.inner_text("#nrbc")
    unresolved = counts.locator("tr.unresolved")
    assert "Unresolved (review)" in unresolved.inner_text() and "not counted" in unresolved.inner_text()
    assert "All cells" not in counts.inner_text()
    screenshot(page, "counts-peripheral-blood")


def test_make_active_shows_the_sets_figures_and_activates_only_when_confirmed(page, live_server, curator,
                                                                             tiny_model_set, tiny_set_folder,
                                                                             settings):
    from apps.classifiers.services import register_model_set

    shutil.copytree(tiny_set_folder, settings.MODELS_DIR / "second")
    second = register_model_set(settings.MODELS_DIR / "second", name="second")
    ModelSet.objects.filter(pk=second.pk).update(metrics={**second.metrics, "n": 13, "accuracy": 0.15})
    login(page, live_server, "cura")
    page.goto(f"{live_server.url}/models/{second.pk}/")
    page.click("button:has-text('Make active')")
    page.wait_for_selector("#activation-metrics")
    assert "13" in page.inner_text("#activation-metrics") and "15 %" in page.inner_text("#activation-metrics")
    assert page.is_visible("text=Its figures come from only 13 test cells.")
    assert not ModelSet.objects.get(pk=second.pk).is_active  # shown, not yet done
    screenshot(page, "activate-confirmation")
    with page.expect_navigation():
        page.click("button:has-text('Yes, make second active')")
    assert ModelSet.objects.get(pk=second.pk).is_active and not ModelSet.objects.get(pk=tiny_model_set.pk).is_active


def test_the_worklist_filters_by_accession_with_the_keyboard_and_its_ids_are_its_own(page, live_server, tree,
                                                                                    lab_user):
    make_run(lab_user, [{"predicted": "NGS"}], accession="H-26-0001")
    make_run(lab_user, [{"predicted": "LYT"}], accession="H-26-0002")
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/analysis/")
    ids = page.eval_on_selector_all("[id]", "nodes => nodes.map(n => n.id)")
    assert len(ids) == len(set(ids))  # the upload form and the filters each have their own accession field
    page.focus("#filter_accession")
    page.keyboard.type("0002")
    page.keyboard.press("Enter")
    page.wait_for_url("**accession=0002**")
    rows = page.locator("#runs-table tbody tr")
    assert rows.count() == 1 and "H-26-0002" in rows.first.inner_text()
    assert page.input_value("#filter_accession") == "0002"  # the filter stays shown
