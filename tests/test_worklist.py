"""The runs worklist (awaiting review first, filters, counts), the start page's "my runs to review", and the
reference cells of the review gallery's detail panel."""

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone

from apps.analysis import services
from apps.analysis.models import ClassificationRun
from apps.analysis.review import reference_cells, second_choice
from apps.sites.models import Site
from apps.training.services import assign_dataset_splits
from tests.test_analysis_services import demo_zip, upload

Status = ClassificationRun.Status


@pytest.fixture(autouse=True)
def fresh_cache():
    cache.clear()  # reference cells are cached per set and type: rows of an earlier test must not show
    yield
    cache.clear()


def _run(owner, name, status=Status.SUCCEEDED, *, locked=False, days_ago=0, **fields):
    run = ClassificationRun.objects.create(owner=owner, name=name, status=status, locked=locked,
                                           model_set_name="tiny", n_total=8, n_done=8, **fields)
    if days_ago:
        ClassificationRun.objects.filter(pk=run.pk).update(created=timezone.now() - timedelta(days=days_ago))
    return run


@pytest.fixture
def runs(lab_user, curator):
    other = User.objects.get(username="cura")
    return {
        "signed": _run(lab_user, "signed", locked=True, days_ago=1, signed_off_by=lab_user,
                       signed_off_at=timezone.now()),
        "old review": _run(lab_user, "old review", days_ago=3, accession="ACC-1001"),
        "running": _run(lab_user, "running", Status.RUNNING),
        "failed": _run(lab_user, "failed", Status.FAILED, days_ago=2),
        "new review": _run(lab_user, "new review", accession="ACC-2002"),
        "curator run": _run(other, "curator run", days_ago=1),
    }


def _names(html: str) -> list[str]:
    body = html.split('id="runs-table"')[1].split("</tbody>")[0]
    return re.findall(r'<tr data-run="\d+"><td><a [^>]+>#\d+</a></td><td>([^<]*)</td>', body)


def _counts(html: str) -> dict[str, int]:
    pattern = r'data-state="(\w+)"[^>]*>[^<]*<span class="count" data-count>(\d+)'
    return {state: int(n) for state, n in re.findall(pattern, html)}


def test_runs_awaiting_review_come_first_then_classifying_failed_and_signed_off(lab_client, runs):
    html = lab_client.get(reverse("analysis:home")).content.decode()
    assert _names(html) == ["new review", "old review", "running", "failed", "signed"]  # lab staff: own runs only
    assert _counts(html) == {"review": 2, "second": 0, "running": 1, "failed": 1, "signed": 1}
    assert html.count("awaiting review</span>") == 2


def test_runs_awaiting_a_second_sign_off_have_their_own_state_after_those_awaiting_review(lab_client, lab_user, runs):
    _run(lab_user, "first signed", signed_off_by=lab_user, signed_off_at=timezone.now())
    html = lab_client.get(reverse("analysis:home")).content.decode()
    assert _names(html) == ["new review", "old review", "first signed", "running", "failed", "signed"]
    assert _counts(html)["second"] == 1 and html.count("awaiting second sign-off</span>") == 1
    second = lab_client.get(reverse("analysis:home"), {"status": "second"}).content.decode()
    assert _names(second) == ["first signed"]


def test_a_curator_sees_every_run_and_filters_by_who(curator_client, runs):
    html = curator_client.get(reverse("analysis:home")).content.decode()
    assert _names(html)[:3] == ["new review", "curator run", "old review"]
    mine = curator_client.get(reverse("analysis:home"), {"who": "cura"}).content.decode()
    assert _names(mine) == ["curator run"] and _counts(mine)["review"] == 1


def test_the_status_filter_keeps_the_counts_of_every_state(lab_client, runs):
    html = lab_client.get(reverse("analysis:home"), {"status": "review"}).content.decode()
    assert _names(html) == ["new review", "old review"]
    assert _counts(html) == {"review": 2, "second": 0, "running": 1, "failed": 1, "signed": 1}
    assert 'data-state="review" aria-current="page"' in html


def test_date_site_and_accession_filters(lab_client, runs):
    today = timezone.localdate()
    recent = lab_client.get(reverse("analysis:home"), {"date_from": (today - timedelta(days=1)).isoformat()})
    assert _names(recent.content.decode()) == ["new review", "running", "signed"]
    older = lab_client.get(reverse("analysis:home"), {"date_to": (today - timedelta(days=2)).isoformat()})
    assert _names(older.content.decode()) == ["old review", "failed"]
    accession = lab_client.get(reverse("analysis:home"), {"accession": "acc-10"}).content.decode()
    assert _names(accession) == ["old review"] and "ACC-1001" in accession
    elsewhere = Site.objects.create(name="Satellite lab")
    ClassificationRun.objects.filter(pk=runs["failed"].pk).update(site=elsewhere)
    site = lab_client.get(reverse("analysis:home"), {"site": elsewhere.pk}).content.decode()
    assert _names(site) == ["failed"] and _counts(site) == {"review": 0, "second": 0, "running": 0, "failed": 1, "signed": 0}


def test_bad_filter_values_are_reported_and_ignored(lab_client, runs):
    response = lab_client.get(reverse("analysis:home"), {"date_from": "yesterday", "status": "lost",
                                                         "date_to": timezone.localdate().isoformat()})
    html = response.content.decode()
    assert response.status_code == 200
    assert "Enter a valid date." in html and "Select a valid choice" in html
    assert len(_names(html)) == 5  # the valid date_to still applies, the others are left out
    backwards = lab_client.get(reverse("analysis:home"), {"date_from": "2026-12-01", "date_to": "2026-11-01"})
    assert "The end date comes before the start date." in backwards.content.decode()


