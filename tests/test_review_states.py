"""Review states and the sign-off rules (issue 20, part 1): accepted or changed with who and when, an accepted
best guess is no correction, flagged cells reviewed before sign-off, a reason where the count target is not
reached or nothing was reviewed, no sign-off without cells, a supervisor's second sign-off over a site's limit."""

import csv
import io

import pytest
from django.contrib.auth.models import Group, User
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from apps.accounts.roles import LAB_STAFF, SUPERVISOR
from apps.analysis import services
from apps.analysis.models import ClassificationRun, ClassifiedCell, Correction
from apps.sites.models import Site
from tests.review_helpers import make_run
from tests.test_analysis_services import demo_zip, upload

FLAG = ["unsure at MYE"]


def user_in(name: str, group: str) -> User:
    user = User.objects.create_user(name, password="pw-" + name)
    user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


@pytest.fixture
def supervisor(db) -> User:
    return user_in("super", SUPERVISOR)


@pytest.fixture
def mixed(tree, lab_user):
    """One unresolved myeloid cell with a best guess (flagged), one flagged lymphocyte, two plain neutrophils."""
    return make_run(lab_user, [
        {"predicted": "MYE", "guess": "EOS", "resolved": False, "flags": FLAG},
        {"predicted": "LYT", "flags": ["BLA is always reviewed"]},
        {"predicted": "NGS"}, {"predicted": "NGS"},
    ])


def cell_of(run, code: str) -> ClassifiedCell:
    return run.cells.filter(predicted_type__code=code).first()


