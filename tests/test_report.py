"""The printable report of a run: the lab's header, the flagged and changed cells with their images, the
reviewer's comment, the conventions used, and who reviewed and signed."""

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.analysis import report as report_module
from apps.analysis import services
from apps.analysis.models import ClassificationRun
from hemoweb.ml import counts

from .test_analysis_services import demo_zip, upload


@pytest.fixture
def run(tiny_model_set, lab_user):
    tiny_model_set.node_models.filter(node__code="MYE").update(threshold=1.01)  # myeloid cells stop: flagged
    return services.start_run(owner=lab_user, files=[upload(demo_zip(1))])


def _report(client, run) -> str:
    response = client.get(reverse("analysis:report", args=[run.pk]))
    assert response.status_code == 200
    return response.content.decode()


def test_the_report_carries_the_labs_header_from_the_setting(lab_client, run, settings):
    assert 'id="report-header"' not in _report(lab_client, run)  # no header set: none printed
    settings.HEMOWEB_REPORT_HEADER = ["City Hospital · Haematology laboratory", "1 Main Street, Springfield",
                                      "Tel. 555 0100"]
    html = _report(lab_client, run)
    start = html.index('id="report-header"')
    header = html[start:html.index("</header>", start)]
    assert "<strong>City Hospital · Haematology laboratory</strong>" in header
    assert header.index("1 Main Street, Springfield") < header.index("Tel. 555 0100")
    assert html.index('id="report-header"') < html.index("<h1>")


def test_the_report_header_setting_reads_lines_from_the_environment(monkeypatch):
    import importlib

    import hemoweb.settings as hemoweb_settings

    monkeypatch.setenv("REPORT_HEADER", "Lab A | Street 1|  | Town")
    try:
        assert importlib.reload(hemoweb_settings).HEMOWEB_REPORT_HEADER == ["Lab A", "Street 1", "Town"]
    finally:
        monkeypatch.delenv("REPORT_HEADER")
        importlib.reload(hemoweb_settings)


def test_flagged_and_changed_cells_are_printed_with_their_images(lab_client, run, lab_user):
    flagged = [cell for cell in run.cells.with_types() if cell.flags]
    plain = [cell for cell in run.cells.with_types() if not cell.flags]
    assert flagged and plain
    changed = plain[0]
    services.correct_cell(cell_id=changed.pk, code="BAS" if changed.final_type.code != "BAS" else "EOS",
                          user=lab_user)
    html = _report(lab_client, run)
    section = html[html.index('id="report-cells"'):html.index('id="report-comment"')]
    assert f"Flagged and changed cells ({len(flagged) + 1})" in section
    for cell in flagged + [changed]:
        assert f'src="{cell.image.url}"' in section
    for cell in plain[1:]:
        assert f'src="{cell.image.url}"' not in section  # neither flagged nor changed: not printed
    assert f"was {changed.predicted_type.code}, changed by tech" in section
    assert "Cells reviewed by</th><td><strong>tech</strong> (1 cell)</td>" in html


def test_a_long_list_of_cells_is_cut_with_a_pointer_to_the_csv(lab_client, run, monkeypatch):
    monkeypatch.setattr(report_module, "REPORT_CELLS", 2)
    n_flagged = run.cells.exclude(flags=[]).count()
    html = _report(lab_client, run)
    section = html[html.index('id="report-cells"'):html.index('id="report-comment"')]
    assert section.count("<img ") == 2 and f"And {n_flagged - 2} more: the CSV export lists every cell." in section


def test_the_reviewers_comment_and_every_signature_are_printed(lab_client, run, lab_user, curator):
    before = _report(lab_client, run)
    assert "No comment." in before and "not signed off" in before and "Cells reviewed by</th><td>nobody yet" in before
    signed, second = timezone.now(), timezone.now()
    curator.first_name, curator.last_name = "Ada", "Supervisor"
    curator.save()
    ClassificationRun.objects.filter(pk=run.pk).update(
        comment="Few cells on the smear.\nRepeat with a fresh sample.", locked=True, signed_off_by=lab_user,
        signed_off_at=signed, signoff_reason="Count target not reached: the smear had few cells.",
        second_signed_off_by=curator, second_signed_off_at=second, site_shift={"level": "warn", "message": "m"},
        shift_acknowledged_by=lab_user, shift_acknowledged_at=signed)
    html = _report(lab_client, run)
    comment = html[html.index('id="report-comment"'):html.index('id="report-signatures"')]
    assert "Few cells on the smear.<br>Repeat with a fresh sample." in comment
    signatures = html[html.index('id="report-signatures"'):]
    when = timezone.localtime(signed).strftime("%Y-%m-%d %H:%M")
    assert f"<strong>tech</strong> on {when}" in signatures
    assert "Count target not reached: the smear had few cells." in signatures
    assert f"Second sign-off</th><td><strong>Ada Supervisor</strong> on {when}" in signatures
    assert "Site-shift warning acknowledged</th><td><strong>tech</strong>" in signatures


def test_the_counting_convention_is_printed_when_the_differential_names_one(lab_client, run):
    html = _report(lab_client, run)
    conventions = html[html.index('id="report-conventions"'):html.index('id="report-cells"')]
    assert "Clopper–Pearson" in conventions
    convention = getattr(services.run_differential(run), "convention", None)
    if convention is None:
        pytest.skip("the differential names no counting convention yet")
    assert f"Counting convention: <strong>{convention.name}</strong>" in conventions
    assert convention.name == counts.counting_convention(run.specimen_type).name
