"""Which annotated white cells become cells of a slide run, and which cells of the run are not white cells.

    .venv/bin/python benchmarks/slide_recall.py [--models models/default] [--sets demo bccd-test lisc]

Each set of annotated fields is analysed as one slide run (`slides.slide_from_source`, the path of the page, the API
and `manage.py analyse_slide`) with the shipped detector and model set, in a throw-away database. A run cell
*matches* an annotated white cell of its field when their boxes overlap with IoU ≥ 0.5 or the run cell's centre lies
inside the annotated box. Reported per set:

- recall: the share of annotated white cells matched by a cell of the run (fields skipped by the run, e.g. as
  duplicates of another field, are left out of the denominator and counted apart);
- not white: the share of the run's cells that match no annotated white cell.

The sets:
- `demo`: the 10 shipped BCCD fields (demo/bccd; the detector's own lab, some of them in its training split);
- `bccd-test`: the 72 fields of BCCD's test split (../shared/data/bccd; own lab, never trained on);
- `lisc`: the 242 LISC fields (../shared/data/lisc, Tehran, another microscope, camera and stain: a development
  window kept aside, never trained on). LISC labels ONE white cell per field (`fields/boxes.csv`, from the expert
  masks); other white cells on a field are not labelled, so a run cell matching nothing there is not necessarily
  a false one: its share is an upper bound.
The unmatched run cells of each set are saved as a contact sheet (benchmarks/results/slide_recall-SET-unmatched.jpg,
numbered as in the JSON's `unmatched`) for a person to look at.

Nothing is tuned here: the detector's own thresholds (its card) are used as shipped. `--standardise` runs with
SLIDE_STANDARDISE on (fields white balanced and resampled to the detector's training fields, hemoweb.ml.fields).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from benchmarks.common import hardware  # noqa: E402
from benchmarks.slide_throughput import prepared_environment  # noqa: E402


def matches(cell, truth) -> bool:
    """A run cell's box is the annotated white cell's (called where Django is set up)."""
    from apps.analysis.slides import box_iou

    cx, cy = (cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2
    return box_iou(cell, truth) >= 0.5 or (truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3])


def voc_white(root: Path, split: str | None) -> dict[str, list[list[float]]]:
    """field file name → annotated white-cell boxes, from a VOC folder (optionally one split)."""
    from hemoweb.ml import detect as ml

    result = ml.read_voc(root)
    return {Path(image.name).name: [[b.x1, b.y1, b.x2, b.y2] for b in image.boxes if b.label == "WBC"]
            for image in result.images if split is None or image.split == split}


def lisc_white() -> dict[str, list[list[float]]]:
    with open(SHARED / "lisc" / "fields" / "boxes.csv") as handle:
        return {row["path"].removeprefix("fields/"): [[float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]]
                for row in csv.DictReader(handle)}


def gather(name: str, work: Path) -> tuple[Path, dict[str, list[list[float]]]]:
    """The set's fields in one folder (names as the run will know them) and their annotated white cells."""
    folder = work / name
    folder.mkdir()
    if name == "demo":
        root = REPO / "demo" / "bccd" / "BCCD"
        truth = voc_white(root, None)
        source = root / "JPEGImages"
    elif name == "bccd-test":
        root = SHARED / "bccd" / "BCCD"
        truth = voc_white(root, "test")
        source = root / "JPEGImages"
    else:
        truth = lisc_white()
        source = SHARED / "lisc" / "fields"
    for relative in truth:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / relative, target)
    return folder, truth


def score(name: str, folder: Path, truth: dict, models: Path) -> dict:
    """One slide run over the set's fields, scored against the annotations (run in a child process)."""
    import django

    django.setup()
    from apps.analysis import slides

    run = slides.slide_from_source(source=folder, models=str(models))
    assert run.status == "succeeded", run.error
    annotated = found = cells = not_white = 0
    skipped, unmatched = [], []
    for field in run.fields.order_by("index"):
        boxes = truth.get(field.original_name, [])
        if not field.image:  # skipped whole (a duplicate or an unreadable file): left out, listed
            skipped.append([field.original_name, field.error])
            continue
        mine = [box["box"] for box in field.boxes if box.get("cell")]
        annotated += len(boxes)
        found += sum(any(matches(cell, t) for cell in mine) for t in boxes)
        cells += len(mine)
        for cell in mine:
            if not any(matches(cell, t) for t in boxes):
                not_white += 1
                unmatched.append([str(folder / field.original_name), cell])
    return {"set": name, "run_cells": run.cells.count(), "fields": run.fields.count(), "fields_skipped": skipped,
            "annotated_white": annotated, "matched": found,
            "recall": round(found / annotated, 4) if annotated else None,
            "cells_scored": cells, "not_white": not_white,
            "not_white_share": round(not_white / cells, 4) if cells else None, "unmatched": unmatched,
            "scale": (run.scale or {}).get("run"), "slide": slides.slide_summary(run)}


