"""The whole lab day in one real browser: import, train, classify, verify, sign off, export, explain, detect.

Each page is kept as a screenshot in test-artifacts/e2e-*.png.
"""

import csv
import io
import zipfile

import pytest

from apps.analysis.models import ClassificationRun, ClassifiedCell
from apps.classifiers.models import ModelSet
from apps.detection.services import install_shipped_detector
from apps.training import services as training
from apps.training.models import TrainingJob
from tests.conftest import DEMO, fill_tiny_training, login, screenshot
from tests.review_helpers import SMALL_RUN, review_flagged

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Four leaf types under ROOT's lineages and under NEU: enough for a tiny two-node model set.
FOLDERS = {"EBO": "erythroblast", "LYT": "lymphocyte", "NGB": "neutrophil", "NGS": "neutrophil"}
PREFIX = {"NGB": "BNE_", "NGS": "SNE_"}


def _dataset_zip(path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for code, folder in FOLDERS.items():
            images = sorted((DEMO / "pbc" / folder).glob(f"{PREFIX.get(code, '')}*.jpg"))
            for image in images[:10]:
                archive.writestr(f"{code}/{image.name}", image.read_bytes())


def _cells_zip(path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for folder in ("erythroblast", "lymphocyte", "neutrophil", "monocyte"):
            for image in sorted((DEMO / "pbc" / folder).glob("*.jpg"))[-2:]:
                archive.writestr(image.name, image.read_bytes())


def test_a_lab_day_end_to_end(page, live_server, curator, tree, tiny_model_set, tmp_path):
    """The site already classifies with a set ("tiny"); the curator trains a new one and puts it in use."""
    login(page, live_server, "cura")
    screenshot(page, "e2e-01-start")

    # Import a small dataset through the admin.
    dataset_zip = tmp_path / "cells.zip"
    _dataset_zip(dataset_zip)
    page.goto(live_server.url + "/admin/cells/dataset/import/")
    page.set_input_files("#id_archive", str(dataset_zip))
    page.fill("#id_dataset", "E2E cells")
    page.click("input[type=submit][value=Import]")
    page.wait_for_selector("#import-summary")
    assert page.inner_text("#import-summary") == "Imported 40, duplicates 0, skipped 0."
    screenshot(page, "e2e-02-import")

    # Start a tiny training and watch its progress bar finish.
    page.goto(live_server.url + "/training/new/")
    fill_tiny_training(page, "E2E cells", "e2e set")
    page.click("button:has-text('Start training')")
    page.wait_for_selector("[data-status=queued]")
    job = TrainingJob.objects.get(name="e2e set")
    training.run_training_job(job.pk)  # what the training worker runs; the page keeps polling meanwhile
    page.wait_for_selector("[data-status=succeeded]", timeout=60_000)
    assert page.inner_text("#job-percent") == "100"
    page.goto(live_server.url + f"/training/jobs/{job.pk}/")
    assert page.locator("table.confusion").count() == 2
    screenshot(page, "e2e-03-training")
    # Another set is in use, so the new one waits for the curator to make it active.
    job.refresh_from_db()
    assert not job.result.is_active and ModelSet.objects.active() == tiny_model_set
    page.click("button:has-text('Make active')")
    page.click("button:has-text('Yes, make e2e set active')")  # after its figures and verification
    page.wait_for_selector("text=e2e set is now the active model set.")
    job.refresh_from_db()
    tiny_model_set.refresh_from_db()
    assert job.result.is_active and not tiny_model_set.is_active

    # Classify a zip, correct a cell with the keyboard, sign off.
    cells_zip = tmp_path / "run.zip"
    _cells_zip(cells_zip)
    page.goto(live_server.url + "/analysis/")
    page.set_input_files("#id_files", str(cells_zip))
    page.click("button:has-text('Classify')")
    page.wait_for_selector("text=Differential count")
    assert page.locator("[data-cell]").count() == 8
    screenshot(page, "e2e-04-classified")
    keymap = page.get_attribute("#keymap", "data-keys")
    import json

    key_for = {code: key for key, code in json.loads(keymap).items()}
    first = page.locator("[data-cell]").first
    first.focus()
    cell_id = page.evaluate("document.activeElement.id")
    current = page.get_attribute(f"#{cell_id}", "data-code")
    target = "MON" if current != "MON" else "LYT"
    page.keyboard.press(key_for[target])
    page.wait_for_selector(f"#{cell_id}[data-code='{target}']")
    page.wait_for_selector("#agreement >> text=7 of 8 cells unchanged")
    review_flagged(ClassificationRun.objects.latest("created"), curator)  # flagged cells are reviewed first
    page.reload()
    page.click("button:has-text('Sign off and lock…')")
    page.fill("#sign-off-reason", SMALL_RUN)  # 8 cells, under the count target
    page.click("#sign-off-dialog button[type=submit]")
    page.wait_for_selector("text=is signed off and locked")
    screenshot(page, "e2e-05-signed-off")

    # Export the CSV.
    with page.expect_download() as download:
        page.click("a:has-text('CSV')")
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    corrected = ClassifiedCell.objects.get(pk=int(cell_id.removeprefix("cell-")))
    assert len(rows) == 8 and all(row["model_set"] == "e2e set" for row in rows)
    assert [(row["file"], row["final"], row["corrected_by"]) for row in rows if row["changed"] == "yes"] == [
        (corrected.original_name, target, "cura")]  # the correction, and only it, is in the export

    # Explain a classified cell.
    page.locator("a.explain-link").first.click()
    page.wait_for_selector("#explain-form")
    page.select_option("#id_method", "gradcam")
    page.click("#explain-form button[type=submit]")
    page.wait_for_function(
        "() => { const i = document.querySelector('#result img'); return i && i.complete && i.naturalWidth > 100; }",
        timeout=60_000,
    )
    screenshot(page, "e2e-06-explained")

    # Detect on a smear with the shipped detector; the white cell goes down the tree.
    install_shipped_detector()
    page.goto(live_server.url + "/detection/")
    page.set_input_files("#id_image", str(DEMO / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00007.jpg"))
    page.click("#detect-form button[type=submit]")
    page.wait_for_selector(".detection-canvas rect[data-class='WBC']", state="attached", timeout=60_000)
    assert page.locator("#wbc-gallery .wbc-code").count() >= 1
    screenshot(page, "e2e-07-detected")
