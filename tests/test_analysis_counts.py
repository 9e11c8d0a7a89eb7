"""The differential count and its exact binomial intervals (plain functions, no database)."""

import pytest

from hemoweb.ml.counts import binom_cdf, clopper_pearson, differential
from hemoweb.ml.tree import CellTree


@pytest.mark.parametrize("k, n, low, high", [
    # reference values: scipy.stats.beta.ppf / R binom.test(k, n)$conf.int
    (5, 100, 0.016431879, 0.112834911),
    (0, 100, 0.0, 0.036216693),
    (50, 100, 0.398321130, 0.601678870),
    (10, 10, 0.691502892, 1.0),
    (1, 2, 0.012579117, 0.987420883),
    (3000, 10000, 0.291027611, 0.309088997),
])
def test_clopper_pearson_matches_reference_values(k, n, low, high):
    got = clopper_pearson(k, n)
    assert got[0] == pytest.approx(low, abs=1e-7)
    assert got[1] == pytest.approx(high, abs=1e-7)


def test_binomial_cdf_is_exact_for_small_cases():
    assert binom_cdf(1, 3, 0.5) == pytest.approx(0.5)
    assert binom_cdf(0, 4, 0.25) == pytest.approx(0.75**4)
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)


def test_differential_counts_percentages_lineages_me_ratio_and_blasts():
    tree = CellTree.default()
    codes = ["NGS"] * 40 + ["MYB"] * 10 + ["BLA"] * 5 + ["EBO"] * 20 + ["PEB"] * 5 + ["LYT"] * 20 + ["PLT"] * 7 + ["MYE"] * 0
    result = differential(tree, codes, target=200, convention="bone-marrow")
    assert result.total == 107 and result.counted == 100  # platelets are listed, not counted
    by_code = {row.code: row for row in result.types}
    assert by_code["NGS"].percent == 40.0 and by_code["PLT"].percent is None and not by_code["PLT"].counted
    assert (by_code["BLA"].ci_low, by_code["BLA"].ci_high) == (1.64, 11.28)
    lineages = {row.code: row.n for row in result.lineages}
    assert lineages == {"ERY": 25, "LYM": 20, "MYE": 55}
    assert result.myeloid == 55 and result.erythroid == 25 and result.me_ratio == pytest.approx(2.2)
    assert result.blasts == 5 and result.blast_percent == 5.0 and result.blast_ci == (1.64, 11.28)
    assert result.target_progress == 0.5 and not result.target_reached


def test_unresolved_cells_count_at_their_inner_node_and_no_erythroid_means_no_ratio():
    tree = CellTree.default()
    result = differential(tree, ["MYE", "MYE", "NGS", "LYT"], target=100)
    mye = next(row for row in result.types if row.code == "MYE")
    assert mye.n == 2 and not mye.resolved and mye.percent == 50.0
    assert result.me_ratio is None
    assert differential(tree, [], 100).blast_percent is None
