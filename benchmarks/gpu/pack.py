"""Pack what a GPU session needs to train the default set, small enough to travel (< 64 MiB with the tree).

    .venv/bin/python benchmarks/gpu/pack.py [--dataset PBC] [--size 224] [--quality 80] [--out .gpu]

Run it here, where the dataset is imported. Every cell of the dataset is resized to the training size
exactly as training would resize it, stored as WebP (a 224 px PBC copy is about 27 MB), and listed in
`cells.csv` with its tree code and its split. The splits are assigned and stored in the database first,
so the GPU run and a later `evaluate_tree` here use the same test cells. The ImageNet start weights go
along as float16. `.gpu/` is git-ignored: name it in the device call's `carry`.
"""

import argparse
import csv
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hemoweb.settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="PBC")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=80, help="WebP quality")
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="whose ImageNet weights to take along")
    parser.add_argument("--limit", type=int, default=0, help="only N cells spread over the dataset (to try the kit)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from django.core.files.storage import default_storage
    from PIL import Image
    from safetensors.torch import load_file

    from apps.cells.models import Dataset
    from apps.training.services import assign_dataset_splits
    from hemoweb.ml.data import decode_one
    from hemoweb.ml.train import interpolation_for
    from hemoweb.ml.weights import as_half, write_safetensors

    dataset = Dataset.objects.get(name=args.dataset)
    print("splits:", assign_dataset_splits(dataset))
    cells = list(dataset.cells.order_by("pk").values_list("pk", "image", "cell_type__code", "split"))
    if args.limit:
        cells = cells[::max(1, len(cells) // args.limit)][:args.limit]
    images = args.out / "images"
    shutil.rmtree(args.out, ignore_errors=True)
    images.mkdir(parents=True)
    interpolation = interpolation_for(args.arch)

    def pack(cell) -> list[str]:
        pk, image, code, split = cell
        pixels = decode_one(default_storage.path(image), args.size, interpolation)
        name = f"images/{pk}.webp"
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(args.out / name, "WEBP", quality=args.quality, method=6)
        return [name, code, split]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        rows = list(pool.map(pack, cells))
    with open(args.out / "cells.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    (args.out / "pack.json").write_text(json.dumps({"dataset": args.dataset, "size": args.size,
                                                   "interpolation": interpolation, "quality": args.quality}))
    start = Path(settings.MODELS_DIR) / "pretrained" / f"{args.arch}.safetensors"
    if start.is_file():
        write_safetensors(args.out / "pretrained" / start.name, as_half(load_file(str(start))))
    else:
        print(f"No ImageNet weights at {start} (run `manage.py convert_pretrained`): the GPU run will start from scratch.")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{len(rows)} cells packed into {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
