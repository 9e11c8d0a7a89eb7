"""Train a shared-backbone model set from a pack (benchmarks/gpu/pack.py) with hemoweb's ML core alone.

    python3 benchmarks/gpu/train_set.py --pack .gpu --out $OUT [--epochs 30] [--device cuda]

For the GPU machine, which has torch and timm but not Django: this is the same `train_tree` the
`train_tree` command and training jobs call, on the packed cells and their stored splits. It then scores
the whole tree on the test cells (`evaluate_tree`'s JSON), stores the weights as float16 and writes
`set.tar` (the set's folder) and `train_set.json` (settings, timings, metrics, hardware) into --out.
Back here: `tar -xf set.tar -C models/`, then `manage.py register_models models/<name>` and
`manage.py evaluate_tree` on the original images.
"""

import argparse
import csv
import json
import platform
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hemoweb.ml.evaluate import score_predictions  # noqa: E402
from hemoweb.ml.infer import TreeClassifier, pick_device  # noqa: E402
from hemoweb.ml.train import CellRecord, Progress, TrainConfig, store_half, train_tree  # noqa: E402
from hemoweb.ml.tree import CellTree  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="pbc-lite0-gpu")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--mode", default="pretrained_aug")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=8, help="decode threads")
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (to try the kit)")
    args = parser.parse_args()

    pack = json.loads((args.pack / "pack.json").read_text())
    with open(args.pack / "cells.csv", newline="") as handle:
        cells = [CellRecord(path=str(args.pack / row["path"]), label=row["label"], split=row["split"])
                 for row in csv.DictReader(handle)]
    config = TrainConfig(
        architecture=args.arch, mode=args.mode, epochs=args.epochs, image_size=int(pack["size"]),
        batch_size=args.batch_size, lr=args.lr or None, patience=args.patience, device=args.device,
        pretrained_dir=str(args.pack / "pretrained"), decode_workers=args.workers, shared_backbone=True,
        max_steps_per_epoch=args.max_steps)
    tree = CellTree.default()
    started = time.perf_counter()

    def echo(progress: Progress) -> None:
        if progress.kind in ("epoch", "log", "node", "plan"):
            print(f"[{time.perf_counter() - started:7.1f} s] {progress.kind} {progress.node} "
                  f"{progress.message or ''} {progress.epoch or ''}".rstrip(), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / args.name
        train_tree(tree, cells, config, folder, name=args.name, callback=echo,
                   data_info={"dataset": pack.get("dataset", ""), "split_seed": config.seed, "packed": pack})
        trained = time.perf_counter() - started
        store_half(folder)
        classifier = TreeClassifier(folder, tree, pick_device(config.device))
        test = [cell for cell in cells if cell.split == "test"]
        from PIL import Image

        images = [Image.open(cell.path).convert("RGB") for cell in test]
        predictions = classifier.classify(images, batch_size=256)
        metrics = score_predictions(tree, [cell.label for cell in test], predictions)
        with tarfile.open(args.out / "set.tar", "w") as tar:
            tar.add(folder, arcname=args.name, filter=lambda info: None if "/checkpoints" in info.name else info)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {"cpu": platform.processor() or platform.machine(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "torch": torch.__version__},
        "config": {k: v for k, v in vars(config).items() if k != "augment"},
        "seconds_training": round(trained, 1),
        "test_on_packed_images": {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "coverage", "coarse8", "forced")},
    }
    for key in ("per_code", "confusion"):
        report["test_on_packed_images"]["coarse8"].pop(key, None)
    (args.out / "train_set.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["test_on_packed_images"], indent=2))


if __name__ == "__main__":
    main()
