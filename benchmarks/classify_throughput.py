"""Classification throughput: the bare network in each engine against `manage.py classify` end to end with each engine.

    .venv/bin/python benchmarks/classify_throughput.py [--models models/default] [--cells 1767] [--device cpu|cuda]

In one run on one machine, each in its own process (so that each has its own peak memory):

- bare PyTorch eager and bare ONNX Runtime: the set's network alone on ready float batches at its input size
  (PyTorch at batch 64 as classification ran before; ONNX Runtime at the batch hemoweb gives it, and at 64);
- hemoweb end to end with each engine: `python manage.py classify FOLDER --models SET --csv OUT`, timed from the
  process start to its exit (imports, Django, model loading, decoding, the tree, rows and files stored, the CSV),
  into a throw-away SQLite database and media folder; the ONNX export is made once before (it is cached beside
  the set: a run after the first finds it);
- where the time goes: each stage of the path on its own, in CPU milliseconds per cell (one thread), and the
  seconds `classify_run` spends waiting for decoding, in the tree and in the database (on 512 of the cells).

The cells: `--cells` N real PBC images from ../shared/data/pbc, evenly spread over the 6,702 sorted paths (image
i * 6702 // N for i < N), copied into one folder. Besides wall seconds, every process reports its CPU seconds:
on a machine shared with other work (the load average is recorded), CPU seconds per cell say more than wall time.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "pbc"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from benchmarks.common import hardware  # noqa: E402


def pick_cells(n: int, target: Path) -> list[Path]:
    """N PBC images evenly spread over the sorted paths, copied into `target`."""
    images = sorted(DATA.rglob("*.jpg"))
    target.mkdir(parents=True, exist_ok=True)
    chosen = [images[i * len(images) // n] for i in range(n)]
    for path in chosen:
        shutil.copy(path, target / f"{path.parent.name}__{path.name}")
    return chosen


def peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- parts, each run in a child process ------------------------------------------------------------


def bare(engine: str, models: Path, batch: int, n_images: int, device: str) -> dict:
    """images/s of the set's network alone (the shared backbone, else ROOT's whole model) on ready float batches."""
    import torch

    from hemoweb.ml.engine import OnnxNetwork, cached_export
    from hemoweb.ml.weights import load_backbone, load_model, read_card, read_set

    card = read_set(models)
    path, loader = ((models / card.backbone, load_backbone) if card.backbone
                    else (models / card.nodes.get("ROOT", next(iter(card.nodes.values()))), load_model))
    size = read_card(path).input_size
    if engine == "onnxruntime":
        network = OnnxNetwork(cached_export(path, loader), batch=batch)
    else:
        network = loader(path, device)[0]
    x = torch.randn(batch if engine == "torch" else max(batch, 64), 3, size, size, device=device)
    cuda = device == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        network(x)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu, done = time.perf_counter(), time.process_time(), 0
        while done < n_images:
            network(x)
            done += len(x)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"part": f"bare {engine}", "batch": batch, "images": done, "images_per_s": round(done / wall, 1),
            "cpu_ms_per_image": round(cpu * 1000 / done, 2), "threads": torch.get_num_threads(),
            "peak_rss_mb": peak_mb()}


def stages(models: Path, cells: Path, n: int) -> dict:
    """CPU ms per cell of each stage of the path, one after the other in one thread."""
    import torch

    torch.set_num_threads(1)
    from hemoweb.ml.engine import OnnxNetwork
    from hemoweb.ml.infer import TreeClassifier
    from hemoweb.ml.preprocess import decode_one, model_input
    from hemoweb.ml.standardise import as_rgb, backgrounds, measure, to_reference
    from hemoweb.ml.tree import CellTree

    datas = [path.read_bytes() for path in sorted(cells.iterdir())[:n]]
    onnx = TreeClassifier(models, CellTree.default(), engine="onnxruntime")
    plain = TreeClassifier(models, CellTree.default(), engine="torch")
    card, reference = onnx.input_card, onnx.scale_reference
    result: dict = {}

    def cpu(name, work, count=n):
        started = time.process_time()
        value = work()
        result[name] = round((time.process_time() - started) * 1000 / count, 2)
        return value

    images = cpu("decode (Pillow)", lambda: [decode_one(data)[0] for data in datas])
    scale = onnx.estimate_scale(images[:: max(1, n // 32)])
    rgb = [as_rgb(image) for image in images]
    cpu("scale: measure each cell's red cells", lambda: [measure(image) for image in rgb])
    windows = [to_reference(image, reference, scale) for image in rgb] if reference else rgb
    from hemoweb.ml.infer import _at_size

    tensors = cpu("resize to the input size", lambda: [_at_size(image, card).contiguous() for image in windows])
    batch = torch.stack(tensors[:64])
    cpu("white balance + normalise", lambda: model_input(batch, card), 64)
    cpu("background colour record", lambda: backgrounds(batch.float() / 255), 64)
    x = model_input(batch, card)
    with torch.inference_mode():
        backbone = plain.backbone()[0] if plain.shared else plain.part(plain.tree.root)[0]
        backbone(x[:4])
        cpu("network: PyTorch eager, batch 64", lambda: backbone(x), 64)
        network = OnnxNetwork(onnx.network().path, threads=1) if plain.shared else onnx.network(onnx.tree.root)
        network(x[:4])
        cpu("network: ONNX Runtime, batch 4", lambda: network(x), 64)
    records = [{}] * len(tensors)
    onnx.classify(tensors[:8], scales=records[:8])
    total = cpu("classify (ONNX Runtime): input, network, heads, tree, second look, familiarity",
                lambda: onnx.classify(tensors, 64, scales=records))
    return {"part": "stages", "cells": n, "cpu_ms_per_cell": result, "second_looks": sum(p.views > 1 for p in total)}


def service_clock(models: Path, cells: Path, engine: str) -> dict:
    """classify_run in this process: seconds waiting for decoding, in the tree and in the database."""
    os.environ["INFERENCE_ENGINE"] = engine
    import django

    django.setup()
    from apps.analysis import services
    from apps.analysis.models import ClassificationRun

    run = ClassificationRun.objects.create(owner=None, name=cells.name, model_set_name=models.name,
                                           model_folder=str(models))
    timings: dict = {}
    started = time.perf_counter()
    run = services.classify_run(run.pk, source=cells, timings=timings)
    total = time.perf_counter() - started
    assert run.status == "succeeded", run.error
    return {"part": f"classify_run {run.engine}", "cells": run.cells.count(), "seconds": round(total, 2),
            **{f"{key}_s": round(value, 2) for key, value in timings.items()},
            "decode_workers": services.decode_workers(services.load_classifier(services._choice_for_run(run)))}


def child(argv: list[str], env: dict) -> dict:
    """Run a part or `manage.py classify` in its own process: its JSON (if any), wall and CPU seconds, peak memory."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    out, err = process.stdout.read(), process.stderr.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    found = json.loads(lines[-1]) if lines else {}
    return {**found, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "process_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--cells", type=int, default=1767)
    parser.add_argument("--bare-images", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--part", choices=["bare-torch", "bare-onnxruntime", "stages", "service-torch",
                                           "service-onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.resolve()
    if args.part:
        if args.part.startswith("bare-"):
            engine = args.part.removeprefix("bare-")
            result = bare(engine, models, args.batch, args.bare_images, args.device)
        elif args.part == "stages":
            result = stages(models, args.folder, 256)
        else:
            result = service_clock(models, args.folder, args.part.removeprefix("service-"))
        print(json.dumps(result), flush=True)
        return

    from hemoweb.ml.engine import cached_export
    from hemoweb.ml.weights import load_backbone, load_model, read_set

    card = read_set(models)
    engines = ["torch"] if args.device == "cuda" else ["torch", "onnxruntime"]
    if "onnxruntime" in engines:  # the export is made once per weights, not per run: make it before timing
        cached_export(models / card.backbone, load_backbone) if card.backbone else [
            cached_export(models / name, load_model) for name in card.nodes.values()]
    work = Path(tempfile.mkdtemp(prefix="hemoweb-bench-"))
    cells = work / "cells"
    pick_cells(args.cells, cells)
    env = {**os.environ, "SQLITE_PATH": str(work / "bench.sqlite3"), "MEDIA_ROOT": str(work / "media"),
           "DJANGO_SETTINGS_MODULE": "hemoweb.settings", "LOG_LEVEL": "WARNING", "CLASSIFY_DEVICE": args.device,
           "PYTHONPATH": str(REPO)}
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v0"], env=env, cwd=REPO, check=True)
    subprocess.run([python, "manage.py", "seed_cell_tree"], env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    load_before = os.getloadavg()
    me = [python, str(Path(__file__).resolve()), "--models", str(models), "--bare-images", str(args.bare_images),
          "--device", args.device]
    parts = []
    # ONNX Runtime at hemoweb's batch (4) and at PyTorch's (64): what the batch size is worth
    for engine, batch in [("torch", 64)] + ([("onnxruntime", 4), ("onnxruntime", 64)] if args.device == "cpu" else []):
        parts.append(child([*me, "--part", f"bare-{engine}", "--batch", str(batch)], env))
        print(json.dumps(parts[-1]), flush=True)
    runs = []
    for engine in engines:
        out = work / f"{engine}.csv"
        result = child([python, "manage.py", "classify", str(cells), "--models", str(models), "--csv", str(out)],
                       {**env, "INFERENCE_ENGINE": engine})
        result.update(part=f"manage.py classify, {engine}", engine=engine, cells=args.cells,
                      cells_per_s=round(args.cells / result["wall_s"], 1),
                      cpu_ms_per_cell=round(result["cpu_s"] * 1000 / args.cells, 2))
        runs.append(result)
        print(json.dumps(result), flush=True)
        shutil.rmtree(work / "media", ignore_errors=True)
    rows = {engine: [line.split(",")[:3] for line in (work / f"{engine}.csv").read_text().splitlines()[1:]]
            for engine in engines}
    same_codes = (sum(a == b for a, b in zip(rows["torch"], rows["onnxruntime"], strict=True))
                  if len(engines) == 2 else None)
    subset = work / "cells-512"  # the service's own clock on fewer cells (PyTorch would take minutes more)
    subset.mkdir()
    for path in sorted(cells.iterdir())[:: max(1, args.cells // 512)][:512]:
        shutil.copy(path, subset / path.name)
    clocks = [child([*me, "--part", f"service-{engine}", "--folder", str(subset)], env) for engine in engines]
    breakdown = child([*me, "--part", "stages", "--folder", str(cells)], env) if args.device == "cpu" else {}
    load_after = os.getloadavg()

    bare_rate = {part["part"].removeprefix("bare "): part["images_per_s"] for part in parts
                 if part["batch"] == (64 if part["part"] == "bare torch" else 4)}
    report = {
        "benchmark": "classify_throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {**hardware(), "device": args.device, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "load_average_before": [round(v, 2) for v in load_before],
                     "load_average_after": [round(v, 2) for v in load_after]},
        "models": f"{models.name}: {card.architecture} at {card.input_size} px, "
                  f"{'one shared backbone, a head per node' if card.backbone else 'one network per node'}, "
                  f"second look {card.second_look or 'none'}",
        "cells": f"{args.cells} PBC images from shared/data/pbc: image i * 6702 // {args.cells} of the sorted paths",
        "bare": parts, "end_to_end": runs, "service_clock": clocks, "stages": breakdown,
        "same_codes_torch_vs_onnxruntime": same_codes,
        "end_to_end_vs_bare_same_engine": {run["engine"]: round(run["cells_per_s"] / bare_rate[run["engine"]], 3)
                                           for run in runs},
        "targets": "manage.py classify >= 80 cells/s end to end (process start included); end to end >= 0.7x bare "
                   "ONNX Runtime; the same codes as PyTorch",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    out = RESULTS / f"classify_throughput-{args.device}-engines-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)


def markdown(report: dict) -> str:
    hw = report["hardware"]
    lines = [f"# classify_throughput {report['date']}", "",
             f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw.get('torch')}, device {hw['device']}, "
             f"OMP_WAIT_POLICY {hw['omp_wait_policy']} (hemoweb's default, for every part); load "
             f"average {hw['load_average_before']} before, {hw['load_average_after']} after (other work on the "
             "machine shares the cores: compare CPU ms per cell as well as wall time).",
             f"Models: {report['models']}. Cells: {report['cells']}.", "",
             "| what | images or cells | per s (wall) | CPU ms per cell | peak RSS MB |", "|---|---|---|---|---|"]
    for part in report["bare"]:
        lines.append(f"| {part['part']} (batch {part['batch']}, {part['threads']} threads) | {part['images']} | "
                     f"{part['images_per_s']} | {part['cpu_ms_per_image']} | {part['process_peak_rss_mb']} |")
    for run in report["end_to_end"]:
        lines.append(f"| {run['part']} (process start included: {run['wall_s']} s) | {run['cells']} | "
                     f"{run['cells_per_s']} | {run['cpu_ms_per_cell']} | {run['process_peak_rss_mb']} |")
    lines += ["", f"End to end against the bare network of the same engine: {report['end_to_end_vs_bare_same_engine']}."
              f" Same codes, PyTorch against ONNX Runtime: {report['same_codes_torch_vs_onnxruntime']} of "
              f"{report['end_to_end'][0]['cells']} cells.", "", "classify_run in one process (seconds):", "",
              "| engine | cells | total | waiting for decoding | tree (network and the rest) | database |",
              "|---|---|---|---|---|---|"]
    for clock in report["service_clock"]:
        lines.append(f"| {clock['part']} | {clock['cells']} | {clock['seconds']} | {clock['decode_s']} | "
                     f"{clock['inference_s']} | {clock['database_s']} |")
    if report["stages"]:
        lines += ["", f"Where the CPU time goes, each stage on its own in one thread ({report['stages']['cells']} "
                      "cells, CPU ms per cell):", "", "| stage | CPU ms per cell |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in report["stages"]["cpu_ms_per_cell"].items()]
    lines += ["", f"Targets: {report['targets']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