def api_for(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


# --- review states -------------------------------------------------------------------------------------------------


def test_accepting_the_shown_type_is_an_acceptance_with_who_and_when_and_no_correction(mixed, lab_user):
    cell = cell_of(mixed, "NGS")
    services.review_cell(cell_id=cell.pk, user=lab_user)
    cell.refresh_from_db()
    assert (cell.review_state, cell.reviewed_by, cell.final_type.code) == ("accepted", lab_user, "NGS")
    assert cell.reviewed_at is not None and cell.version == 0 and not Correction.objects.filter(cell=cell).exists()
    summary = services.run_summary(mixed)
    assert (summary.reviewed, summary.accepted, summary.corrected, summary.unchanged) == (1, 1, 0, 4)


def test_accepting_a_best_guess_is_no_correction_and_the_cell_is_no_longer_unresolved(mixed, lab_user):
    before = services.run_summary(mixed)
    assert before.unresolved == 1
    cell = cell_of(mixed, "MYE")
    services.correct_cell(cell_id=cell.pk, code="EOS", user=lab_user, expected_version=0)  # Enter: the guess
    cell.refresh_from_db()
    assert (cell.final_type.code, cell.predicted_type.code, cell.review_state) == ("EOS", "MYE", "accepted")
    summary = services.run_summary(mixed)
    assert summary.corrected == 0 and summary.unchanged == 4 and summary.agreement == 1.0
    assert summary.unresolved == 0 and summary.accepted == 1
    assert Correction.objects.get(cell=cell).to_type.code == "EOS"  # the audit trail keeps the type change
    out = io.StringIO()
    services.write_csv(mixed, out)
    row = next(r for r in csv.DictReader(io.StringIO(out.getvalue())) if r["final"] == "EOS")
    assert row["changed"] == "" and row["review_state"] == "accepted" and row["reviewed_by"] == "tech"


def test_another_type_is_a_change_and_changing_back_to_the_prediction_an_acceptance(mixed, lab_user, curator):
    cell = cell_of(mixed, "NGS")
    services.correct_cell(cell_id=cell.pk, code="MON", user=lab_user)
    cell.refresh_from_db()
    assert (cell.review_state, cell.reviewed_by) == ("changed", lab_user)
    assert services.run_summary(mixed).corrected == 1
    services.correct_cell(cell_id=cell.pk, code="NGS", user=curator, expected_version=cell.version)
    cell.refresh_from_db()
    assert (cell.review_state, cell.reviewed_by) == ("accepted", curator)
    assert services.run_summary(mixed).corrected == 0


def test_a_cell_at_the_root_cannot_be_accepted_as_it_is(tree, lab_user):
    run = make_run(lab_user, [{"predicted": "ROOT", "resolved": False, "flags": ["unsure at ROOT"]}])
    cell = run.cells.get()
    with pytest.raises(services.AnalysisError, match="no type yet"):
        services.review_cell(cell_id=cell.pk, user=lab_user)
    cell.refresh_from_db()
    assert cell.review_state == "pending"


def test_review_progress_counts_flagged_and_reviewed_cells_on_the_page_and_the_api(mixed, lab_user, lab_client):
    services.review_cell(cell_id=cell_of(mixed, "MYE").pk, user=lab_user, best_guess=True)
    assert services.run_summary(mixed).review == {"flagged": 2, "flagged_reviewed": 1, "reviewed": 1, "total": 4}
    page = lab_client.get(f"/analysis/runs/{mixed.pk}/").content.decode()
    assert "flagged 1 / 2 reviewed" in page
    detail = api_for(lab_user).get(f"/api/classification-runs/{mixed.pk}/").json()
    assert detail["review"] == {"flagged": 2, "flagged_reviewed": 1, "reviewed": 1, "total": 4}
    assert {c["review_state"] for c in detail["cells"]} == {"accepted", "pending"}


def test_the_api_accepts_the_shown_type_or_the_best_guess_and_refuses_a_stale_view(mixed, lab_user):
    api = api_for(lab_user)
    plain, unsure = cell_of(mixed, "LYT"), cell_of(mixed, "MYE")
    accepted = api.post(f"/api/classified-cells/{plain.pk}/accept/", {"version": 0}, format="json")
    assert accepted.status_code == 200, accepted.content
    assert accepted.json()["review_state"] == "accepted" and accepted.json()["reviewed_by"] == "tech"
    guess = api.post(f"/api/classified-cells/{unsure.pk}/accept/", {"best_guess": True}, format="json")
    assert guess.json()["final_type"] == "EOS" and guess.json()["review_state"] == "accepted"
    stale = api.post(f"/api/classified-cells/{unsure.pk}/accept/", {"version": 0}, format="json")
    assert stale.status_code == 409 and "tech changed this cell to EOS" in stale.json()["detail"]
    none = api.post(f"/api/classified-cells/{cell_of(mixed, 'NGS').pk}/accept/", {"best_guess": True}, format="json")
    assert none.status_code == 200  # a resolved cell's best guess is its prediction
    patched = api.patch(f"/api/classified-cells/{plain.pk}/", {"final_type": "MON"}, format="json")
    assert patched.json()["review_state"] == "changed"


# --- sign-off rules ------------------------------------------------------------------------------------------------


def test_a_run_with_no_cells_is_never_signed_off_even_with_a_reason(tree, lab_user):
    empty = make_run(lab_user, [])
    with pytest.raises(services.AnalysisError, match="has no cells: there is nothing to sign off"):
        services.sign_off(run_id=empty.pk, user=lab_user, reason="urgent")
    empty.refresh_from_db()
    assert not empty.locked and empty.signed_off_at is None and not empty.signoff_reason


def test_a_run_whose_every_file_was_skipped_cannot_be_signed_off(tiny_model_set, lab_user):
    bad = upload(demo_zip(0, extra={"a.jpg": b"not an image", "b.png": b"\x89PNG broken"}))
    run = services.start_run(owner=lab_user, files=[bad])
    assert run.cells.count() == 0 and len(run.skipped) == 2
    with pytest.raises(services.AnalysisError, match="no cells \\(every one of its 2 files was skipped\\)"):
        services.sign_off(run_id=run.pk, user=lab_user, reason="the lab asked")
    refused = api_for(lab_user).post(f"/api/classification-runs/{run.pk}/sign-off/", {"reason": "x"})
    assert refused.status_code == 409 and "no cells" in refused.json()["detail"]
    run.refresh_from_db()
    assert not run.locked and run.signed_off_by is None


def test_flagged_cells_must_all_be_reviewed_and_no_reason_overrides_it(mixed, lab_user):
    services.review_cell(cell_id=cell_of(mixed, "MYE").pk, user=lab_user, best_guess=True)
    with pytest.raises(services.AnalysisError, match="1 of the 2 flagged cells are not reviewed yet"):
        services.sign_off(run_id=mixed.pk, user=lab_user, reason="busy day")
    mixed.refresh_from_db()
    assert not mixed.locked and mixed.signed_off_at is None


def test_a_count_target_not_reached_needs_a_reason_which_is_kept_and_printed(mixed, lab_user, lab_client):
    for cell in mixed.cells.exclude(flags=[]):
        services.review_cell(cell_id=cell.pk, user=lab_user)
    with pytest.raises(services.AnalysisError, match="count target of 100 cells is not reached: 4 counted. Give a "
                                                     "reason"):
        services.sign_off(run_id=mixed.pk, user=lab_user, reason="   ")
    mixed.refresh_from_db()
    assert not mixed.locked
    run = services.sign_off(run_id=mixed.pk, user=lab_user, reason="Leukopenic sample, 4 cells on the slide.")
    assert run.locked and run.signoff_reason == "Leukopenic sample, 4 cells on the slide."
    report = lab_client.get(f"/analysis/runs/{mixed.pk}/report/").content.decode()
    assert "The count target of 100 cells is not reached: 4 counted." in report
    assert "Leukopenic sample, 4 cells on the slide." in report


def test_nothing_reviewed_needs_a_reason_even_when_the_target_is_reached(tree, lab_user):
    run = make_run(lab_user, [{"predicted": "NGS"}] * 100)
    with pytest.raises(services.AnalysisError, match="^No cell was reviewed. Give a reason"):
        services.sign_off(run_id=run.pk, user=lab_user)
    services.review_cell(cell_id=run.cells.first().pk, user=lab_user)
    assert services.sign_off(run_id=run.pk, user=lab_user).locked  # reached, reviewed: no reason needed


def test_the_page_asks_for_confirmation_before_it_signs(mixed, lab_user, lab_client):
    response = lab_client.post(f"/analysis/runs/{mixed.pk}/sign-off/")
    assert response.status_code == 302 and response["Location"].endswith("?sign-off=confirm")
    mixed.refresh_from_db()
    assert not mixed.locked
    page = lab_client.get(response["Location"]).content.decode()
    assert '<dialog id="sign-off-dialog" aria-labelledby="sign-off-title" open>' in page
    assert "4 classified, 3 counted" in page and "not reached" in page  # the unresolved cell awaits review
    assert "2 of the 2 flagged cells are not reviewed yet" in page
    refused = lab_client.post(f"/analysis/runs/{mixed.pk}/sign-off/", {"confirm": "yes", "reason": "x"}, follow=True)
    assert "flagged cells are not reviewed yet" in refused.content.decode()
    mixed.refresh_from_db()
    assert not mixed.locked


# --- second sign-off -----------------------------------------------------------------------------------------------


@pytest.fixture
def blasty(tree, lab_user):
    """A run of 10 reviewed cells, 3 of them blasts, at a site asking a second look above 20 % blasts."""
    site = Site.objects.create(name="Haematology B", second_review_blast_share=0.2)
    run = make_run(lab_user, [{"predicted": "BLA", "flags": ["BLA is always reviewed"]}] * 3 +
                   [{"predicted": "NGS"}] * 7, site=site, count_target=100)
    for cell in run.cells.all():
        services.review_cell(cell_id=cell.pk, user=lab_user)
    return run


def test_over_the_sites_blast_limit_a_supervisor_confirms_before_the_run_locks(blasty, lab_user, supervisor, curator):
    run = services.sign_off(run_id=blasty.pk, user=lab_user, reason="small test run")
    assert not run.locked and run.awaiting_second_sign_off and run.signed_off_by == lab_user
    with pytest.raises(services.AnalysisError, match="awaits a supervisor's second sign-off"):
        services.sign_off(run_id=blasty.pk, user=lab_user, reason="again")
    with pytest.raises(services.AnalysisError, match="only a supervisor may change its cells"):
        services.correct_cell(cell_id=blasty.cells.first().pk, code="MON", user=lab_user)
    with pytest.raises(services.AnalysisError, match="needs the Supervisor role"):
        services.second_sign_off(run_id=blasty.pk, user=curator)
    services.correct_cell(cell_id=blasty.cells.last().pk, code="MON", user=supervisor)  # the supervisor may
    run = services.second_sign_off(run_id=blasty.pk, user=supervisor)
    assert run.locked and run.second_signed_off_by == supervisor and run.second_signed_off_at is not None
    with pytest.raises(services.AnalysisError, match="already signed off by tech"):
        services.second_sign_off(run_id=blasty.pk, user=supervisor)


def test_the_second_signer_must_be_another_person(blasty, supervisor):
    services.sign_off(run_id=blasty.pk, user=supervisor, reason="small test run")
    with pytest.raises(services.AnalysisError, match="another person than the first"):
        services.second_sign_off(run_id=blasty.pk, user=supervisor)
    blasty.refresh_from_db()
    assert not blasty.locked


def test_under_the_limit_or_without_one_the_first_sign_off_locks(tree, lab_user):
    site = Site.objects.create(name="Haematology C", second_review_blast_share=0.5,
                               second_review_unfamiliar_share=None)
    run = make_run(lab_user, [{"predicted": "BLA"}] + [{"predicted": "NGS"}] * 3, site=site)
    services.review_cell(cell_id=run.cells.first().pk, user=lab_user)
    assert services.sign_off(run_id=run.pk, user=lab_user, reason="test").locked


def test_unfamiliar_cells_over_the_sites_limit_ask_a_second_sign_off_through_the_api(tree, lab_user, supervisor):
    site = Site.objects.create(name="Haematology D", second_review_unfamiliar_share=0.1)
    run = make_run(lab_user, [{"predicted": "LYT", "unfamiliar": True, "flags": ["unfamiliar: not like"]}] +
                   [{"predicted": "NGS"}] * 4, site=site)
    api = api_for(lab_user)
    api.post(f"/api/classified-cells/{run.cells.first().pk}/accept/", {}, format="json")
    refused = api.post(f"/api/classification-runs/{run.pk}/sign-off/", {}, format="json")
    assert refused.status_code == 409 and "Give a reason" in refused.json()["detail"]
    first = api.post(f"/api/classification-runs/{run.pk}/sign-off/", {"reason": "5 cells only"}, format="json")
    assert first.status_code == 200 and first.json()["awaiting_second_sign_off"] and not first.json()["locked"]
    assert first.json()["signoff_reason"] == "5 cells only"
    assert api.post(f"/api/classification-runs/{run.pk}/second-sign-off/").status_code == 409  # not a supervisor
    second = api_for(supervisor).post(f"/api/classification-runs/{run.pk}/second-sign-off/")
    assert second.status_code == 200 and second.json()["locked"] and second.json()["second_signed_off_by"] == "super"


def test_a_supervisor_sees_every_run_and_is_lab_staff(blasty, supervisor, client):
    other = user_in("other", LAB_STAFF)
    client.force_login(other)
    assert client.get(f"/analysis/runs/{blasty.pk}/").status_code == 404
    client.force_login(supervisor)
    assert client.get(f"/analysis/runs/{blasty.pk}/").status_code == 200
    assert ClassificationRun.objects.filter(pk=blasty.pk).exists()


def test_the_supervisor_role_is_made_by_migrate(db):
    assert Group.objects.filter(name=SUPERVISOR).exists()
