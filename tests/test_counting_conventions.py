"""Counting conventions by specimen type (issue 20, part 4): peripheral blood counts white cells and reports
nucleated red cells per 100 of them; bone marrow counts erythroid cells and gives the M:E ratio; unresolved
cells are one row "Unresolved (review)", never a lineage "All cells"."""

import pytest

from apps.analysis import services
from hemoweb.ml.counts import BONE_MARROW, PERIPHERAL_BLOOD, UNRESOLVED_NAME, counting_convention, differential
from hemoweb.ml.tree import CellTree
from tests.review_helpers import make_run

SAMPLE = ["NGS"] * 40 + ["LYT"] * 30 + ["MON"] * 10 + ["EOS"] * 5 + ["BAS"] * 5 + ["BLA"] * 10 + ["EBO"] * 7 + \
    ["PEB"] * 1 + ["PLT"] * 5 + ["KSC"] * 3


def rows(result) -> dict:
    return {row.code: row for row in result.types}


def test_peripheral_blood_counts_white_cells_and_reports_nucleated_red_cells_per_100_of_them():
    result = differential(CellTree.default(), SAMPLE, target=100, convention=PERIPHERAL_BLOOD)
    assert result.total == 116 and result.counted == 100  # erythroid cells, platelets and smudge cells left out
    by_code = rows(result)
    assert by_code["NGS"].percent == 40.0 and by_code["BLA"].percent == 10.0 and result.blast_percent == 10.0
    assert not by_code["EBO"].counted and by_code["EBO"].percent is None and by_code["EBO"].per_100_wbc == 7.0
    assert by_code["PEB"].per_100_wbc == 1.0 and by_code["NGS"].per_100_wbc is None
    assert result.nrbc == 8 and result.nrbc_per_100_wbc == 8.0
    assert not by_code["KSC"].counted and result.smudge == 3 and not by_code["PLT"].counted
    assert "ERY" not in {row.code for row in result.lineages}
    assert sum(row.n for row in result.lineages) == 100
    assert result.me_ratio is None  # a marrow measure
    assert result.convention.name.startswith("Peripheral blood") and "per 100 white cells" in \
        result.convention.description
    assert result.target_reached


def test_bone_marrow_counts_erythroid_cells_and_gives_the_me_ratio():
    result = differential(CellTree.default(), SAMPLE, target=200, convention=BONE_MARROW)
    assert result.counted == 108 and result.erythroid == 8
    by_code = rows(result)
    assert by_code["EBO"].counted and by_code["EBO"].percent == round(100 * 7 / 108, 2)
    assert by_code["EBO"].per_100_wbc is None and result.nrbc_per_100_wbc is None
    assert result.myeloid == 70 and result.me_ratio == pytest.approx(70 / 8)
    assert {row.code: row.n for row in result.lineages} == {"ERY": 8, "LYM": 30, "MYE": 70}
    assert result.as_dict()["me_ratio"] == 8.75 and result.as_dict()["convention"]["code"] == BONE_MARROW


def test_unresolved_cells_are_one_row_apart_and_never_a_lineage_all_cells():
    tree = CellTree.default()
    result = differential(tree, ["NGS"] * 3 + ["ROOT"], target=100, unresolved=["MYE", "MYE"])
    assert result.total == 6 and result.counted == 3
    assert result.unresolved.name == UNRESOLVED_NAME == "Unresolved (review)" and result.unresolved.n == 3
    assert not result.unresolved.counted and result.unresolved_at == {"MYE": 2, "ROOT": 1}
    assert [row.name for row in result.lineages] == ["Myeloid"]
    assert "All cells" not in [row.name for row in result.lineages + result.types]
    assert rows(result)["NGS"].percent == 100.0


def test_a_cell_left_at_an_inner_node_after_review_is_counted_there():
    result = differential(CellTree.default(), ["MYE", "MYE", "NGS", "LYT"], target=100)
    assert rows(result)["MYE"].percent == 50.0 and not rows(result)["MYE"].resolved and result.unresolved is None


def test_unfamiliar_cells_stay_in_the_white_cell_denominator():
    result = differential(CellTree.default(), ["NGS"] * 9 + ["EBO"], unfamiliar=1)
    assert result.counted == 10 and result.unfamiliar.percent == 10.0 and result.nrbc_per_100_wbc == 10.0


def test_the_result_keeps_its_old_keys_and_an_unknown_specimen_type_is_refused():
    old = {"total", "counted", "target", "target_progress", "types", "lineages", "myeloid", "erythroid", "me_ratio",
           "blasts", "blast_percent", "blast_ci", "unfamiliar"}
    as_dict = differential(CellTree.default(), ["NGS"]).as_dict()
    assert old <= set(as_dict) and {"convention", "nrbc_per_100_wbc", "unresolved", "smudge"} <= set(as_dict)
    with pytest.raises(ValueError, match="Unknown specimen type 'csf'"):
        counting_convention("csf")


# --- runs ---------------------------------------------------------------------------------------------------------

CELLS = [{"predicted": "EBO"}] * 2 + [{"predicted": "NGS"}] * 6 + [{"predicted": "LYT"}] * 2


def test_run_differential_follows_the_runs_specimen_type(tree, lab_user):
    blood = services.run_differential(make_run(lab_user, CELLS, specimen_type=PERIPHERAL_BLOOD))
    assert blood.counted == 8 and blood.nrbc_per_100_wbc == 25.0 and blood.me_ratio is None
    marrow = services.run_differential(make_run(lab_user, CELLS, specimen_type=BONE_MARROW))
    assert marrow.counted == 10 and marrow.me_ratio == pytest.approx(3.0)
    assert marrow.convention.code == BONE_MARROW


def test_an_unresolved_cell_leaves_unresolved_review_when_its_best_guess_is_accepted(tree, lab_user):
    run = make_run(lab_user, [
        {"predicted": "MYE", "guess": "EOS", "resolved": False, "flags": ["unsure at MYE"]},
        {"predicted": "ROOT", "guess": "LYT", "resolved": False, "flags": ["unsure at ROOT"]},
        {"predicted": "NGS"}, {"predicted": "NGS"},
    ])
    before = services.run_differential(run)
    assert before.unresolved.n == 2 and before.unresolved_at == {"MYE": 1, "ROOT": 1} and before.counted == 2
    assert "All cells" not in [row.name for row in before.lineages]
    cell = run.cells.get(predicted_type__code="MYE")
    services.review_cell(cell_id=cell.pk, user=lab_user, best_guess=True)
    after = services.run_differential(run)
    assert after.unresolved.n == 1 and after.counted == 3 and rows(after)["EOS"].counted
    assert services.run_summary(run).unresolved == 1


def test_the_run_page_and_report_say_which_convention_they_used(tree, lab_user, lab_client):
    blood = make_run(lab_user, CELLS)
    page = lab_client.get(f"/analysis/runs/{blood.pk}/").content.decode()
    assert "Peripheral blood: white-cell differential" in page and 'id="nrbc"' in page
    assert "25.0</strong> per 100 WBC" in page and "25.0 per 100 WBC" in page  # total and the EBO row
    marrow = make_run(lab_user, CELLS, specimen_type=BONE_MARROW)
    page = lab_client.get(f"/analysis/runs/{marrow.pk}/").content.decode()
    assert "Bone marrow: nucleated-cell differential" in page and "<strong>3.00</strong> (6 : 2)" in page
    report = lab_client.get(f"/analysis/runs/{marrow.pk}/report/").content.decode()
    assert "<strong>Bone marrow: nucleated-cell differential</strong>" in report
    assert "M:E ratio: 3.00 (6 : 2)" in report
