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


def choose_threshold(top_probabilities: Sequence[float], correct: Sequence[bool], min_coverage: float = 0.98) -> float:
    """The confidence threshold that maximises the accuracy of the cells it accepts while keeping at least
    `min_coverage` of them; the lowest such threshold (0 when refusing cells would not help)."""
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
