"""Latency of detection on 640×480 smears: the detector alone, and detect-then-classify (tree on every WBC).

Run: .venv/bin/python benchmarks/detect_latency.py [--device cpu|cuda] [--threads N] [--runs N]
Writes benchmarks/results/detect_latency-<device>.json and .md with the hardware.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_model  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hemoweb.ml import detect as ml  # noqa: E402




def timed(fn, runs: int, sync) -> list[float]:
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_ms": round(statistics.median(ordered), 1), "mean_ms": round(statistics.fmean(ordered), 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1), "min_ms": round(ordered[0], 1), "runs": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--detector", default=str(REPO / "models" / "detector" / "bccd-yolov8n.safetensors"))
    parser.add_argument("--model-set", default=str(REPO / "models" / "default"),
                        help="A classifier model set folder for the tree on the white cells.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    detector = ml.load_detector(Path(args.detector), device)
    smears = sorted((REPO / "demo" / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))
    images = [Image.open(path).convert("RGB") for path in smears]
    assert all(image.size == (640, 480) for image in images)
    state = {"i": 0}

    def next_image() -> Image.Image:
        state["i"] += 1
        return images[state["i"] % len(images)]

    for _ in range(3):  # warm-up
        ml.detect(detector, next_image())
    detect_only = timed(lambda: ml.detect(detector, next_image()), args.runs, sync)

    result = {
        "benchmark": "detect_latency",
        "image": "640×480 BCCD smear (demo/bccd, 10 images in turn)",
        "detector": Path(args.detector).name,
        "detector_card": {k: detector.card.__dict__[k] for k in ("architecture", "imgsz", "classes")},
        "detection_only": summary(detect_only),
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                     "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "python": platform.python_version(),
                     "load_average_at_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    set_folder = Path(args.model_set)
    if (set_folder / "set.json").is_file():
        from hemoweb.ml.infer import TreeClassifier
        from hemoweb.ml.tree import CellTree

        classifier = TreeClassifier(set_folder, CellTree.default(), device=device)
        classifier.check()

        def detect_and_classify() -> int:
            image = next_image()
            found = ml.detect(detector, image)
            white = [b for b in found.boxes if b.label in detector.card.cell_classes]
            if white:
                classifier.classify(ml.crop_cells(image, white))
            return len(white)

        for _ in range(3):
            detect_and_classify()
        wbcs = [detect_and_classify() for _ in range(len(images))]
        result["with_tree"] = summary(timed(detect_and_classify, args.runs, sync))
        result["with_tree"]["model_set"] = str(set_folder.relative_to(REPO) if set_folder.is_relative_to(REPO) else set_folder)
        result["with_tree"]["white_cells_per_image"] = round(statistics.fmean(wbcs), 2)
    else:
        result["with_tree"] = f"skipped: no model set at {set_folder}"

    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"detect_latency-{device.type}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Detection latency ({result['date']})", "",
             f"Hardware: {result['hardware']['cpu']}, {result['hardware']['cores']} cores, "
             f"{result['hardware']['threads']} torch threads, device {result['hardware']['device']}, "
             f"torch {result['hardware']['torch']}; load average at start {result['hardware']['load_average_at_start']}.",
             f"Detector: {result['detector']} ({result['detector_card']['architecture']}, imgsz {result['detector_card']['imgsz']}).",
             "", "| What | median ms | mean ms | p90 ms | runs |", "|---|---|---|---|---|"]
    for key, label in (("detection_only", "detection only"), ("with_tree", "detection + tree on each WBC")):
        row = result[key]
        if isinstance(row, dict):
            lines.append(f"| {label} | {row['median_ms']} | {row['mean_ms']} | {row['p90_ms']} | {row['runs']} |")
        else:
            lines.append(f"| {label} | {row} | | | |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
