"""Adapting a set to another lab: LISC (242 cells from a hospital in Tehran) with k labelled cells per type.

    .venv/bin/python benchmarks/adapt_lisc.py [--models models/default] [--k 5 10 20] [--seeds 0 1 2]
        [--mode heads] [--pbc-test 300] [--replay 400] [--name NAME]

No Django: the ML core alone (hemoweb/ml/adapt.py). For each k and seed, k cells of each LISC type (BAS EOS LYT
MON NEU) are drawn to adapt on and every other LISC cell is scored (balanced accuracy down the tree, refusals
counted as wrong, as evaluate_tree reports it; and forced 8-class balanced accuracy, no refusals). The set's
original test cells are the PBC test split (8/1/1 by sha256, seed 0), a fixed sample of `--pbc-test` of them to
save time; the replayed training cells and the familiarity threshold's validation cells come from PBC's train and
val splits. The settings (steps, learning rate, views, replay) were fixed before any run and never tuned on the
scored cells. Wall time is per adaptation (preparing, training, refitting familiarity; scoring excluded).

Writes benchmarks/results/adapt_lisc[-NAME].{json,md}.
"""

import argparse
import csv
import hashlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, write_result  # noqa: E402
from benchmarks.cross_lab import DATA, label_map, lisc, loader  # noqa: E402
from hemoweb.ml.adapt import AdaptConfig, LabCell, _score, adapt_set, split_lab_cells  # noqa: E402
from hemoweb.ml.data import assign_splits  # noqa: E402
from hemoweb.ml.infer import TreeClassifier  # noqa: E402
from hemoweb.ml.tree import CellTree  # noqa: E402


def pbc_splits() -> dict[str, list[tuple[Path, str]]]:
    mapping = label_map()
    with (DATA / "pbc" / "labels.csv").open() as handle:
        rows = [(DATA / "pbc" / row["path"], mapping[row["label"]]) for row in csv.DictReader(handle)]
    keys = [hashlib.sha256(path.read_bytes()).hexdigest() for path, _ in rows]
    splits = assign_splits(keys, [code for _, code in rows], seed=0)
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for row, split in zip(rows, splits, strict=True):
        out[split].append(row)
    return out


