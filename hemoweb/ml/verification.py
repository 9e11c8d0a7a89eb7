"""A verification study: how well a model set agrees with a lab's own technologists, per cell type.

Before a lab uses an analyser for patients it verifies it on its own cells (ISO 15189 method verification):
its technologists label a few hundred cells and the analyser's agreement is measured per cell type, as the
published CellaVision, Sysmex DI-60 and Mindray MC-80 evaluations report it. Plain Python (no Django): it takes
labelled cells (an image loader, a tree code, the image's sha256, a slide or run) and returns the study's
numbers, so the same function serves the page, the command, the quality control of a site and an adaptation
curve (a set scored again after it learnt from some of the lab's cells).

What is compared. Each cell's reported type (where the tree walk stopped, as the lab sees it) against its
label. A cell is right when its reported type is its label or lies below it (a cell labelled NEU reported as
NGS is right). A cell that stopped above its label (unresolved) is wrong and has its own column; the coverage
and the selective accuracy (accuracy on the cells a lab would take without looking) stand beside. Any other
reported type is shown as the deepest type of the study it falls under, else as itself.

Per type: n, sensitivity (recall) and PPV (precision) with exact (Clopper–Pearson) 95 % intervals, and F1 with
the interval of the exact one for TP / (TP + FP + FN) carried through F1 = 2J / (1 + J) (a monotone map, so the
interval keeps its coverage). Overall: agreement (exact interval) and Cohen's kappa. Per slide or run, when the
cells carry one: the differential the analyser counts against the technologists' one, and per type over the
groups the bias, its 95 % limits of agreement (Bland–Altman) and Pearson's r.

Acceptance criteria (`Criteria`) give a pass or fail per type: sensitivity at least `min_sensitivity` (or the
type's own minimum, e.g. blasts 0.95) for every type with at least `min_n` cells; smaller types are reported
but not judged. The study passes when every judged type passes and at least one type was judged.
"""

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .counts import clopper_pearson, is_counted
from .evaluate import UNRESOLVED, classify_items, score_predictions
from .infer import TreeClassifier, TreePrediction
from .tree import CellTree
from .weights import read_card

MIN_CELLS_PER_TYPE = 2  # a type with fewer cells is skipped: no rate can be told from one cell
MIN_GROUPS_FOR_LIMITS = 3  # slides or runs needed for limits of agreement and a correlation


class VerificationError(ValueError):
    """The cells cannot make a study (too few types); the message says why, for a lab user."""


@dataclass(frozen=True)
class Criteria:
    """What a site accepts: sensitivity ≥ min_sensitivity for every type with n ≥ min_n (per_type overrides)."""

    min_sensitivity: float = 0.90
    min_n: int = 20
    per_type: dict[str, float] = field(default_factory=lambda: {"BLA": 0.95})

    def minimum(self, code: str) -> float:
        return self.per_type.get(code, self.min_sensitivity)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LabelledCell:
    """One cell of a study: its image (opened when needed), its label (a tree code), sha256 and slide or run."""

    load: Callable[[], object]
    label: str
    sha256: str = ""
    group: str = ""


@dataclass
class Selection:
    """The cells a study scores, and those it leaves out with the reason."""

    cells: list[LabelledCell]
    unknown_labels: dict[str, int] = field(default_factory=dict)  # labels the tree does not know: n cells
    too_few: dict[str, int] = field(default_factory=dict)  # types with fewer than MIN_CELLS_PER_TYPE cells
    training_overlap: int = 0  # cells that are training cells of the set (by sha256)

    def as_dict(self) -> dict:
        return {"unknown_labels": self.unknown_labels,
                "too_few": {code: {"n": n, "reason": f"only {n} cell{'s' if n != 1 else ''}: a type needs at least "
                                                     f"{MIN_CELLS_PER_TYPE}"} for code, n in self.too_few.items()},
                "training_overlap": self.training_overlap}


