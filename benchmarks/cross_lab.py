"""Other labs' cells: a model set on PBC test cells, on LISC (another hospital), and on synthetic shifts of PBC.

    .venv/bin/python benchmarks/cross_lab.py [--models models/default ...] [--name NAME]

No Django: the ML core alone. The PBC test cells are the ones every training leaves out (the 8/1/1
split by sha256, seed 0, as `assign_dataset_splits` stores it). LISC (../shared/data/lisc/cells, 242
white cells of five mature types from a hospital in Tehran, dim and quantised) was never trained on.
The synthetic shifts turn each PBC test cell the same fixed way (no randomness beyond a per-cell noise
seed), each standing for a kind of lab: a dim camera, a yellow background (rapid stains), another stain
balance, half the magnification, 120 px tight crops at two-thirds scale, blur with JPEG artefacts, and
all of dim + yellow + half magnification together. Each source is one run: its scale is measured over it.

Writes benchmarks/results/cross_lab-<name>.{json,md}.
"""

import argparse
import csv
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, write_result  # noqa: E402
from hemoweb.ml.data import RGB_FROM_HED, assign_splits  # noqa: E402
from hemoweb.ml.evaluate import evaluate_tree  # noqa: E402
from hemoweb.ml.infer import TreeClassifier  # noqa: E402
from hemoweb.ml.standardise import background_of  # noqa: E402
from hemoweb.ml.tree import CellTree  # noqa: E402


def label_map() -> dict[str, str]:
    with (DATA / "pbc" / "label_map.csv").open() as handle:
        return {row["label"]: row["cell_type_code"] for row in csv.DictReader(handle)}


def pbc_test() -> list[tuple[Path, str]]:
    mapping = label_map()
    with (DATA / "pbc" / "labels.csv").open() as handle:
        rows = [(DATA / "pbc" / row["path"], mapping[row["label"]]) for row in csv.DictReader(handle)]
    keys = [hashlib.sha256(path.read_bytes()).hexdigest() for path, _ in rows]
    splits = assign_splits(keys, [code for _, code in rows], seed=0)
    return [row for row, split in zip(rows, splits, strict=True) if split == "test"]


def lisc() -> list[tuple[Path, str]]:
    mapping = label_map()
    return [(path, mapping[path.parent.name]) for path in sorted((DATA / "lisc" / "cells").glob("*/*.png"))]


# --- synthetic shifts (fixed, per cell) -------------------------------------------------------------


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8))


def dim_camera(image: Image.Image, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).normal(0, 2 / 255, (image.height, image.width, 3))
    return _image(_array(image) * 0.25 + noise)


def yellow_background(image: Image.Image, seed: int) -> Image.Image:
    return _image(_array(image) * np.array([1.0, 0.93, 0.62]) * 0.92)


def other_stain(image: Image.Image, seed: int) -> Image.Image:
    od = -np.log(_array(image).clip(1 / 255, 1))
    matrix = RGB_FROM_HED.double().numpy()
    hed = od @ np.linalg.inv(matrix) * np.array([1.35, 0.7, 1.0])
    return _image(np.exp(-(hed @ matrix)))


def half_magnification(image: Image.Image, seed: int) -> Image.Image:
    """The same crop size in pixels at half the magnification: the cell half as large, in twice the field (the
    field beyond the PBC crop is the crop's own background colour)."""
    small = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", image.size, tuple(int(v * 255) for v in background_of(_array(image))))
    canvas.paste(small, ((image.width - small.width) // 2, (image.height - small.height) // 2))
    return canvas


def tight_crop_120(image: Image.Image, seed: int) -> Image.Image:
    side = min(image.size) // 2  # half the field, shown at 120 px: two-thirds of PBC's scale
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((120, 120), Image.Resampling.LANCZOS)


def blur_jpeg(image: Image.Image, seed: int) -> Image.Image:
    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(1.5)).save(buffer, "JPEG", quality=25)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def all_together(image: Image.Image, seed: int) -> Image.Image:
    return dim_camera(yellow_background(half_magnification(image, seed), seed), seed)


SHIFTS = {"dim camera": dim_camera, "yellow background": yellow_background, "other stain": other_stain,
          "half magnification": half_magnification, "120 px tight crops": tight_crop_120,
          "blur + JPEG 25": blur_jpeg, "dim + yellow + half magnification": all_together}


def loader(path: Path, shift=None, seed: int = 0):
    def load():
        with Image.open(path) as image:
            image = image.convert("RGB")
        return shift(image, seed) if shift else image
    return load


KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "coverage")


def row(result: dict) -> dict:
    run = result.get("scale", {}).get("run", {})
    return {**{key: result[key] for key in KEYS}, "coarse8_accuracy": result["coarse8"]["accuracy"],
            "coarse8_balanced_accuracy": result["coarse8"]["balanced_accuracy"],
            "forced_coarse8_accuracy": result["forced"]["coarse8"]["accuracy"],
            "forced_balanced_accuracy": result["forced"]["balanced_accuracy"],
            "selective_accuracy": result.get("selective_accuracy"), "unfamiliar_share": result.get("unfamiliar_share"),
            "scale_source": run.get("source"), "scale_ratio": run.get("ratio"),
            "per_code_recall": {code: v["recall"] for code, v in result["per_code"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/default"])
    parser.add_argument("--name", default="latest")
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS), help="Which synthetic shifts (default: all).")
    args = parser.parse_args()
    tree = CellTree.default()
    test, other = pbc_test(), lisc()
    sources = {"PBC test": [(loader(p), c) for p, c in test], "LISC (Tehran)": [(loader(p), c) for p, c in other]}
    for name in args.shifts:
        sources[f"PBC test, {name}"] = [(loader(p, SHIFTS[name], i), c) for i, (p, c) in enumerate(test)]
    results = {}
    for folder in args.models:
        classifier = TreeClassifier(REPO / folder, tree)
        results[folder] = {}
        for name, items in sources.items():
            results[folder][name] = row(evaluate_tree(classifier, items))
            print(folder, name, {k: results[folder][name][k] for k in ("balanced_accuracy", "coarse8_accuracy",
                                                                       "coverage", "selective_accuracy",
                                                                       "unfamiliar_share", "scale_source",
                                                                       "scale_ratio")},
                  flush=True)
    path = write_result(f"cross_lab-{args.name}", {"models": args.models, "results": results})
    lines = [f"# Other labs' cells ({path.stem})", "", "Balanced accuracy down the tree (refusals count as wrong) · "
             "8-class accuracy · forced 8-class accuracy (no refusals) · coverage · scale used (source, × training)", ""]
    for folder, by_source in results.items():
        lines += [f"## {folder}", "", "| cells | n | balanced acc. | 8 classes | 8 classes forced | coverage | scale |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in by_source.items():
            scale = f"{r['scale_source']} {r['scale_ratio']}" if r["scale_source"] else "—"
            lines.append(f"| {name} | {r['n']} | {r['balanced_accuracy']:.3f} | {r['coarse8_accuracy']:.3f} | "
                         f"{r['forced_coarse8_accuracy']:.3f} | {r['coverage']:.3f} | {scale} |")
        lines.append("")
    (RESULTS / f"{path.stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