SHOWN = 200  # unmatched cells on the contact sheet and in the JSON (all of them are counted)


def contact_sheet(unmatched: list, out: Path, side: int = 128, columns: int = 10, most: int = SHOWN) -> None:
    """The first `most` unmatched cells, numbered as in the JSON."""
    from PIL import Image, ImageDraw

    unmatched = unmatched[:most]
    if not unmatched:
        return
    rows = -(-len(unmatched) // columns)
    sheet = Image.new("RGB", (columns * side, rows * side), "white")
    for number, (path, box) in enumerate(unmatched):
        image = Image.open(path).convert("RGB")
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half = max(box[2] - box[0], box[3] - box[1]) * 0.8
        crop = image.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))).resize((side, side))
        ImageDraw.Draw(crop).text((3, 3), str(number), fill=(255, 255, 0))
        sheet.paste(crop, ((number % columns) * side, (number // columns) * side))
    sheet.save(out, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--sets", nargs="+", default=["demo", "bccd-test", "lisc"])
    parser.add_argument("--standardise", action="store_true",
                        help="Detect on fields standardised to the detector's training fields (SLIDE_STANDARDISE).")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.resolve()
    if args.part:
        truth = json.loads((args.folder.parent / f"{args.part}-truth.json").read_text())
        print(json.dumps(score(args.part, args.folder, truth, models)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="hemoweb-slide-recall-"))
    env = {**prepared_environment(work), "SLIDE_STANDARDISE": "1" if args.standardise else "0"}
    suffix = "-standardised" if args.standardise else ""
    load_before = os.getloadavg()
    results = []
    for name in args.sets:
        folder, truth = gather(name, work)
        (work / f"{name}-truth.json").write_text(json.dumps(truth))
        process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--part", name, "--folder",
                                  str(folder), "--models", str(models)], env=env, cwd=REPO, capture_output=True,
                                 text=True)
        if process.returncode != 0:
            raise RuntimeError(process.stderr[-3000:])
        result = json.loads([line for line in process.stdout.splitlines() if line.startswith("{")][-1])
        print(json.dumps({k: v for k, v in result.items() if k not in ("unmatched", "slide")}), flush=True)
        contact_sheet(result["unmatched"], RESULTS / f"slide_recall{suffix}-{name}-unmatched.jpg")
        result["unmatched_n"] = len(result["unmatched"])
        result["unmatched"] = [[Path(path).relative_to(folder).as_posix(), box]
                               for path, box in result["unmatched"][:SHOWN]]  # the contact sheet's, numbered alike
        results.append(result)
    report = {
        "benchmark": "slide_recall", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {**hardware(), "load_average_before": [round(v, 2) for v in load_before]},
        "models": models.name, "detector": "models/detector/bccd-yolov8n (shipped, its card's thresholds)",
        "standardise": args.standardise,
        "match": "IoU >= 0.5 or the run cell's centre inside the annotated box",
        "targets": "other labs' fields: >= 95 % of the annotated white cells become cells of the run, <= 3 % of the "
                   "run's cells are not white cells",
        "sets": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"slide_recall{suffix}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)


def markdown(report: dict) -> str:
    hw = report["hardware"]
    lines = [f"# slide_recall {report['date']}", "",
             f"Hardware: {hw['cpu']}, {hw['cores']} cores. Models: {report['models']}; detector {report['detector']}; "
             f"fields standardised to the detector's training fields: {'yes' if report['standardise'] else 'no'}.",
             f"Match: {report['match']}. Targets: {report['targets']}.", "",
             "| set | fields (skipped) | annotated white | matched | recall | run cells | not matched | share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["sets"]:
        recall = f"{r['recall']:.1%}" if r["recall"] is not None else "–"
        share = f"{r['not_white_share']:.1%}" if r["not_white_share"] is not None else "–"
        lines.append(f"| {r['set']} | {r['fields']} ({len(r['fields_skipped'])}) | {r['annotated_white']} | "
                     f"{r['matched']} | {recall} | {r['cells_scored']} | {r['not_white']} | {share} |")
    lines += ["", "LISC labels one white cell per field: its unmatched share is an upper bound on cells that are not "
              "white cells (see slide_recall-lisc-unmatched.jpg; every set's unmatched cells: "
              "slide_recall-SET-unmatched.jpg)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