def select_cells(tree: CellTree, cells: Sequence[LabelledCell], training_sha256: set[str] | frozenset = frozenset(),
                 ) -> Selection:
    """Leave out cells with labels the tree does not know, the set's own training cells (by sha256) and types with
    fewer than MIN_CELLS_PER_TYPE cells; refuse when fewer than two types remain."""
    unknown = Counter(cell.label for cell in cells if cell.label not in tree)
    known = [cell for cell in cells if cell.label in tree]
    fresh = [cell for cell in known if not (cell.sha256 and cell.sha256 in training_sha256)]
    per_type = Counter(cell.label for cell in fresh)
    too_few = {code: n for code, n in per_type.items() if n < MIN_CELLS_PER_TYPE}
    kept = [cell for cell in fresh if cell.label not in too_few]
    selection = Selection(kept, dict(unknown), _in_tree_order(tree, too_few), len(known) - len(fresh))
    types = sorted({cell.label for cell in kept}, key=_order_key(tree))
    if len(types) < 2:
        reasons = []
        if selection.training_overlap:
            reasons.append(f"{selection.training_overlap} cells are training cells of the set and were left out")
        if too_few:
            reasons.append("too few cells of " + ", ".join(f"{code} ({n})" for code, n in too_few.items()))
        if unknown:
            reasons.append("labels the tree does not know: " + ", ".join(sorted(unknown)))
        having = f"only {types[0]} ({per_type[types[0]]} cells)" if types else "no cells to score"
        raise VerificationError(
            f"A verification study compares at least two cell types with at least {MIN_CELLS_PER_TYPE} cells each; "
            f"these cells have {having}{'; ' + '; '.join(reasons) if reasons else ''}.")
    return selection


def _order_key(tree: CellTree):
    return lambda code: (tree.order.index(code) if code in tree.order else len(tree.order), code)


def _in_tree_order(tree: CellTree, counts: dict[str, int]) -> dict[str, int]:
    return {code: counts[code] for code in sorted(counts, key=_order_key(tree))}


# --- comparing one cell --------------------------------------------------------------------------------


def column_of(tree: CellTree, label: str, reported: str, classes: Sequence[str]) -> str:
    """How a cell labelled `label` and reported as `reported` shows in the confusion matrix (rows: labels).

    Its label when it is right (reported at or below the label), UNRESOLVED when it stopped above its label,
    else the deepest study type the reported type lies under, else the reported type itself."""
    if reported not in tree:
        return reported
    path = tree.path(reported)
    if label in path:
        return label
    if reported in tree.path(label):
        return UNRESOLVED
    for code in reversed(path):
        if code in classes:
            return code
    return reported


def confusion(tree: CellTree, labels: Sequence[str], reported: Sequence[str], classes: Sequence[str]) -> dict:
    """{labels, columns, matrix}: rows the study's types, columns the types then what else was reported."""
    columns_of = [column_of(tree, label, code, classes) for label, code in zip(labels, reported, strict=True)]
    extra = sorted(set(columns_of) - set(classes), key=lambda code: (code == UNRESOLVED, _order_key(tree)(code)))
    columns = list(classes) + extra
    row, column = {code: i for i, code in enumerate(classes)}, {code: i for i, code in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in classes]
    for label, shown in zip(labels, columns_of, strict=True):
        matrix[row[label]][column[shown]] += 1
    return {"labels": list(classes), "columns": columns, "matrix": matrix}


# --- statistics -----------------------------------------------------------------------------------------


def proportion(k: int, n: int) -> dict:
    """k of n as {value, ci: [low, high]} (exact 95 % interval); value None when n is 0."""
    if not n:
        return {"value": None, "ci": [None, None]}
    low, high = clopper_pearson(k, n)
    return {"value": round(k / n, 4), "ci": [round(low, 4), round(high, 4)]}


def f1_with_interval(tp: int, fp: int, fn: int) -> dict:
    """F1 = 2TP / (2TP + FP + FN) with the exact interval of J = TP / (TP + FP + FN) mapped through 2J / (1 + J)."""
    n = tp + fp + fn
    if not n:
        return {"value": None, "ci": [None, None]}
    low, high = clopper_pearson(tp, n)
    return {"value": round(2 * tp / (2 * tp + fp + fn), 4),
            "ci": [round(2 * low / (1 + low), 4), round(2 * high / (1 + high), 4)]}


