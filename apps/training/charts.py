"""Loss curves as inline SVG data, computed on the server (no JavaScript, no CDN)."""

WIDTH, HEIGHT, PAD = 320, 140, 24


def loss_curves(history: dict[str, list[dict]]) -> list[dict]:
    """One chart per node: polyline points for train and validation loss over epochs."""
    charts = []
    for node, epochs in history.items():
        if not epochs:
            continue
        values = [e.get(k) or 0.0 for e in epochs for k in ("train_loss", "val_loss")]
        top = max(values) or 1.0
        last = max(len(epochs) - 1, 1)

        def points(key: str) -> str:
            return " ".join(
                f"{PAD + (WIDTH - 2 * PAD) * i / last:.1f},{HEIGHT - PAD - (HEIGHT - 2 * PAD) * (e.get(key) or 0) / top:.1f}"
                for i, e in enumerate(epochs))

        charts.append({"node": node, "train": points("train_loss"), "val": points("val_loss"), "top": round(top, 3),
                       "epochs": len(epochs), "last": epochs[-1], "width": WIDTH, "height": HEIGHT,
                       "bottom": HEIGHT - PAD, "right": WIDTH - PAD, "pad": PAD})
    return charts


def confusion_rows(confusion: dict) -> list[dict]:
    """Rows of a confusion matrix for an HTML heat map: each cell's count, column, shade (0–100, its share of the
    row), the colour's opacity, and whether it is the diagonal (right)."""
    rows = []
    for label, counts in zip(confusion.get("labels", []), confusion.get("matrix", []), strict=False):
        total = sum(counts) or 1
        rows.append({"label": label, "cells": [{"n": n, "column": column, "shade": round(100 * n / total),
                                                "alpha": round(0.6 * n / total, 3), "diag": column == label}
                                               for n, column in zip(counts, confusion.get("columns", []), strict=False)]})
    return rows
