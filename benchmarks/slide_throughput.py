"""A 50-field slide end to end on this machine: `manage.py analyse_slide` from process start to exit.

    .venv/bin/python benchmarks/slide_throughput.py [--fields 50] [--models models/default]

The slide: the 10 shipped BCCD fields (demo/bccd, 640×480) repeated, each copy with a small perturbation (a few
pixels changed, re-encoded as JPEG at quality 95) so that every field has its own sha256 and none is skipped as a
duplicate. Into a throw-away SQLite database and media folder with the shipped detector and model set registered
(`install_shipped_models`; the ONNX export is made once before timing, as a server has it cached):

- end to end: `python manage.py analyse_slide FOLDER --csv OUT --json OUT`, wall and CPU seconds from the process
  start to its exit (imports, Django, loading the detector and the set, decoding, detection, crops, classification,
  rows and files stored, the CSV and the JSON);
- where the time goes: `analyse_slide` called in a process of its own with its clock (detection, waiting for
  crops, the tree, the database).

Target (issue 17): a 50-field slide in ≤ 60 s on this 2-core CPU.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FIELDS = REPO / "demo" / "bccd" / "BCCD" / "JPEGImages"
sys.path.insert(0, str(REPO))
from benchmarks.common import hardware  # noqa: E402


def perturbed_slide(target: Path, n_fields: int) -> Path:
    """`n_fields` copies of the demo fields, each with a few pixels changed (its own sha256)."""
    from PIL import Image

    names = sorted(FIELDS.glob("*.jpg"))
    target.mkdir(parents=True, exist_ok=True)
    for number in range(n_fields):
        image = Image.open(names[number % len(names)]).convert("RGB")
        for k in range(4):
            image.putpixel(((number * 7 + k) % image.width, k), (number % 256, k * 40, 255 - number % 256))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        (target / f"field_{number:03d}.jpg").write_bytes(buffer.getvalue())
    return target


def prepared_environment(work: Path) -> dict:
    """A throw-away database and media folder with the tree, the shipped detector and model set registered."""
    env = {**os.environ, "SQLITE_PATH": str(work / "bench.sqlite3"), "MEDIA_ROOT": str(work / "media"),
           "DJANGO_SETTINGS_MODULE": "hemoweb.settings", "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    for command in (["migrate", "-v0"], ["seed_cell_tree"], ["install_shipped_models"]):
        subprocess.run([sys.executable, "manage.py", *command], env=env, cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return env


def child(argv: list[str], env: dict) -> dict:
    """Run a command in its own process: its last JSON line (if any), wall seconds, the last lines it printed."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return {**(json.loads(lines[-1]) if lines else {}), "wall_s": round(wall, 2), "stdout": out.splitlines()[-4:]}


def service_clock(folder: Path, models: Path) -> dict:
    """analyse_slide in this process with its clock."""
    import django

    django.setup()
    from apps.analysis import slides

    timings: dict = {}
    started = time.perf_counter()
    run = slides.slide_from_source(source=folder, models=str(models), timings=timings)
    total = time.perf_counter() - started
    assert run.status == "succeeded", run.error
    return {"part": "analyse_slide in process", "fields": run.n_done, "cells": run.cells.count(),
            "seconds": round(total, 2), "engine": run.engine, **{f"{k}_s": round(v, 2) for k, v in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=50)
    parser.add_argument("--models", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--part", choices=["service"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.resolve()
    if args.part == "service":
        print(json.dumps(service_clock(args.folder, models)), flush=True)
        return

    from hemoweb.ml.engine import cached_export
    from hemoweb.ml.weights import load_backbone, load_model, read_set

    card = read_set(models)  # the ONNX export once, before timing (cached beside the set)
    cached_export(models / card.backbone, load_backbone) if card.backbone else [
        cached_export(models / name, load_model) for name in card.nodes.values()]
    work = Path(tempfile.mkdtemp(prefix="hemoweb-slide-bench-"))
    slide = perturbed_slide(work / "slide", args.fields)
    env = prepared_environment(work)
    load_before = os.getloadavg()
    cpu_before = os.times()
    out_csv, out_json = work / "cells.csv", work / "slide.json"
    end_to_end = child([sys.executable, "manage.py", "analyse_slide", str(slide), "--models", str(models),
                        "--csv", str(out_csv), "--json", str(out_json)], env)
    cpu_after = os.times()
    record = json.loads(out_json.read_text())
    end_to_end.update(part="manage.py analyse_slide, process start to exit", fields=len(record["fields"]),
                      cells=record["counts"]["classified"], csv_rows=len(out_csv.read_text().splitlines()) - 1,
                      red=record["slide"]["red"], platelets=record["slide"]["platelets"],
                      cpu_s=round(cpu_after.children_user + cpu_after.children_system
                                  - cpu_before.children_user - cpu_before.children_system, 2),
                      fields_skipped=record["counts"]["skipped"])
    print(json.dumps(end_to_end), flush=True)
    clock = child([sys.executable, str(Path(__file__).resolve()), "--part", "service", "--folder", str(slide),
                   "--models", str(models)], env)
    load_after = os.getloadavg()
    report = {
        "benchmark": "slide_throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {**hardware(), "load_average_before": [round(v, 2) for v in load_before],
                     "load_average_after": [round(v, 2) for v in load_after]},
        "slide": f"{args.fields} fields: the 10 demo/bccd fields (640×480) repeated, each copy perturbed (own sha256)",
        "models": f"{models.name} ({card.architecture} at {card.input_size} px); detector models/detector/"
                  "bccd-yolov8n (YOLOv8n at 512)",
        "end_to_end": end_to_end, "service_clock": clock,
        "target": "a 50-field slide in <= 60 s end to end (detection + classification + rows) on the 2-core CPU",
        "met": end_to_end["wall_s"] <= 60,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    out = RESULTS / f"slide_throughput-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)


def markdown(report: dict) -> str:
    hw, e2e, clock = report["hardware"], report["end_to_end"], report["service_clock"]
    return "\n".join([
        f"# slide_throughput {report['date']}", "",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw.get('torch')}; load average "
        f"{hw['load_average_before']} before, {hw['load_average_after']} after (the machine is shared).",
        f"Slide: {report['slide']}. Models: {report['models']}.", "",
        "| part | fields | cells | wall s | CPU s |", "|---|---|---|---|---|",
        f"| {e2e['part']} | {e2e['fields']} | {e2e['cells']} | {e2e['wall_s']} | {e2e['cpu_s']} |",
        f"| {clock['part']} ({clock['engine']}) | {clock['fields']} | {clock['cells']} | {clock['seconds']} | |", "",
        f"In process: the slide's field size and scale {clock.get('preparation_s')} s, detection (read, decode, "
        f"detect) {clock.get('detection_s')} s, tree {clock.get('inference_s')} "
        f"s, database and files {clock.get('database_s')} s.",
        f"Target: {report['target']}: {'met' if report['met'] else 'NOT met'}.",
    ])


if __name__ == "__main__":
    main()