def sample(rows: list, n: int, seed: str) -> list:
    if n <= 0 or len(rows) <= n:
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/default")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mode", default="heads")
    parser.add_argument("--pbc-test", type=int, default=300)
    parser.add_argument("--replay", type=int, default=400)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tree = CellTree.default()
    source = REPO / args.models
    splits = pbc_splits()
    test = [(loader(p), c) for p, c in sample(splits["test"], args.pbc_test, "adapt-bench:test")]
    replay = [(loader(p), c) for p, c in splits["train"]]
    replay_val = [(loader(p), c) for p, c in sample(splits["val"], args.val, "adapt-bench:val")]
    cells = [LabCell(loader(p), c, group="") for p, c in lisc()]
    classifier = TreeClassifier(source, tree)
    started = time.perf_counter()
    pbc_before = _score(classifier, test)
    print("PBC test before", pbc_before["balanced_accuracy"], f"{time.perf_counter() - started:.0f} s", flush=True)
    runs = []
    work = Path(tempfile.mkdtemp(prefix="adapt-lisc-"))
    try:
        for k in args.k:
            for seed in args.seeds:
                adapt, aside = split_lab_cells(cells, per_type=k, seed=seed)
                lab_before = _score(classifier, [(c.load, c.label) for c in aside])
                timings: dict[str, float] = {}
                marks = {"start": time.perf_counter()}

                def callback(progress, marks=marks, timings=timings):
                    if progress.kind == "log" and progress.message.startswith("Scoring the adapted"):
                        timings["adaptation_s"] = round(time.perf_counter() - marks["start"], 1)

                report = adapt_set(source, work / f"k{k}-s{seed}", tree, cells=adapt, aside=aside, replay=replay,
                                   replay_val=replay_val, original_test=test,
                                   config=AdaptConfig(mode=args.mode, seed=seed, replay=args.replay),
                                   score_before={"lab": lab_before, "original_test": pbc_before}, callback=callback)
                shutil.rmtree(work / f"k{k}-s{seed}", ignore_errors=True)
                run = {"k": k, "seed": seed, "n_adapt": len(adapt), "n_scored": len(aside),
                       "adaptation_s": timings.get("adaptation_s"), "total_s": report["seconds"],
                       "lisc_before": report["before"]["lab"], "lisc_after": report["after"]["lab"],
                       "pbc_after": report["after"]["original_test"], "accepted": report["accepted"],
                       "reasons": report["reasons"]}
                runs.append(run)
                print(f"k {k} seed {seed}: LISC balanced accuracy {lab_before['balanced_accuracy']:.3f} -> "
                      f"{run['lisc_after']['balanced_accuracy']:.3f} (forced 8-class "
                      f"{run['lisc_after']['forced_coarse8_balanced_accuracy']:.3f}), PBC "
                      f"{pbc_before['balanced_accuracy']:.3f} -> {run['pbc_after']['balanced_accuracy']:.3f}, "
                      f"{run['adaptation_s']} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for k in args.k:
        chosen = [r for r in runs if r["k"] == k]

        def mean(key, part, chosen=chosen):
            values = [r[part][key] for r in chosen]
            return round(sum(values) / len(values), 4), round(min(values), 4), round(max(values), 4)

        summary[k] = {"lisc_balanced_accuracy": mean("balanced_accuracy", "lisc_after"),
                      "lisc_forced_8class_balanced_accuracy": mean("forced_coarse8_balanced_accuracy", "lisc_after"),
                      "lisc_before": mean("balanced_accuracy", "lisc_before"),
                      "pbc_balanced_accuracy": mean("balanced_accuracy", "pbc_after"),
                      "coverage": mean("coverage", "lisc_after"),
                      "adaptation_s": round(sum(r["adaptation_s"] or 0 for r in chosen) / len(chosen), 1),
                      "accepted": sum(r["accepted"] for r in chosen), "runs": len(chosen)}
    name = "adapt_lisc" + (f"-{args.name}" if args.name else "")
    settings = {"models": args.models, "mode": args.mode, "pbc_test_sample": len(test), "replay": args.replay,
                "val_sample": len(replay_val), "threads": args.threads, "config": vars(AdaptConfig(mode=args.mode))}
    path = write_result(name, {**settings, "pbc_before": pbc_before, "summary": summary, "runs": runs})
    lines = [f"# Adapting {args.models} to LISC ({path.stem})", "",
             f"Mode `{args.mode}`; k labelled LISC cells per type to adapt on, every other LISC cell scored; seeds "
             f"{args.seeds}; the original test cells: a fixed sample of {len(test)} PBC test cells (balanced accuracy "
             f"before {pbc_before['balanced_accuracy']:.3f}). Mean (min–max) over seeds.", "",
             "| k per type | LISC scored | LISC bal. acc. before | after | forced 8-class after | coverage | "
             "PBC test bal. acc. after | adaptation s | accepted |", "|---|---|---|---|---|---|---|---|---|"]
    for k, s in summary.items():
        scored = next(r["n_scored"] for r in runs if r["k"] == k)
        fmt = lambda t: f"{t[0]:.3f} ({t[1]:.3f}–{t[2]:.3f})"  # noqa: E731
        lines.append(f"| {k} | {scored} | {fmt(s['lisc_before'])} | {fmt(s['lisc_balanced_accuracy'])} | "
                     f"{fmt(s['lisc_forced_8class_balanced_accuracy'])} | {fmt(s['coverage'])} | "
                     f"{fmt(s['pbc_balanced_accuracy'])} | {s['adaptation_s']} | {s['accepted']}/{s['runs']} |")
    lines.append("")
    (RESULTS / f"{path.stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
