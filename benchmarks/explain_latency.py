"""Seconds per image for each explanation method, hemoweb's settings beside Captum's defaults.

    .venv/bin/python benchmarks/explain_latency.py [--images 5] [--device cpu|cuda] [--size N]

Model: the ROOT classifier of models/default when that set exists; otherwise mobilenetv3_small_100
with random weights at 128 px (timing does not depend on the weights; the result says which).
Images: real demo PBC cells (demo/pbc). Writes benchmarks/results/explain_latency-<cpu|cuda>-<size>px.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import cpu_model  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hemoweb.ml.explain import explain, gradcam_layer, prepare, resolve_settings  # noqa: E402
from hemoweb.ml.weights import ModelCard, cached_model, create_model, read_set  # noqa: E402




def load(device: str, size: int | None) -> tuple[torch.nn.Module, ModelCard, str]:
    default = ROOT / "models" / "default"
    if (default / "set.json").is_file():
        set_card = read_set(default)
        node = "ROOT" if "ROOT" in set_card.nodes else next(iter(set_card.nodes))
        model, card = cached_model(default / set_card.nodes[node], device)
        return model, card, f"models/default {node} ({card.architecture}, {card.input_size} px, trained)"
    size = size or 128
    card = ModelCard(architecture="mobilenetv3_small_100", node="ROOT", classes=["ERY", "LYM", "MYE", "MEG", "ABN"],
                     input_size=size)
    model = create_model(card.architecture, len(card.classes)).to(device).eval()
    return model, card, f"mobilenetv3_small_100 at {size} px, random init (models/default not present)"


def captum_default(model, inputs, method: str, resolved: dict, target: int) -> None:
    """The same attribution with Captum's own defaults (what the thesis ran)."""
    from captum.attr import IntegratedGradients, LayerGradCam, Occlusion

    model.eval()
    if method == "ig":
        IntegratedGradients(model).attribute(inputs, target=target, n_steps=resolved["n_steps"])
    elif method == "occlusion":
        window, stride = resolved["window"], resolved["stride"]
        Occlusion(model).attribute(inputs, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                   target=target)  # perturbations_per_eval=1
    else:
        LayerGradCam(model, gradcam_layer(model, inputs.shape[-1])).attribute(inputs, target=target)


def timed(function, repeats: int, sync) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="Input size of the fallback model (default 128).")
    parser.add_argument("--captum-images", type=int, default=2, help="Images for Captum's (slow) defaults.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads only contend).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per image; the fastest counts (least disturbed).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    model, card, described = load(device, args.size)
    paths = sorted((ROOT / "demo" / "pbc").rglob("*.jpg"))[:: max(1, 130 // args.images)][: args.images]
    images = [Image.open(path).convert("RGB") for path in paths]
    for image in images[:1]:  # warm-up: allocator, kernels, Grad-CAM layer search, cost calibration
        for method in ("gradcam", "ig", "occlusion"):
            explain(model, image, method, card=card)

    rows = []
    for method in ("gradcam", "ig", "occlusion"):
        resolved = resolve_settings(method, card.input_size)
        ours, captum = [], []
        for index, image in enumerate(images):  # interleaved, so both see the same machine load
            ours.append(min(timed(lambda image=image: explain(model, image, method, card=card), args.repeats, sync)))
            if index < args.captum_images:
                inputs, _ = prepare(image, card)
                inputs = inputs.to(device)
                with torch.no_grad():
                    target = int(model(inputs).argmax())
                captum.append(min(timed(lambda: captum_default(model, inputs, method, resolved, target),
                                        1 if method == "occlusion" else args.repeats, sync)))
        row = {
            "method": method,
            "settings": resolved,
            "hemoweb_s_per_image": round(statistics.median(ours), 4),
            "hemoweb_all": [round(t, 4) for t in ours],
            "captum_defaults_s_per_image": round(statistics.median(captum), 4),
            "captum_all": [round(t, 4) for t in captum],
        }
        row["speed_up"] = round(row["captum_defaults_s_per_image"] / row["hemoweb_s_per_image"], 1)
        rows.append(row)
        print(f"{method:10s} hemoweb {row['hemoweb_s_per_image']:.3f} s/image   captum defaults "
              f"{row['captum_defaults_s_per_image']:.3f} s/image   ×{row['speed_up']}   {resolved}")

    hardware = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_after": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
    }
    result = {"benchmark": "explain_latency", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "model": described, "input_size": card.input_size, "images": [p.name for p in paths],
              "hardware": hardware, "results": rows,
              "notes": "hemoweb: the whole explain() call (prediction, resize, attribution) with its "
                       "defaults: batches of about 32 images at 128 px / 10 at 224 px on CPU. Captum defaults: "
                       "IntegratedGradients(model) with internal_batch_size=None, Occlusion with "
                       "perturbations_per_eval=1, same window/stride. "
                       "Median over images of the fastest of --repeats runs per image (Captum's Occlusion: one run), "
                       "after one warm-up image, interleaved image by image."}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{'cpu' if device == 'cpu' else 'cuda'}-{card.input_size}px"
    (out / f"explain_latency{suffix}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Explanation latency ({hardware['device']})", "",
             f"{result['date']} · {described} · {hardware['cpu']}, {hardware['cores']} cores, "
             f"{hardware['torch_threads']} torch threads · torch {hardware['torch']} · load average "
             f"{hardware['load_average_after']} (shared machine)", "",
             "| method | settings | hemoweb s/image | Captum defaults s/image | speed-up |", "|---|---|---|---|---|"]
    for row in rows:
        settings_text = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "–"
        lines.append(f"| {row['method']} | {settings_text} | {row['hemoweb_s_per_image']:.3f} | "
                     f"{row['captum_defaults_s_per_image']:.3f} | ×{row['speed_up']} |")
    lines += ["", result["notes"], ""]
    (out / f"explain_latency{suffix}.md").write_text("\n".join(lines))
    print(f"wrote {out / f'explain_latency{suffix}.md'}")


if __name__ == "__main__":
    main()
