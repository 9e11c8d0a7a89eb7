"""Classification metrics in plain Python: accuracy, balanced accuracy, macro-F1, per-class P/R/F1, confusion."""

from collections.abc import Sequence


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str] | None = None
) -> dict:
    """Metrics over `classes` (default: every true label). A prediction outside `classes` is simply wrong.

    Balanced accuracy is the mean recall over the classes that occur in `truth`; macro-F1 the mean F1
    over the same classes.
    """
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted differ in length")
    if classes is None:
        classes = sorted(set(truth))
    classes = list(classes)
    columns = classes + sorted(set(predicted) - set(classes))
    index = {code: i for i, code in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in classes]
    row_of = {code: i for i, code in enumerate(classes)}
    for t, p in zip(truth, predicted, strict=True):
        if t in row_of:
            matrix[row_of[t]][index[p]] += 1
    per_class = {}
    for i, code in enumerate(classes):
        tp = matrix[i][index[code]]
        support = sum(matrix[i])
        predicted_n = sum(row[index[code]] for row in matrix)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[code] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                           "support": support}
    present = [code for code in classes if per_class[code]["support"]]
    n = sum(sum(row) for row in matrix)
    correct = sum(matrix[i][index[code]] for i, code in enumerate(classes))
    return {
        "n": n,
        "accuracy": round(correct / n, 4) if n else 0.0,
        "balanced_accuracy": round(sum(per_class[c]["recall"] for c in present) / len(present), 4) if present else 0.0,
        "macro_f1": round(sum(per_class[c]["f1"] for c in present) / len(present), 4) if present else 0.0,
        "per_class": per_class,
        "confusion": {"labels": classes, "columns": columns, "matrix": matrix},
    }


# A node's top probability is never below chance (1 / its number of classes), so a threshold at or under
# chance can never flag a cell: the shipped set once had 0.00 at NEU. Whatever the validation cells say, a
# threshold is at least a third of the way from chance to certainty: 0.67 with 2 classes, 0.56 with 3, 0.50
# with 4. A third rather than a half: on a weak node (MYI, validation macro-F1 0.83) half would send most of
# its cells to review.
FLOOR_SHARE = 1 / 3


def threshold_floor(n_classes: int) -> float:
    """The lowest threshold a node of `n_classes` classes may have (FLOOR_SHARE of the way from chance to 1)."""
    chance = 1 / max(int(n_classes), 1)
    return round(chance + FLOOR_SHARE * (1 - chance), 4)


def choose_threshold(top_probabilities: Sequence[float], correct: Sequence[bool], min_coverage: float = 0.98,
                     n_classes: int | None = None) -> float:
    """The confidence threshold that maximises the accuracy of the cells it accepts while keeping at least
    `min_coverage` of them; the lowest such threshold (0 when refusing cells would not help), raised to
    `threshold_floor(n_classes)` when the node's number of classes is given."""
    floor = threshold_floor(n_classes) if n_classes else 0.0
    return max(floor, _best_threshold(top_probabilities, correct, min_coverage))


def _best_threshold(top_probabilities: Sequence[float], correct: Sequence[bool], min_coverage: float) -> float:
    pairs = sorted(zip(top_probabilities, correct, strict=True))
    n = len(pairs)
    if not n:
        return 0.0
    best_threshold, best_accuracy = 0.0, sum(c for _, c in pairs) / n
    correct_left = sum(c for _, c in pairs)
    max_drop = int(n * (1 - min_coverage) + 1e-9)
    for dropped in range(1, max_drop + 1):
        correct_left -= pairs[dropped - 1][1]
        accuracy = correct_left / (n - dropped)
        threshold = pairs[dropped][0]
        if accuracy > best_accuracy + 1e-9 and pairs[dropped][0] > pairs[dropped - 1][0]:
            best_threshold, best_accuracy = threshold, accuracy
    return float(best_threshold)
