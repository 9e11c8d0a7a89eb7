"""The verification study's statistics on hand-made cells (hemoweb.ml.verification, no Django, no model)."""

import pytest

from hemoweb.ml.counts import clopper_pearson
from hemoweb.ml.infer import TreePrediction
from hemoweb.ml.tree import CellTree
from hemoweb.ml.verification import (UNRESOLVED, Criteria, LabelledCell, VerificationError, cohen_kappa, column_of,
                                     f1_with_interval, judge, score_study, select_cells)

TREE = CellTree.default()


def predictions(codes):
    return [TreePrediction(code=code, resolved=TREE.is_leaf(code), guess=code) for code in codes]


def study(labels, reported, **kwargs):
    return score_study(TREE, labels, predictions(reported), **kwargs)


def test_sensitivity_ppv_f1_and_their_exact_intervals_on_a_hand_made_confusion():
    # NGS: 8 right, 1 reported as MON, 1 stopped at MYE; MON: 6 right, 2 reported as NGS; LYT: 10 right
    labels = ["NGS"] * 10 + ["MON"] * 8 + ["LYT"] * 10
    reported = ["NGS"] * 8 + ["MON", "MYE"] + ["MON"] * 6 + ["NGS"] * 2 + ["LYT"] * 10
    r = study(labels, reported)
    ngs, mon = r["per_type"]["NGS"], r["per_type"]["MON"]
    assert (ngs["n"], ngs["tp"], ngs["fp"], ngs["fn"], ngs["reported"]) == (10, 8, 2, 2, 10)
    assert ngs["sensitivity"]["value"] == 0.8 and ngs["ppv"]["value"] == 0.8
    assert mon["sensitivity"]["value"] == 0.75 and mon["ppv"]["value"] == round(6 / 7, 4)
    assert mon["f1"]["value"] == round(2 * 6 / (2 * 6 + 1 + 2), 4)
    # Clopper-Pearson 8/10 (published: 0.4439-0.9748)
    assert ngs["sensitivity"]["ci"] == [0.4439, 0.9748]
    low, high = r["per_type"]["LYT"]["sensitivity"]["ci"]
    assert high == 1.0 and low == round(0.025 ** (1 / 10), 4)  # k = n: lower bound (alpha/2)^(1/n)
    assert r["agreement"]["value"] == round(24 / 28, 4)
    assert r["confusion"]["labels"] == ["LYT", "NGS", "MON"]  # tree order
    assert r["confusion"]["columns"] == ["LYT", "NGS", "MON", UNRESOLVED]
    assert r["confusion"]["matrix"] == [[10, 0, 0, 0], [0, 8, 1, 1], [0, 2, 6, 0]]


def test_kappa_against_the_hand_computed_value_and_its_undefined_case():
    table = {"labels": ["A", "B"], "columns": ["A", "B"], "matrix": [[20, 5], [10, 15]]}
    # po = 35/50 = 0.7; pe = (25*30 + 25*20) / 2500 = 0.5; kappa = 0.4
    assert cohen_kappa(table) == 0.4
    perfect = {"labels": ["A", "B"], "columns": ["A", "B"], "matrix": [[5, 0], [0, 5]]}
    assert cohen_kappa(perfect) == 1.0
    chance = {"labels": ["A", "B"], "columns": ["A", "B"], "matrix": [[5, 5], [5, 5]]}
    assert cohen_kappa(chance) == 0.0
    one_category = {"labels": ["A"], "columns": ["A"], "matrix": [[7]]}
    assert cohen_kappa(one_category) is None
    # categories only one rater used (unresolved) count in the expected agreement too
    extra = {"labels": ["A", "B"], "columns": ["A", "B", UNRESOLVED], "matrix": [[8, 0, 2], [0, 10, 0]]}
    expected = (10 * 8 + 10 * 10) / 400
    assert cohen_kappa(extra) == round((18 / 20 - expected) / (1 - expected), 4)


def test_f1_interval_is_the_exact_jaccard_interval_carried_through():
    result = f1_with_interval(tp=6, fp=1, fn=2)
    low, high = clopper_pearson(6, 9)
    assert result["value"] == round(12 / 15, 4)
    assert result["ci"] == [round(2 * low / (1 + low), 4), round(2 * high / (1 + high), 4)]
    assert result["ci"][0] < result["value"] < result["ci"][1]
    assert f1_with_interval(0, 0, 0) == {"value": None, "ci": [None, None]}


