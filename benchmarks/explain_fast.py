"""Explanations of the shipped set within a second: faster IG and Occlusion settings beside the slow defaults.

    .venv/bin/python benchmarks/explain_fast.py [--cells 4] [--threads 2]

In a warm process (model loaded, one warm-up explanation), the shipped set's ROOT classifier explains demo PBC
cells with each setting; seconds per cell (median) and how faithful the fast picture is to the default's:
the Spearman correlation of the two maps (|attribution| pooled to 14 × 14 cells of 16 px) and the overlap (IoU) of
their top 10 % pixels by |attribution|. Writes benchmarks/results/explain_fast-cpu.{json,md} and a picture per
method, the default's attribution beside the fast one's (explain_fast-<method>.png).
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

SETTINGS = {
    "ig": [{"n_steps": 50}, {"n_steps": 8}, {"n_steps": 6}],
    "occlusion": [{"window": 28, "stride": 14}, {"window": 56, "stride": 42}, {"window": 56, "stride": 56}],
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = REPO / "models" / "default"
    model, card = cached_model(folder / read_set(folder).nodes["ROOT"], "cpu")
    paths = sorted((REPO / "demo" / "pbc").rglob("*.jpg"))
    cells = [Image.open(paths[i * len(paths) // args.cells]).convert("RGB") for i in range(args.cells)]
    explain(model, cells[0], "ig", card=card, n_steps=4)  # warm-up: the server has done this before
    results, maps = {}, {}
    for method, options in SETTINGS.items():
        reference = None
        for settings in options:
            seconds, rho, iou, done = [], [], [], []
            for index, cell in enumerate(cells):
                started = time.perf_counter()
                attribution = explain(model, cell, method, card=card, **settings)
                seconds.append(time.perf_counter() - started)
                done.append(attribution)
            if reference is None:
                reference = done
            else:
                rho = [spearman(pooled(a.map), pooled(b.map)) for a, b in zip(done, reference, strict=True)]
                iou = [top_overlap(a.map, b.map) for a, b in zip(done, reference, strict=True)]
            label = ", ".join(f"{key} {value}" for key, value in attribution.settings.items())
            results[f"{method}: {label}"] = {
                "seconds_median": round(statistics.median(seconds), 3), "seconds_max": round(max(seconds), 3),
                "passes": attribution.passes, "spearman_vs_default": round(statistics.median(rho), 3) if rho else None,
                "top10_iou_vs_default": round(statistics.median(iou), 3) if iou else None,
            }
            maps[(method, label)] = done[0]
            print(method, label, results[f"{method}: {label}"], flush=True)
        picture(method, cells[0], [(label, att) for (m, label), att in maps.items() if m == method])
    payload = {"benchmark": "explain_fast", "hardware": {**hardware(), "torch_threads": torch.get_num_threads(),
                                                         "load_average": [round(float(v), 2) for v in np_load()]},
               "model": f"models/default ROOT ({card.architecture}, {card.input_size} px)",
               "cells": f"{args.cells} demo PBC cells (demo/pbc, evenly spread)", "results": results}
    (RESULTS / "explain_fast-cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Explanations within a second (cpu)", "",
             f"{payload['hardware']['cpu']}, {payload['hardware']['cores']} cores, {torch.get_num_threads()} torch "
             f"threads, load average {payload['hardware']['load_average']} (the machine is shared). "
             f"{payload['model']}; {payload['cells']}; a warm process.", "",
             "| method and settings | s per cell (median) | max s | passes | Spearman vs default | top-10 % IoU vs default |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['seconds_median']} | {row['seconds_max']} | {row['passes']} | "
                     f"{row['spearman_vs_default'] or '(default)'} | {row['top10_iou_vs_default'] or '(default)'} |")
    lines += ["", "Pictures: explain_fast-ig.png, explain_fast-occlusion.png (each row: the cell, the attribution, "
              "the overlay; first row the default)."]
    (RESULTS / "explain_fast-cpu.md").write_text("\n".join(lines) + "\n")


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
