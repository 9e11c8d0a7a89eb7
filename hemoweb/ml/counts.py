"""The differential count of a classified sample: counts, percentages with exact 95 % intervals,
lineages, the M:E ratio and the blast percentage. Plain Python (no scipy, no Django).

Percentages are taken over the *counted* cells, by the specimen's counting convention (`Convention`):

- peripheral blood: the white cells. Nucleated red cells (the erythroid lineage: erythroblasts,
  proerythroblasts) are left out of the denominator and reported per 100 white cells; no M:E ratio.
- bone marrow: every nucleated cell, erythroid precursors included, and the myeloid : erythroid ratio.

In both, platelets, artefacts and smudge cells are listed with their numbers but left out of the
denominator, as in a manual differential, and so are cells the model stopped unsure above a type that
nobody has reviewed yet: they are one row, "Unresolved (review)", never a lineage (a cell at the root
is never counted as a lineage "All cells"). Cells the model set does not recognise (flagged unfamiliar,
not yet given a type by a technologist) get their own row, "Not a type this model knows", and are
counted: they are unknown white cells most of the time, and hiding them would raise every known type's
percentage (a sample of blasts would read as a normal differential).
"""

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from .tree import CellTree

NOT_COUNTED = ("PLT", "ART", "KSC")
UNFAMILIAR = "UNFAMILIAR"  # the row of cells awaiting review as unlike the set's training cells
UNFAMILIAR_NAME = "Not a type this model knows"  # its own row, counted in the denominator
UNRESOLVED = "UNRESOLVED"  # the row of cells the model stopped unsure above a type, awaiting review
UNRESOLVED_NAME = "Unresolved (review)"  # listed apart, not counted
MYELOID, ERYTHROID, BLASTS, SMUDGE = "MYE", "ERY", ("BLA",), "KSC"
PERIPHERAL_BLOOD, BONE_MARROW = "peripheral-blood", "bone-marrow"
COUNT_TARGETS = (100, 200, 400, 500)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p) = I_{1-p}(n-k, k+1)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return betainc(n - k, k + 1, 1.0 - p)


def _bisect(f, target: float, increasing: bool) -> float:
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if (f(middle) < target) == increasing:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@lru_cache(maxsize=65536)
def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact binomial (Clopper–Pearson) interval for k successes in n trials, as fractions.

    lower = Beta quantile(alpha/2; k, n-k+1), upper = Beta quantile(1-alpha/2; k+1, n-k), found by
    bisection on the regularized incomplete beta function.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie between 0 and n={n}")
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else _bisect(lambda p: betainc(k, n - k + 1, p), alpha / 2, increasing=True)
    upper = 1.0 if k == n else _bisect(lambda p: betainc(k + 1, n - k, p), 1.0 - alpha / 2, increasing=True)
    return lower, upper


@dataclass
class Row:
    code: str
    name: str
    n: int
    counted: bool
    percent: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    resolved: bool = True  # False for an inner node ("Myeloid, unresolved")
    per_100_wbc: float | None = None  # nucleated red cells in peripheral blood: per 100 white cells


@dataclass(frozen=True)
class Convention:
    """How a specimen type is counted: which cells make the denominator, and what is reported beside."""

    code: str
    name: str
    description: str
    erythroid_counted: bool  # bone marrow: erythroid precursors in the denominator, with the M:E ratio

    def as_dict(self) -> dict:
        return {"code": self.code, "name": self.name, "description": self.description}


CONVENTIONS = {
    PERIPHERAL_BLOOD: Convention(
        PERIPHERAL_BLOOD, "Peripheral blood: white-cell differential",
        "Percentages of the white cells counted. Nucleated red cells are reported per 100 white cells and left "
        "out of the denominator; platelets, artefacts, smudge cells and unresolved cells awaiting review are "
        "listed apart. Cells unlike the model's training cells are counted as white cells until reviewed.",
        erythroid_counted=False),
    BONE_MARROW: Convention(
        BONE_MARROW, "Bone marrow: nucleated-cell differential",
        "Percentages of all nucleated cells counted, erythroid precursors included, with the myeloid : erythroid "
        "(M:E) ratio; platelets, artefacts, smudge cells and unresolved cells awaiting review are listed apart. "
        "Cells unlike the model's training cells are counted until reviewed.",
        erythroid_counted=True),
}


def counting_convention(specimen_type: str) -> Convention:
    """The convention of a specimen type (peripheral-blood or bone-marrow)."""
    try:
        return CONVENTIONS[specimen_type]
    except KeyError:
        raise ValueError(f"Unknown specimen type {specimen_type!r}: one of {', '.join(CONVENTIONS)}.") from None


