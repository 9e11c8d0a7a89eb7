"""Classification throughput: cells/s end to end (zip in → rows stored) against the bare backbone forward.

    .venv/bin/python benchmarks/classify_throughput.py [--sizes 1000 10000] [--fast-decode]

Real PBC images from ../shared/data/pbc (repeated to reach the larger sizes) are packed into a .zip,
then classified by the same service the page, API and CLI use (apps.analysis.services.classify_run),
into a throw-away SQLite database and media folder. The time is split into decode (read + check +
decode), inference (the tree, batched per node) and database (image files written + rows inserted).
The baseline is the bare forward pass of the same backbone at the same input size and batch size.

Models: models/default when present; otherwise a set with the PBC tree's nodes made of
mobilenetv3_small_100 at 128 px with *random* weights (said so in the result). Random weights route
cells down the tree arbitrarily; the result records the forward passes per cell so that rates can
be compared per pass as well.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "pbc"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_model  # noqa: E402




def make_zip(images: list[Path], n: int, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress
        for i in range(n):
            source = images[i % len(images)]
            archive.write(source, f"{source.parent.name}/{i:06d}_{source.name}")
    return target


def build_random_set(folder: Path, architecture: str, size: int, deepest: bool = False) -> None:
    """The PBC tree's node classifiers with random weights (no pretrained weights are reachable).

    With `deepest`, each head's bias sends every cell to the child with the most classifiers below it
    (ROOT → MYE → MYM → NEU → leaf): the worst case for the tree, 4 forward passes per cell.
    """
    import torch

    import csv

    from hemoweb.ml.tree import CellTree, plan_nodes, resolve_single_path
    from hemoweb.ml.weights import ModelCard, ModelSetCard, create_model, save_model, write_set

    tree = CellTree.default()
    label_map = {row["label"]: row["cell_type_code"] for row in csv.DictReader((DATA / "label_map.csv").open())}
    labels = [label_map[row["label"]] for row in csv.DictReader((DATA / "labels.csv").open())]
    nodes = {}
    for plan in plan_nodes(tree, labels):
        if not plan.trained:
            continue
        classes = list(plan.classes)
        resolves = {c: resolve_single_path(tree, labels, c) for c in classes}
        card = ModelCard(architecture=architecture, node=plan.node, classes=classes, input_size=size,
                         resolves_to={k: v for k, v in resolves.items() if v != k})
        model = create_model(architecture, len(classes)).eval()
        if deepest:
            trained = {p.node for p in plan_nodes(tree, labels) if p.trained}
            depth = [sum(1 for d in tree.descendants(c) if d in trained) + (c in trained) for c in classes]
            with torch.no_grad():
                model.get_classifier().bias[depth.index(max(depth))] += 50.0
        save_model(model, card, folder / f"{plan.node}.safetensors")
        nodes[plan.node] = f"{plan.node}.safetensors"
    write_set(folder, ModelSetCard(name="bench-random", nodes=nodes, architecture=architecture, input_size=size,
                                   mode="random weights"))


def bare_forward(architecture: str, size: int, batch: int, n_images: int, device: str = "cpu") -> float:
    """images/s of the backbone alone on ready float batches (bf16 + channels_last on CUDA, as classification)."""
    import torch

    from hemoweb.ml.weights import create_model

    model = create_model(architecture, 8).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = device == "cuda"
    if cuda:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        model(x)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        while done < n_images:
            model(x)
            done += batch
        if cuda:
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fast-decode", action="store_true", help="also measure JPEG draft decoding")
    parser.add_argument("--route", choices=["random", "deepest"], default="deepest",
                        help="with random weights: where the heads send cells (deepest = worst case, 4 passes)")
    parser.add_argument("--models", type=Path, default=REPO / "models" / "default",
                        help="model set folder (default models/default; random weights when it is missing)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-decode", choices=["auto", "on", "off"], default="auto",
                        help="JPEGs decoded in batches on the device (auto: on a GPU, with nvJPEG)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hemoweb-bench-"))
    os.environ.update({"SQLITE_PATH": str(work / "bench.sqlite3"), "MEDIA_ROOT": str(work / "media"),
                       "DJANGO_SETTINGS_MODULE": "hemoweb.settings", "LOG_LEVEL": "WARNING",
                       "CLASSIFY_DEVICE": args.device, "BATCH_DECODE": args.batch_decode})
    default_set = args.models.resolve()
    if (default_set / "set.json").is_file():
        os.environ["MODELS_DIR"] = str(default_set.parent)
    else:
        os.environ["MODELS_DIR"] = str(work / "models")
    import django

    django.setup()
    import torch
    from django.core.management import call_command

    from apps.analysis import services
    from apps.analysis.models import ClassificationRun
    from apps.cells.services import seed_cell_tree
    from apps.classifiers.services import register_model_set
    from hemoweb.ml.weights import read_set

    call_command("migrate", verbosity=0)
    seed_cell_tree()
    if (default_set / "set.json").is_file():
        card = read_set(default_set)
        layout = "one shared backbone, a head per node" if card.backbone else "one network per node"
        set_folder, note = default_set, (f"{default_set.name} (trained weights, {layout}, second look: "
                                         f"{card.second_look or 'none'} views)")
    else:
        set_folder = work / "models" / "bench"
        build_random_set(set_folder, "mobilenetv3_small_100", 128, deepest=args.route == "deepest")
        note = ("no models/default here: mobilenetv3_small_100 at 128 px with RANDOM weights, PBC tree nodes, "
                f"routing {args.route}")
    model_set = register_model_set(set_folder, name="bench", activate=True)
    card = read_set(set_folder)
    size = card.input_size or 128
    architecture = card.architecture or "mobilenetv3_small_100"

    images = sorted(DATA.rglob("*.jpg"))
    from hemoweb.ml.infer import pick_device

    device = pick_device(args.device)
    bare = bare_first = bare_forward(architecture, size, args.batch, 2000 if device == "cpu" else 50000, device)
    print(f"bare forward {architecture} @ {size}px batch {args.batch}: {bare:.0f} images/s", flush=True)
    runs = []
    variants = [(n, False) for n in args.sizes] + ([(min(args.sizes), True)] if args.fast_decode else [])
    for n, draft in variants:
        archive = make_zip(images, n, work / f"cells-{n}.zip")
        run = ClassificationRun.objects.create(owner=None, name=archive.name, model_set=model_set,
                                               model_set_name=model_set.name, model_folder=str(set_folder))
        timings: dict = {}
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        run = services.classify_run(run.pk, source=archive, batch_size=args.batch, draft=draft, timings=timings)
        total = time.perf_counter() - start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert run.status == "succeeded", run.error
        cells = run.cells.count()
        rows = list(run.cells.values_list("path", "views"))
        steps = sum(len(path) for path, _ in rows)
        looked = [(len(path), views) for path, views in rows if views > 1]  # unsure at first: looked at again
        # a shared backbone runs once per cell and once per view of a second look; a per-node set once per step
        passes = (cells + sum(views for _, views in looked) if card.backbone
                  else steps + sum(length * views for length, views in looked))
        result = {
            "images": n, "fast_decode": draft, "cells_stored": cells, "seconds": round(total, 2),
            "cells_per_s": round(cells / total, 1), "decode_s": round(timings["decode"], 2),
            "inference_s": round(timings["inference"], 2), "database_s": round(timings["database"], 2),
            "other_s": round(total - sum(timings.values()), 2),
            "tree_steps_per_cell": round(steps / cells, 3), "second_looks": len(looked),
            "forward_passes_per_cell": round(passes / cells, 3),
            "inference_images_per_s_per_pass": round(passes / timings["inference"], 1),
            "end_to_end_vs_bare": round(cells / total / bare, 3),
            "max_rss_mb_after": round(rss_after / 1024, 1), "max_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
        }
        # the machine may be shared: measure the bare rate again right after, and compare with the mean
        bare_after = bare_forward(architecture, size, args.batch, 1000 if device == "cpu" else 25000, device)
        result["bare_forward_before_after"] = [round(bare, 1), round(bare_after, 1)]
        result["end_to_end_vs_bare"] = round(cells / total / ((bare + bare_after) / 2), 3)
        bare = bare_after
        runs.append(result)
        print(json.dumps(result), flush=True)
        archive.unlink()
        shutil.rmtree(work / "media" / "analysis", ignore_errors=True)

    report = {
        "benchmark": "classify_throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
                     "device": device if device == "cpu" else torch.cuda.get_device_name(0),
                     "batch_decode": args.batch_decode},
        "models": note, "architecture": architecture, "input_size": size, "batch": args.batch,
        "bare_forward_images_per_s": round(bare_first, 1), "runs": runs,
        "target": "end to end >= 50 % of bare forward (end_to_end_vs_bare >= 0.5)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    out = RESULTS / f"classify_throughput-{device}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    lines = [f"# classify_throughput {report['date']}", "",
             f"Hardware: {report['hardware']['cpu']}, {report['hardware']['cores']} cores, torch {torch.__version__}, "
             f"load average at end {tuple(round(x, 1) for x in os.getloadavg())}.",
             f"Models: {note}. Batch {args.batch}.", f"Bare forward: {bare_first:.0f} images/s at the start (each run also lists before/after).", "",
             "| images | fast decode | cells/s | vs bare | decode s | inference s | database s | passes/cell | second looks | max RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['images']} | {r['fast_decode']} | {r['cells_per_s']} | {r['end_to_end_vs_bare']} | "
                     f"{r['decode_s']} | {r['inference_s']} | {r['database_s']} | {r['forward_passes_per_cell']} | "
                     f"{r['second_looks']} | {r['max_rss_mb_after']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