def cohen_kappa(table: dict) -> float | None:
    """Cohen's kappa of a confusion {labels, columns, matrix}, over the union of its rows' and columns' categories.

    (po - pe) / (1 - pe), po the observed agreement, pe the agreement expected from the two raters' marginals.
    None when pe is 1 (both raters used a single category: kappa is undefined)."""
    labels, columns, matrix = table["labels"], table["columns"], table["matrix"]
    n = sum(map(sum, matrix))
    if not n:
        return None
    rows = {code: sum(counts) for code, counts in zip(labels, matrix, strict=True)}
    cols = {code: sum(counts[j] for counts in matrix) for j, code in enumerate(columns)}
    observed = sum(matrix[i][columns.index(code)] for i, code in enumerate(labels)) / n
    expected = sum(rows.get(code, 0) * cols.get(code, 0) for code in set(rows) | set(cols)) / n ** 2
    if math.isclose(expected, 1.0):
        return None
    return round((observed - expected) / (1 - expected), 4)


def type_statistics(table: dict) -> dict[str, dict]:
    """Per study type: n, tp, fp, fn, reported n, sensitivity, PPV and F1, each with its 95 % interval."""
    labels, columns, matrix = table["labels"], table["columns"], table["matrix"]
    result = {}
    for i, code in enumerate(labels):
        j = columns.index(code)
        n, tp = sum(matrix[i]), matrix[i][j]
        reported = sum(counts[j] for counts in matrix)
        fp, fn = reported - tp, n - tp
        result[code] = {"n": n, "tp": tp, "fp": fp, "fn": fn, "reported": reported,
                        "sensitivity": proportion(tp, n), "ppv": proportion(tp, reported),
                        "f1": f1_with_interval(tp, fp, fn)}
    return result


def judge(per_type: dict[str, dict], criteria: Criteria) -> tuple[dict[str, dict], bool]:
    """({type: {minimum, judged, passed, reason}}, whether the study passes) under a site's criteria."""
    verdicts = {}
    for code, row in per_type.items():
        minimum, sensitivity = criteria.minimum(code), row["sensitivity"]["value"]
        if row["n"] < criteria.min_n:
            verdicts[code] = {"minimum": minimum, "judged": False, "passed": None,
                              "reason": f"n {row['n']} < {criteria.min_n}: reported, not judged"}
            continue
        passed = sensitivity is not None and sensitivity >= minimum
        verdicts[code] = {"minimum": minimum, "judged": True, "passed": passed,
                          "reason": f"sensitivity {sensitivity:.3f} {'≥' if passed else '<'} {minimum:.2f}"}
    judged = [verdict for verdict in verdicts.values() if verdict["judged"]]
    return verdicts, bool(judged) and all(verdict["passed"] for verdict in judged)