def test_a_cell_reported_below_its_label_is_right_one_that_stopped_above_is_unresolved():
    classes = ["NEU", "MON", "LYT"]
    assert column_of(TREE, "NEU", "NGS", classes) == "NEU"
    assert column_of(TREE, "NEU", "MYM", classes) == UNRESOLVED
    assert column_of(TREE, "MON", "NGB", classes) == "NEU"  # shown as the study type it falls under
    assert column_of(TREE, "LYT", "PMO", classes) == "PMO"  # no study type above it: itself


def test_acceptance_criteria_judge_only_types_with_enough_cells_and_blasts_more_strictly():
    per_type = {code: {"n": n, "sensitivity": {"value": value}}
                for code, n, value in (("NGS", 40, 0.92), ("BLA", 25, 0.93), ("MON", 5, 0.2))}
    verdicts, passed = judge(per_type, Criteria(min_sensitivity=0.90, min_n=20, per_type={"BLA": 0.95}))
    assert verdicts["NGS"]["passed"] is True and verdicts["NGS"]["minimum"] == 0.90
    assert verdicts["BLA"]["passed"] is False and verdicts["BLA"]["minimum"] == 0.95
    assert "0.930 < 0.95" in verdicts["BLA"]["reason"]
    assert verdicts["MON"]["judged"] is False and "n 5 < 20" in verdicts["MON"]["reason"]
    assert passed is False
    verdicts, passed = judge({"MON": per_type["MON"]}, Criteria())
    assert passed is False  # nothing judged: no pass


def cells(spec):
    return [LabelledCell(load=lambda: None, label=label, sha256=f"{label}-{i}") for label, n in spec
            for i in range(n)]


def test_bad_input_unknown_labels_types_with_one_cell_and_training_overlap_are_left_out_and_counted():
    given = cells([("NGS", 5), ("LYT", 4), ("BAS", 1), ("XYZ", 3)])
    selection = select_cells(TREE, given, training_sha256={"NGS-0", "NGS-1"})
    assert selection.unknown_labels == {"XYZ": 3}
    assert selection.too_few == {"BAS": 1}
    assert selection.training_overlap == 2
    assert sorted({cell.label for cell in selection.cells}) == ["LYT", "NGS"] and len(selection.cells) == 7
    assert "only 1 cell: a type needs at least 2" in selection.as_dict()["too_few"]["BAS"]["reason"]


def test_one_type_only_is_refused_saying_which_and_why():
    with pytest.raises(VerificationError, match=r"only NGS \(6 cells\)"):
        select_cells(TREE, cells([("NGS", 6)]))
    with pytest.raises(VerificationError, match=r"too few cells of LYT \(1\)"):
        select_cells(TREE, cells([("NGS", 6), ("LYT", 1)]))
    with pytest.raises(VerificationError, match="3 cells are training cells"):
        select_cells(TREE, cells([("NGS", 6), ("LYT", 3)]), training_sha256={"LYT-0", "LYT-1", "LYT-2"})


def test_differential_agreement_per_slide_with_limits_of_agreement_from_three_slides():
    labels, reported, groups = [], [], []
    for slide, wrong in (("s1", 0), ("s2", 1), ("s3", 2)):
        labels += ["NGS"] * 6 + ["LYT"] * 4
        reported += ["NGS"] * (6 - wrong) + ["LYT"] * wrong + ["LYT"] * 4
        groups += [slide] * 10
    r = study(labels, reported, groups=groups)
    d = r["differential"]
    assert d["n_groups"] == 3 and [g["group"] for g in d["groups"]] == ["s1", "s2", "s3"]
    assert [g["types"]["NGS"]["difference"] for g in d["groups"]] == [0.0, -10.0, -20.0]
    ngs = d["per_type"]["NGS"]
    assert ngs["bias"] == -10.0 and ngs["mean_abs_difference"] == 10.0 and ngs["sd"] == 10.0
    assert ngs["limits"] == [-29.6, 9.6]
    assert ngs["r"] is None  # the technologists counted 60 % on every slide: no correlation to tell
    assert d["groups"][2]["max_type"] in ("NGS", "LYT") and abs(d["groups"][2]["max_difference"]) == 20.0


def test_platelets_are_not_part_of_a_differential_and_no_groups_means_none():
    r = study(["NGS", "NGS", "PLT", "PLT"], ["NGS", "NGS", "PLT", "PLT"], groups=["a"] * 4)
    assert r["differential"]["groups"][0]["n"] == 2 and "PLT" not in r["differential"]["per_type"]
    assert study(["NGS", "NGS", "LYT", "LYT"], ["NGS"] * 4)["differential"]["n_groups"] == 0
