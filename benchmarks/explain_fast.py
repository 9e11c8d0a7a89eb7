"""Explanations of the shipped set within a second: faster IG and Occlusion settings beside the slow defaults.

    .venv/bin/python benchmarks/explain_fast.py [--cells 4] [--threads 2] [--defaults-only]

In a warm process (model loaded, one warm-up explanation), the shipped set's ROOT classifier explains demo PBC
cells with each setting; seconds per cell (median; the attribution alone and with the faithfulness check the page
adds), how close the fast picture is to the slow one's (the first setting of each method): the Spearman correlation
of the two maps (|attribution| pooled to 14 × 14 cells of 16 px) and the overlap (IoU) of their top 10 % pixels by
|attribution|; and how faithful each picture is to the network (median deletion and insertion areas,
hemoweb/ml/faithfulness.py) and the share of its positive evidence in the central quarter, where the cell is.
Writes benchmarks/results/explain_fast-cpu.{json,md} and a picture per method, the slow attribution beside the
fast ones (explain_fast-<method>.png). `--defaults-only` times each method's default settings alone (a short run
for a quiet moment) into benchmarks/results/explain_fast-cpu-defaults.{json,md}.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, hardware  # noqa: E402
from hemoweb.ml.explain import explain, side_by_side  # noqa: E402
from hemoweb.ml.weights import cached_model, read_set  # noqa: E402

SETTINGS = {  # the first of each method: the slow reference; the second: the default since issue 20
    "ig": [{"n_steps": 50}, {"n_steps": 8}, {"n_steps": 8, "baseline": "black"}, {"n_steps": 8, "baseline": "blurred"}],
    "occlusion": [{"window": 28, "stride": 14}, {"window": 56, "stride": 56},
                  {"window": 56, "stride": 56, "baseline": "mean"}],
    "gradcam": [{}],
}


def pooled(values: np.ndarray, cell: int = 16) -> np.ndarray:
    h, w = values.shape
    return np.abs(values).reshape(h // cell, cell, w // cell, cell).sum(axis=(1, 3)).ravel()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def top_overlap(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> float:
    k = int(share * a.size)
    top_a = set(np.argsort(-np.abs(a).ravel())[:k])
    top_b = set(np.argsort(-np.abs(b).ravel())[:k])
    return len(top_a & top_b) / len(top_a | top_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--defaults-only", action="store_true", help="only each method's default settings")
    args = parser.parse_args()
    table = {method: [{}] for method in SETTINGS} if args.defaults_only else SETTINGS
    stem = "explain_fast-cpu-defaults" if args.defaults_only else "explain_fast-cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = [round(float(v), 2) for v in np_load()]
    folder = REPO / "models" / "default"
    model, card = cached_model(folder / read_set(folder).nodes["ROOT"], "cpu")
    paths = sorted((REPO / "demo" / "pbc").rglob("*.jpg"))
    cells = [Image.open(paths[i * len(paths) // args.cells]).convert("RGB") for i in range(args.cells)]
    explain(model, cells[0], "ig", card=card, n_steps=4)  # warm-up: the server has done this before
    results, maps = {}, {}
    for method, options in table.items():
        reference = None
        for settings in options:
            seconds, alone, rho, iou, done = [], [], [], [], []
            for cell in cells:
                started = time.perf_counter()
                attribution = explain(model, cell, method, card=card, **settings)
                seconds.append(time.perf_counter() - started)
                alone.append(seconds[-1] - attribution.faithfulness_seconds)
                done.append(attribution)
            if reference is None:
                reference = done
            else:
                rho = [spearman(pooled(a.map), pooled(b.map)) for a, b in zip(done, reference, strict=True)]
                iou = [top_overlap(a.map, b.map) for a, b in zip(done, reference, strict=True)]
            label = ", ".join(f"{key} {value}" for key, value in attribution.settings.items()) or "layer"
            results[f"{method}: {label}"] = {
                "attribution_seconds_median": round(statistics.median(alone), 3),
                "seconds_median": round(statistics.median(seconds), 3), "seconds_max": round(max(seconds), 3),
                "deletion_auc_median": round(statistics.median(a.faithfulness["deletion_auc"] for a in done), 3),
                "insertion_auc_median": round(statistics.median(a.faithfulness["insertion_auc"] for a in done), 3),
                "central_share_median": round(statistics.median(a.summary()["central_share"] for a in done), 3),
                "passes": attribution.passes, "spearman_vs_default": round(statistics.median(rho), 3) if rho else None,
                "top10_iou_vs_default": round(statistics.median(iou), 3) if iou else None,
            }
            maps[(method, label)] = done[0]
            print(method, label, results[f"{method}: {label}"], flush=True)
        if len(options) > 1:
            picture(method, cells[0], [(label, att) for (m, label), att in maps.items() if m == method])
    payload = {"benchmark": "explain_fast", "hardware": {**hardware(), "torch_threads": torch.get_num_threads(),
                                                         "load_average_before": load_before,
                                                         "load_average": [round(float(v), 2) for v in np_load()]},
               "model": f"models/default ROOT ({card.architecture}, {card.input_size} px)",
               "cells": f"{args.cells} demo PBC cells (demo/pbc, evenly spread)", "results": results}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Explanations within a second (cpu)", "",
             f"{payload['hardware']['cpu']}, {payload['hardware']['cores']} cores, {torch.get_num_threads()} torch "
             f"threads, load average {load_before} before and {payload['hardware']['load_average']} after "
             "(1, 5, 15 min; the machine is shared). "
             f"{payload['model']}; {payload['cells']}; a warm process.", "",
             "| method and settings | attribution s (median) | with the faithfulness check | max s | passes | "
             "Spearman vs slow | top-10 % IoU vs slow | deletion area (lower better) | insertion area (higher better) | "
             "evidence in the centre |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['attribution_seconds_median']} | {row['seconds_median']} | {row['seconds_max']} | "
                     f"{row['passes']} | {row['spearman_vs_default'] or '(slow)'} | "
                     f"{row['top10_iou_vs_default'] or '(slow)'} | {row['deletion_auc_median']} | "
                     f"{row['insertion_auc_median']} | {row['central_share_median']} |")
    lines += ["", "Pictures: explain_fast-ig.png, explain_fast-occlusion.png (each row: the cell, the attribution, "
              "the overlay; first row the slow reference)."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def np_load():
    import os

    return np.asarray(os.getloadavg())


def picture(method: str, cell: Image.Image, rows: list) -> None:
    figures = [side_by_side(cell.resize((224, 224)), attribution.map, label) for label, attribution in rows]
    width, height = max(f.width for f in figures), sum(f.height for f in figures)
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for figure in figures:
        sheet.paste(figure, (0, y))
        y += figure.height
    ImageDraw.Draw(sheet)
    sheet.save(RESULTS / f"explain_fast-{method}.png")


if __name__ == "__main__":
    main()
