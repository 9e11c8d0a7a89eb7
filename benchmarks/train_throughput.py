"""Training throughput: hemoweb's training step (uint8 cache → augmentation → normalise → step) against a bare
timm loop on ready float tensors, same model and batch. Also the one-time decode rate of the image cache.

    .venv/bin/python benchmarks/train_throughput.py [--arch A] [--size S] [--batch B] [--steps N] [--device auto]

Writes benchmarks/results/train_throughput_<device>.json and .md. Uses the demo images (repeated) so it runs
anywhere; on a GPU use e.g. --arch mobilenetv3_large_100 --size 224 --batch 128 --steps 50.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import cpu_model  # noqa: E402

from hemoweb.ml.data import NodeSet, decode_cache  # noqa: E402
from hemoweb.ml.infer import pick_device  # noqa: E402
from hemoweb.ml.train import Progress, TrainConfig, train_heads  # noqa: E402
from hemoweb.ml.weights import create_model  # noqa: E402




def bare_loop(arch: str, size: int, batch: int, steps: int, device: torch.device, warmup: int) -> float:
    model = create_model(arch, 4).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def hemoweb_loop(arch: str, size: int, batch: int, steps: int, device: torch.device, warmup: int,
                 cache: torch.Tensor, augment: bool) -> float:
    n = cache.shape[0]
    node_set = NodeSet(node="ROOT", classes=["A", "B", "C", "D"], train=[(i, i % 4) for i in range(n)],
                       val=[(0, 0), (1, 1)], test=[(2, 2), (3, 3)])
    if device.type == "cuda":
        cache = cache.to(device)
    times: list[float] = []

    def on_step(event: Progress) -> None:
        if event.kind == "step":
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    config = TrainConfig(architecture=arch, epochs=1, image_size=size, batch_size=batch, augment=augment,
                         max_steps_per_epoch=warmup + steps, device=str(device))
    train_heads([node_set], cache, config, device, label="ROOT", callback=on_step)
    return steps * batch / (times[-1] - times[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mobilenetv3_small_100")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats; the best of each is kept.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(pick_device(args.device))
    paths = sorted((ROOT / "demo" / "pbc").glob("*/*.jpg"))
    started = time.perf_counter()
    small = decode_cache(paths, args.size, workers=os.cpu_count() or 2)
    decode_rate = len(paths) / (time.perf_counter() - started)
    needed = args.batch * (args.warmup + args.steps)
    cache = small.repeat((needed + len(paths) - 1) // len(paths), 1, 1, 1)[:needed]
    runs: dict[str, list[float]] = {"bare": [], "plain": [], "augmented": []}
    for _ in range(args.repeats):  # interleaved, best of each: a shared machine's noise only ever slows a run down
        runs["bare"].append(bare_loop(args.arch, args.size, args.batch, args.steps, device, args.warmup))
        runs["plain"].append(hemoweb_loop(args.arch, args.size, args.batch, args.steps, device, args.warmup, cache,
                                          augment=False))
        runs["augmented"].append(hemoweb_loop(args.arch, args.size, args.batch, args.steps, device, args.warmup,
                                              cache, augment=True))
    bare, plain, augmented = (max(runs[key]) for key in ("bare", "plain", "augmented"))
    result = {
        "arch": args.arch, "image_size": args.size, "batch": args.batch, "steps": args.steps,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "bf16_autocast": device.type == "cuda",
        "images_per_s": {"bare_timm": round(bare, 1), "hemoweb_no_aug": round(plain, 1),
                         "hemoweb_aug": round(augmented, 1)},
        "hemoweb_vs_bare": {"no_aug": round(plain / bare, 3), "aug": round(augmented / bare, 3)},
        "decode_images_per_s": round(decode_rate, 1),
        "runs": {key: [round(v, 1) for v in values] for key, values in runs.items()},
        "note": "hemoweb's step includes indexing the uint8 cache, moving to the device, augmentation, "
                "normalisation and the progress callback; decoding happens once per run (decode_images_per_s).",
    }
    out = ROOT / "benchmarks" / "results" / f"train_throughput_{device.type}.json"
    out.write_text(json.dumps(result, indent=2))
    rates = result["images_per_s"]
    out.with_suffix(".md").write_text(
        f"# Training throughput ({result['device']}, {result['cpu']}, {result['cores']} cores, torch {result['torch']})\n\n"
        f"{args.arch}, {args.size} px, batch {args.batch}, {args.steps} timed steps.\n\n"
        "| loop | images/s | vs bare |\n|---|---|---|\n"
        f"| bare timm | {rates['bare_timm']} | 1.00 |\n"
        f"| hemoweb, no augmentation | {rates['hemoweb_no_aug']} | {result['hemoweb_vs_bare']['no_aug']:.2f} |\n"
        f"| hemoweb, augmentation | {rates['hemoweb_aug']} | {result['hemoweb_vs_bare']['aug']:.2f} |\n\n"
        f"Decoding into the uint8 cache (once per run): {result['decode_images_per_s']} images/s.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