def test_the_pager_keeps_the_filters(lab_client, lab_user, monkeypatch):
    monkeypatch.setattr("apps.analysis.worklist.WORKLIST_PAGE_SIZE", 2)
    for n in range(5):
        _run(lab_user, f"run {n}")
    html = lab_client.get(reverse("analysis:home"), {"status": "review"}).content.decode()
    assert "Page 1 of 3" in html and "?status=review&page=2" in html


def test_the_start_page_shows_my_runs_to_review(lab_client, runs):
    html = lab_client.get(reverse("home")).content.decode()
    section = html.split('id="my-reviews"')[1].split("</section>")[0]
    assert re.search(r'My runs to review <span class="count" data-count>2</span>', section)
    listed = re.findall(r'data-run="(\d+)"', section)
    assert listed == [str(runs["new review"].pk), str(runs["old review"].pk)]  # not the curator run, not signed


def test_the_start_page_says_when_nothing_awaits_review(lab_client, lab_user):
    _run(lab_user, "done", locked=True)
    html = lab_client.get(reverse("home")).content.decode()
    assert "Nothing awaits your review." in html and 'data-count>0<' in html


def test_reference_cells_are_training_cells_of_the_type_sampled_the_same_way_each_time(pbc_dataset, tiny_model_set,
                                                                                       django_assert_num_queries):
    library = reference_cells(tiny_model_set, "LYT")
    assert library["source"] == "the cell library" and len(library["cells"]) == 6  # the set names no dataset here
    tiny_model_set.card = {**tiny_model_set.card, "data": {"dataset": "Demo PBC"}}
    tiny_model_set.save(update_fields=["card"])
    cache.clear()
    named = reference_cells(tiny_model_set, "LYT")
    assert named["source"] == "cells of Demo PBC"
    assign_dataset_splits(pbc_dataset)
    cache.clear()
    training = reference_cells(tiny_model_set, "LYT")
    ids = [cell["id"] for cell in training["cells"]]
    assert training["source"] == "training cells of Demo PBC"
    chosen = pbc_dataset.cells.filter(pk__in=ids, cell_type__code="LYT", split="train")
    assert set(chosen.values_list("pk", flat=True)) == set(ids)
    with django_assert_num_queries(0):  # cached per set and type
        assert reference_cells(tiny_model_set, "LYT") == training
    cache.clear()
    assert [cell["id"] for cell in reference_cells(tiny_model_set, "LYT")["cells"]] == ids  # deterministic
    inner = reference_cells(tiny_model_set, "MYE")  # an unresolved cell's node: cells from below it
    assert inner["cells"] and not pbc_dataset.cells.filter(pk__in=[c["id"] for c in inner["cells"]],
                                                           cell_type__code="MYE").exists()


def test_the_reference_view_shows_no_name_patient_or_other_run(lab_client, lab_user, pbc_dataset, tiny_model_set):
    pbc_dataset.cells.update(patient_id="PATIENT-4711", slide_id="SLIDE-9")
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    response = lab_client.get(reverse("analysis:reference", args=[run.pk]), {"type": "LYT", "alt": ["MON", "LYT"]})
    html = response.content.decode()
    assert response.status_code == 200
    assert re.findall(r'data-reference="(\w+)"', html) == ["LYT", "MON"]
    images = re.findall(r'<img src="([^"]+)" alt="Reference', html)
    assert len(images) == 12 and all(re.fullmatch(r"/media/cells/[0-9a-f]{2}/[0-9a-f]{64}\.\w+", src) for src in images)
    assert "PATIENT-4711" not in html and "SLIDE-9" not in html and ".jpg\" alt=\"Reference" in html
    names = set(pbc_dataset.cells.values_list("original_name", flat=True))
    assert not any(name in html for name in names)
    assert "/media/analysis/" not in html  # never another run's cells
    other = User.objects.create_user("other-tech")
    other.groups.add(*lab_user.groups.all())
    lab_client.force_login(other)
    assert lab_client.get(reverse("analysis:reference", args=[run.pk]), {"type": "LYT"}).status_code == 404


def test_a_classified_cell_records_its_second_choice_and_the_panel_shows_it(lab_client, lab_user, tiny_model_set):
    run = services.start_run(owner=lab_user, files=[upload(demo_zip(1))])
    cell = run.cells.first()
    assert all(step["second"] != step["code"] and 0 <= step["second_probability"] <= step["probability"]
               for step in cell.path)
    second = second_choice(cell.path)
    assert second["probability"] == max(step["second_probability"] for step in cell.path)
    html = lab_client.get(reverse("analysis:run", args=[run.pk])).content.decode()
    detail = html.split(f'id="cell-{cell.pk}"')[1].split("</template>")[0]
    assert f"<code>{second['code']}</code>" in detail.split("data-second>")[1].split("</dd>")[0]
    assert "data-familiarity>" in detail and "data-flags>" in detail and f"?classified={cell.pk}" in detail
    assert f"/analysis/runs/{run.pk}/reference/?type={cell.final_type.code}" in detail
    assert second_choice([{"node": "ROOT", "code": "LYM", "probability": 0.9}]) is None  # older cells: not recorded
