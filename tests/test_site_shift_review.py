"""A run unlike the training cells: unfamiliar cells first and apart, an alarm acknowledged before sign-off,
the verdict on the report, in classify --json, on the detection result and the model set page."""

import io
import json
import shutil

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from tests.conftest import login, screenshot
from tests.review_helpers import SMALL_RUN, review_flagged
from tests.test_familiarity import DEMO_PBC, _zip, noise, shared_model_set, shared_set  # noqa: F401 (fixtures)

DEMO = sorted(DEMO_PBC.glob("*/*.jpg"))


def _run(user, images: dict) -> ClassificationRun:
    run = services.start_run(owner=user, files=[SimpleUploadedFile("run.zip", _zip(images))])
    assert run.status == ClassificationRun.Status.SUCCEEDED, run.error
    return run


@pytest.fixture
def alarmed(shared_model_set, lab_user) -> ClassificationRun:  # noqa: F811
    """Twelve noise images: every cell unfamiliar, the run at alarm."""
    run = _run(lab_user, {f"noise{i}.png": image for i, image in enumerate(noise(12))})
    assert run.site_shift["level"] == "alarm"
    return run


@pytest.fixture
def mixed(shared_model_set, lab_user) -> ClassificationRun:  # noqa: F811
    """Demo cells and four noise images in one run."""
    images = {f"{p.parent.name}/{p.name}": p for p in DEMO[::10]}
    images.update({f"noise{i}.png": image for i, image in enumerate(noise(4))})
    return _run(lab_user, images)


def test_an_alarm_run_is_signed_off_only_after_someone_acknowledges_it(alarmed, lab_user, lab_client):
    page = lab_client.get(f"/analysis/runs/{alarmed.pk}/").content.decode()
    assert "I have read this warning (needed before sign-off)" in page
    assert "Acknowledge the site-shift alarm above first." in page
    with pytest.raises(services.AnalysisError, match="site-shift alarm.*Acknowledge the warning first"):
        services.sign_off(run_id=alarmed.pk, user=lab_user)
    alarmed.refresh_from_db()
    assert not alarmed.locked and alarmed.signed_off_at is None  # refused: nothing changed

    assert lab_client.post(f"/analysis/runs/{alarmed.pk}/acknowledge-shift/").status_code == 302
    alarmed.refresh_from_db()
    assert alarmed.shift_acknowledged_by == lab_user and alarmed.shift_acknowledged_at is not None
    first = alarmed.shift_acknowledged_at
    services.acknowledge_shift(run_id=alarmed.pk, user=lab_user)  # the first acknowledgement stands
    alarmed.refresh_from_db()
    assert alarmed.shift_acknowledged_at == first

    page = lab_client.get(f"/analysis/runs/{alarmed.pk}/").content.decode()
    assert "Acknowledged by <strong>tech</strong>" in page and "I have read this warning" not in page
    review_flagged(alarmed, lab_user)
    assert lab_client.post(f"/analysis/runs/{alarmed.pk}/sign-off/",
                           {"confirm": "yes", "reason": SMALL_RUN}).status_code == 302
    alarmed.refresh_from_db()
    assert alarmed.locked
    report = lab_client.get(f"/analysis/runs/{alarmed.pk}/report/").content.decode()
    assert "<strong>alarm</strong> (100 % of the cells unfamiliar)" in report
    assert "acknowledged by <strong>tech</strong>" in report


def test_the_api_acknowledges_a_warning_and_refuses_a_run_without_one(alarmed, mixed, lab_user):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(lab_user)
    refused = api.post(f"/api/classification-runs/{alarmed.pk}/sign-off/")
    assert refused.status_code == 409 and "Acknowledge" in refused.json()["detail"]
    done = api.post(f"/api/classification-runs/{alarmed.pk}/acknowledge-shift/")
    assert done.status_code == 200
    assert done.json()["shift_acknowledged_by"] == "tech" and done.json()["shift_acknowledged_at"]
    review_flagged(alarmed, lab_user)
    assert api.post(f"/api/classification-runs/{alarmed.pk}/sign-off/", {"reason": SMALL_RUN}).status_code == 200
    if mixed.site_shift["level"] not in ("warn", "alarm"):
        nothing = api.post(f"/api/classification-runs/{mixed.pk}/acknowledge-shift/")
        assert nothing.status_code == 409 and "no site-shift warning" in nothing.json()["detail"]


def test_unfamiliar_cells_come_first_in_their_own_group_and_row_until_someone_types_them(mixed, lab_client):
    strange = list(mixed.cells.filter(unfamiliar=True).order_by("index"))
    assert {cell.original_name for cell in strange} >= {f"noise{i}.png" for i in range(4)}
    assert all(any(flag.startswith("unfamiliar") for flag in cell.flags) for cell in strange)
    assert all(not cell.unfamiliar for cell in mixed.cells.exclude(pk__in=[c.pk for c in strange]))

    page = lab_client.get(f"/analysis/runs/{mixed.pk}/").content.decode()
    first_group = page.index('class="gallery-group')
    assert page.index("Not a type this model knows", first_group) < page.index('class="gallery-group', first_group + 1)
    first_cells = page[first_group:page.index('class="gallery-group', first_group + 1)]
    assert all(f'id="cell-{cell.pk}"' in first_cells for cell in strange)

    counts = services.run_differential(mixed)
    assert counts.unfamiliar.n == len(strange) and counts.total == mixed.cells.count()
    unresolved = counts.unresolved.n if counts.unresolved else 0  # "Unresolved (review)", listed apart
    assert sum(row.n for row in counts.types) + unresolved == counts.total - len(strange)  # never hidden in a type
    assert counts.unfamiliar.percent == pytest.approx(100 * len(strange) / counts.counted, abs=0.01)
    assert "awaiting review" in page

    typed = strange[0]
    services.correct_cell(cell_id=typed.pk, code="LYT", user=None)
    after = services.run_differential(mixed)
    assert after.unfamiliar.n == len(strange) - 1
    assert next(row.n for row in after.types if row.code == "LYT") == 1 + next(
        (row.n for row in counts.types if row.code == "LYT"), 0)
    page = lab_client.get(f"/analysis/runs/{mixed.pk}/").content.decode()
    first_cells = page[page.index('class="gallery-group'):]
    first_cells = first_cells[:first_cells.index('class="gallery-group', 10)]
    assert f'id="cell-{typed.pk}"' not in first_cells  # typed: it left the group