@dataclass
class Differential:
    total: int  # every classified cell
    counted: int  # the denominator of the percentages
    target: int
    types: list[Row] = field(default_factory=list)
    lineages: list[Row] = field(default_factory=list)
    myeloid: int = 0
    erythroid: int = 0
    blasts: int = 0
    blast_percent: float | None = None
    blast_ci: tuple[float, float] | None = None
    unfamiliar: Row | None = None  # unfamiliar cells awaiting review; None when there are none
    convention: Convention = CONVENTIONS[PERIPHERAL_BLOOD]
    unresolved: Row | None = None  # cells stopped unsure above a type, awaiting review; None when there are none
    unresolved_at: dict[str, int] = field(default_factory=dict)  # where those cells stopped: code -> n
    nrbc: int = 0  # nucleated red cells (the erythroid lineage)
    smudge: int = 0

    @property
    def awaiting_review(self) -> int:
        return self.unfamiliar.n if self.unfamiliar else 0

    @property
    def me_ratio(self) -> float | None:
        """Myeloid : erythroid nucleated cells, as one number: bone marrow only (None without erythroid cells)."""
        if not self.convention.erythroid_counted:
            return None
        return self.myeloid / self.erythroid if self.erythroid else None

    @property
    def nrbc_per_100_wbc(self) -> float | None:
        """Nucleated red cells per 100 white cells counted: peripheral blood only."""
        if self.convention.erythroid_counted or not self.counted:
            return None
        return round(100.0 * self.nrbc / self.counted, 2)

    @property
    def target_progress(self) -> float:
        return min(1.0, self.counted / self.target) if self.target else 1.0

    @property
    def target_reached(self) -> bool:
        return self.counted >= self.target

    def as_dict(self) -> dict:
        def rows(items):
            return [row.__dict__ for row in items]
        return {
            "total": self.total, "counted": self.counted, "target": self.target,
            "target_progress": round(self.target_progress, 4), "types": rows(self.types),
            "lineages": rows(self.lineages), "myeloid": self.myeloid, "erythroid": self.erythroid,
            "me_ratio": None if self.me_ratio is None else round(self.me_ratio, 3),
            "blasts": self.blasts, "blast_percent": self.blast_percent,
            "blast_ci": list(self.blast_ci) if self.blast_ci else None,
            "unfamiliar": self.unfamiliar.__dict__ if self.unfamiliar else None,
            "convention": self.convention.as_dict(), "specimen_type": self.convention.code,
            "unresolved": self.unresolved.__dict__ if self.unresolved else None, "unresolved_at": self.unresolved_at,
            "nrbc": self.nrbc, "nrbc_per_100_wbc": self.nrbc_per_100_wbc, "smudge": self.smudge,
        }


def is_counted(tree: CellTree, code: str) -> bool:
    return not any(tree.is_under(code, excluded) for excluded in NOT_COUNTED if excluded in tree)


def _percent(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    if not n:
        return None, None, None
    low, high = clopper_pearson(k, n)
    return round(100.0 * k / n, 2), round(100.0 * low, 2), round(100.0 * high, 2)


def _in_count(tree: CellTree, code: str, convention: Convention) -> bool:
    if not is_counted(tree, code):
        return False
    return convention.erythroid_counted or ERYTHROID not in tree or not tree.is_under(code, ERYTHROID)


def _under(tree: CellTree, code: str, ancestor: str) -> bool:
    return ancestor in tree and tree.is_under(code, ancestor)


def differential(tree: CellTree, codes: Iterable[str], target: int = 100, unfamiliar: int = 0,
                 unresolved: Iterable[str] = (), convention: Convention | str = PERIPHERAL_BLOOD) -> Differential:
    """Count the final cell types of one sample by the specimen's `convention`; codes may be inner nodes (cells a
    technologist left at an inner node).

    `unfamiliar` cells (not among `codes`) are awaiting review as unlike the set's training cells: their own
    row, in the denominator. `unresolved` are where the cells awaiting review as unsure stopped (not among
    `codes`): one row "Unresolved (review)", not counted; so is any cell at the tree's root."""
    convention = counting_convention(convention) if isinstance(convention, str) else convention
    per_code = Counter(codes)
    unresolved_at = Counter(unresolved)
    if per_code.get(tree.root):  # no type at all: never a lineage "All cells"
        unresolved_at[tree.root] += per_code.pop(tree.root)
    counted = sum(n for code, n in per_code.items() if _in_count(tree, code, convention)) + unfamiliar
    n_unresolved = sum(unresolved_at.values())
    result = Differential(total=sum(per_code.values()) + unfamiliar + n_unresolved, counted=counted, target=target,
                          convention=convention, unresolved_at=dict(unresolved_at))
    if unfamiliar:
        result.unfamiliar = Row(UNFAMILIAR, UNFAMILIAR_NAME, unfamiliar, True, *_percent(unfamiliar, counted),
                                resolved=False)
    if n_unresolved:
        result.unresolved = Row(UNRESOLVED, UNRESOLVED_NAME, n_unresolved, False, resolved=False)
    for code in tree.order:  # tree order keeps the table stable and lineages together
        n = per_code.get(code, 0)
        if not n:
            continue
        in_count = _in_count(tree, code, convention)
        percent, low, high = _percent(n, counted) if in_count else (None, None, None)
        row = Row(code, tree.names.get(code, code), n, in_count, percent, low, high, resolved=tree.is_leaf(code))
        if not convention.erythroid_counted and _under(tree, code, ERYTHROID) and counted:
            row.per_100_wbc = round(100.0 * n / counted, 2)
        result.types.append(row)
    per_lineage = Counter()
    for code, n in per_code.items():
        if _in_count(tree, code, convention):
            per_lineage[tree.lineage(code)] += n
    for code in tree.order:
        if per_lineage.get(code):
            percent, low, high = _percent(per_lineage[code], counted)
            result.lineages.append(Row(code, tree.names.get(code, code), per_lineage[code], True, percent, low, high))
    result.myeloid = sum(n for code, n in per_code.items() if _under(tree, code, MYELOID))
    result.erythroid = result.nrbc = sum(n for code, n in per_code.items() if _under(tree, code, ERYTHROID))
    result.smudge = sum(n for code, n in per_code.items() if _under(tree, code, SMUDGE))
    result.blasts = sum(n for code, n in per_code.items() if any(_under(tree, code, b) for b in BLASTS))
    if counted:
        result.blast_percent, low, high = _percent(result.blasts, counted)
        result.blast_ci = (low, high)
    return result