def differential_agreement(tree: CellTree, labels: Sequence[str], shown: Sequence[str], groups: Sequence[str],
                           classes: Sequence[str]) -> dict:
    """Per slide or run: the analyser's differential (% per type) against the technologists', over the cells of
    counted types (platelets, artefacts and smudge cells are not part of a differential); per type over the groups:
    mean |difference|, bias, 95 % limits of agreement and Pearson's r (from MIN_GROUPS_FOR_LIMITS groups)."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        if group and is_counted(tree, labels[index]):
            members.setdefault(group, []).append(index)
    counted = [code for code in classes if is_counted(tree, code)]
    rows = []
    for group in sorted(members):
        indices = members[group]
        n = len(indices)
        manual, analyser = Counter(labels[i] for i in indices), Counter(shown[i] for i in indices)
        types = {code: {"manual": round(100 * manual[code] / n, 2), "analyser": round(100 * analyser[code] / n, 2),
                        "difference": round(100 * (analyser[code] - manual[code]) / n, 2)} for code in counted}
        worst = max(counted, key=lambda code: abs(types[code]["difference"]))
        rows.append({"group": group, "n": n, "types": types, "max_difference": types[worst]["difference"],
                     "max_type": worst,
                     "agreement": round(sum(shown[i] == labels[i] for i in indices) / n, 4)})
    per_type = {}
    for code in counted:
        differences = [row["types"][code]["difference"] for row in rows]
        if not differences:
            continue
        summary = {"mean_abs_difference": round(sum(map(abs, differences)) / len(differences), 2),
                   "bias": round(sum(differences) / len(differences), 2)}
        if len(rows) >= MIN_GROUPS_FOR_LIMITS:
            mean = sum(differences) / len(differences)
            sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
            summary.update(sd=round(sd, 2), limits=[round(mean - 1.96 * sd, 2), round(mean + 1.96 * sd, 2)],
                           r=_pearson([row["types"][code]["manual"] for row in rows],
                                      [row["types"][code]["analyser"] for row in rows]))
        per_type[code] = summary
    return {"n_groups": len(rows), "groups": rows, "per_type": per_type}


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r (scipy); None when either side does not vary."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import pearsonr

    return round(float(pearsonr(x, y).statistic), 4)


# --- the study ------------------------------------------------------------------------------------------


def score_study(tree: CellTree, labels: Sequence[str], predictions: Sequence[TreePrediction], *,
                groups: Sequence[str] | None = None, criteria: Criteria | None = None,
                outputs: set[str] | None = None) -> dict:
    """The study's numbers for predictions already made (labels: tree codes, every type with ≥ 2 cells).

    `outputs`, the codes the set can report, lists the study's types the set can never give (all their cells
    count as wrong, as they would in use)."""
    criteria = criteria or Criteria()
    classes = sorted(set(labels), key=_order_key(tree))
    reported = [prediction.code for prediction in predictions]
    table = confusion(tree, labels, reported, classes)
    per_type = type_statistics(table)
    verdicts, passed = judge(per_type, criteria)
    right = sum(per_type[code]["tp"] for code in classes)
    n = len(labels)
    evaluated = score_predictions(tree, labels, predictions)
    forced = sum(column_of(tree, label, p.guess or p.code, classes) == label
                 for label, p in zip(labels, predictions, strict=True))
    shown = [column_of(tree, label, code, classes) for label, code in zip(labels, reported, strict=True)]
    result = {
        "n": n,
        "classes": classes,
        "per_type": per_type,
        "confusion": table,
        "agreement": proportion(right, n),
        "kappa": cohen_kappa(table),
        "forced_agreement": round(forced / n, 4) if n else None,
        **{key: evaluated[key] for key in ("coverage", "selective_accuracy", "selective_n", "flagged_share",
                                           "unfamiliar_share", "risk_coverage")},
        "differential": differential_agreement(tree, labels, shown, groups or [""] * n, classes),
        "criteria": criteria.as_dict(),
        "verdicts": verdicts,
        "passed": passed,
    }
    if outputs is not None:
        result["cannot_report"] = [code for code in classes
                                   if not any(out in tree and tree.is_under(out, code) for out in outputs)]
    return result


def reportable_codes(classifier: TreeClassifier) -> set[str]:
    """Every code the set can report: the classes of its nodes, what they resolve to, and the root."""
    codes = {classifier.tree.root}
    for path in classifier.node_files.values():
        card = read_card(path)
        codes.update(card.classes)
        codes.update(card.resolves_to.values())
    return codes


def verify_cells(classifier: TreeClassifier, cells: Sequence[LabelledCell], *, criteria: Criteria | None = None,
                 training_sha256: set[str] | frozenset = frozenset(),
                 progress: Callable[[int, int], None] | None = None, chunk: int = 128,
                 stated_um_per_px: float | None = None) -> dict:
    """Classify the cells with the set and return the study's numbers, with what was left out and why."""
    selection = select_cells(classifier.tree, cells, training_sha256)
    total = len(selection.cells)
    report = (lambda done: progress(done, total)) if progress else None
    predictions, scale = classify_items(classifier, [cell.load for cell in selection.cells], chunk=chunk,
                                        progress=report, stated_um_per_px=stated_um_per_px)
    result = score_study(classifier.tree, [cell.label for cell in selection.cells], predictions,
                         groups=[cell.group for cell in selection.cells], criteria=criteria,
                         outputs=reportable_codes(classifier))
    result["left_out"] = selection.as_dict()
    result["n_given"] = len(cells)
    result["second_look"] = classifier.second_look
    result["scale"] = scale.as_dict() if scale else {}
    return result