def test_classify_json_writes_the_run_id_counts_differential_and_site_shift(shared_model_set, tmp_path):  # noqa: F811
    source = tmp_path / "cells"
    source.mkdir()
    for path in DEMO[::10]:
        shutil.copy(path, source / path.name)
    for i, image in enumerate(noise(3)):
        image.save(source / f"noise{i}.png")
    out = io.StringIO()
    call_command("classify", str(source), csv=str(tmp_path / "out.csv"), json=str(tmp_path / "summary.json"),
                 stdout=out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    run = ClassificationRun.objects.get(pk=summary["run_id"])
    n = len(DEMO[::10]) + 3
    assert summary["counts"]["classified"] == n == run.cells.count()
    assert sum(summary["counts"]["by_type"].values()) == n
    assert summary["counts"]["unfamiliar"] == run.cells.filter(unfamiliar=True).count() >= 3
    assert summary["differential"]["unfamiliar"]["n"] == summary["counts"]["unfamiliar"]
    assert summary["differential"]["total"] == n
    assert summary["site_shift"] == run.site_shift and summary["site_shift"]["level"] in ("ok", "warn", "alarm")
    assert summary["model_set"] == "shared-tiny"
    assert f"Site shift: {run.site_shift['level']}" in out.getvalue()
    with pytest.raises(CommandError, match="The folder for .*nowhere.*does not exist"):
        call_command("classify", str(source), csv=str(tmp_path / "o.csv"), json=str(tmp_path / "nowhere" / "s.json"))


def test_the_model_set_page_draws_the_familiarity_histogram_and_risk_coverage(shared_model_set, lab_client):  # noqa: F811
    familiarity = shared_model_set.metrics["familiarity"]
    validation = familiarity["validation"]  # the training classified its validation cells with the statistics
    assert validation["n"] == familiarity["n_val"] and len(validation["risk_coverage"]) == 20
    assert 0 <= validation["unfamiliar_share"] <= 1 and validation["selective_n"] <= validation["n"]
    page = lab_client.get(f"/models/{shared_model_set.pk}/").content.decode()
    assert 'id="familiarity-histogram"' in page and 'id="risk-coverage"' in page
    assert page.count('class="bar"') == len(familiarity["histogram"]["counts"])
    assert '<polyline points="' in page and 'class="threshold"' in page


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_the_familiarity_charts_are_drawn_in_the_browser_with_the_threshold_inside_the_histogram(
        page, live_server, shared_model_set, lab_user):  # noqa: F811
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/models/{shared_model_set.pk}/")
    histogram = page.locator("#familiarity-histogram svg")
    assert "threshold" in histogram.get_attribute("aria-label")
    chart, line = histogram.bounding_box(), page.locator("#familiarity-histogram .threshold").bounding_box()
    assert chart["width"] > 100 and chart["height"] > 50  # drawn at a readable size, not collapsed
    assert chart["x"] <= line["x"] <= chart["x"] + chart["width"]  # the threshold falls on the chart
    bars = page.locator("#familiarity-histogram .bar")
    assert bars.count() == len(shared_model_set.metrics["familiarity"]["histogram"]["counts"])
    assert max(bars.nth(i).bounding_box()["height"] for i in range(bars.count())) > 10
    curve = page.locator("#risk-coverage polyline").bounding_box()
    assert curve["width"] > 50  # the curve spans the coverage axis
    assert page.get_by_text("Not evaluated down the whole tree yet").is_visible()  # no empty figures
    screenshot(page, "model-set-familiarity-charts")


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_technologist_acknowledges_an_alarm_then_signs_off_in_the_browser(page, live_server, alarmed, lab_user):
    login(page, live_server, "tech")
    page.goto(f"{live_server.url}/analysis/runs/{alarmed.pk}/")
    page.wait_for_selector("#site-shift[data-level='alarm']")
    assert page.is_disabled("button:has-text('Sign off and lock…')")
    assert page.locator(".gallery-group").first.locator("h2").inner_text().startswith("Not a type this model knows")
    screenshot(page, "analysis-site-shift-alarm")
    page.click("button:has-text('I have read this warning')")
    page.wait_for_selector("text=Acknowledged by tech")
    review_flagged(alarmed, lab_user)
    page.reload()
    page.click("button:has-text('Sign off and lock…')")
    page.fill("#sign-off-reason", SMALL_RUN)
    page.click("#sign-off-dialog button[type=submit]")
    page.wait_for_selector("text=is signed off and locked")
    alarmed.refresh_from_db()
    assert alarmed.locked and alarmed.shift_acknowledged_by.username == "tech"
