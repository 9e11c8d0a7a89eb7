"""Cells of types a set does not know: train without some types, then count how many of their cells land in review.

    .venv/bin/python benchmarks/leave_one_out.py [--leave-out BAS EBO] [--epochs 6] [--image-size 128]

No Django: the ML core alone. A set is trained on the PBC cells (the 8/1/1 split by sha256, seed 0, as
`assign_dataset_splits` stores it) without the left-out types, from the ImageNet EfficientNet-Lite0 weights
(models/pretrained, `python manage.py convert_pretrained`), with a shared backbone and `--cross-lab`, as the
shipped set is trained; its familiarity statistics are fitted at the end of training on its own training
cells, the threshold on its validation cells, neither of which holds a left-out cell. Then:

- every cell of a left-out type (the set has never seen one): the share flagged `unfamiliar`, the share in
  review (flagged, or unsure anywhere down the tree), and what the others were taken for;
- the PBC test cells of the known types: the share flagged and the coverage (the price on the lab's own cells).

The training keeps epoch checkpoints in var/leave-out/<types>-<size>px: run the command again to go on.
Writes benchmarks/results/leave_one_out-<types>.{json,md}.
"""

import argparse
import csv
import hashlib
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, hardware, write_result  # noqa: E402
from hemoweb.ml.data import assign_splits  # noqa: E402
from hemoweb.ml.familiarity import fit_familiarity, record_familiarity  # noqa: E402
from hemoweb.ml.infer import TreeClassifier  # noqa: E402
from hemoweb.ml.train import CellRecord, Progress, TrainConfig, train_tree  # noqa: E402
from hemoweb.ml.tree import CellTree  # noqa: E402
from hemoweb.ml.weights import read_set, write_set  # noqa: E402


def pbc_cells() -> list[CellRecord]:
    with (DATA / "pbc" / "label_map.csv").open() as handle:
        mapping = {row["label"]: row["cell_type_code"] for row in csv.DictReader(handle)}
    with (DATA / "pbc" / "labels.csv").open() as handle:
        rows = [(DATA / "pbc" / row["path"], mapping[row["label"]]) for row in csv.DictReader(handle)]
    keys = [hashlib.sha256(path.read_bytes()).hexdigest() for path, _ in rows]
    splits = assign_splits(keys, [code for _, code in rows], seed=0)
    return [CellRecord(str(path), code, split) for (path, code), split in zip(rows, splits, strict=True)]


def left_out_by(tree: CellTree, codes: list[str]):
    """Whether a tree code is one of the left-out types or below one."""
    return lambda code: any(left in tree.path(code) for left in codes)


def review(classifier: TreeClassifier, cells: list[CellRecord]) -> dict:
    """Classify cells as one run; the shares flagged unfamiliar and in review, and what they were called."""
    images = []
    for cell in cells:
        with Image.open(cell.path) as image:
            images.append(image.convert("RGB"))
    started = time.perf_counter()
    predictions = classifier.classify(images)
    seconds = time.perf_counter() - started
    n = len(predictions)
    unfamiliar = sum(p.unfamiliar for p in predictions)
    in_review = sum(p.unfamiliar or not p.resolved for p in predictions)
    unflagged = Counter(p.code for p in predictions if not (p.unfamiliar or not p.resolved))
    return {"n": n, "unfamiliar_share": round(unfamiliar / n, 4), "review_share": round(in_review / n, 4),
            "coverage": round(1 - in_review / n, 4), "unflagged_as": dict(unflagged.most_common()),
            "accuracy_unflagged": round(sum(p.code == c.label for p, c in zip(predictions, cells, strict=True)
                                            if p.resolved and not p.unfamiliar) / max(1, n - in_review), 4),
            "ms_per_cell": round(1000 * seconds / n, 2)}


def refit(folder: Path, tree: CellTree, known: list[CellRecord]) -> None:
    """The set's familiarity statistics fitted again on its training cells, the threshold on its validation cells."""
    classifier = TreeClassifier(folder, tree)
    classifier.set_card.familiarity = ""  # the statistics being replaced take no part
    train = [cell for cell in known if cell.split == "train"]
    val = [cell for cell in known if cell.split == "val"]
    card = fit_familiarity(classifier, [loader(cell.path) for cell in train], [cell.label for cell in train],
                           [loader(cell.path) for cell in val], val_labels=[cell.label for cell in val],
                           fitted_on="train split", threshold_on="val split")
    set_card = read_set(folder)
    record_familiarity(set_card, card)
    write_set(folder, set_card)
    print(f"familiarity refitted: {card['method']}, threshold {card['threshold']:.4f}", flush=True)


def loader(path: str):
    def load() -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave-out", nargs="+", default=["BAS", "EBO"], help="Tree codes never shown in training.")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refit", action="store_true",
                        help="Fit the familiarity statistics again (after the method changed) on the same cells.")
    args = parser.parse_args()
    tree = CellTree.default()
    cells = pbc_cells()
    unknown = left_out_by(tree, args.leave_out)
    known = [cell for cell in cells if not unknown(cell.label)]
    held = [cell for cell in cells if unknown(cell.label)]
    tag = "-".join(args.leave_out)
    folder = REPO / "var" / "leave-out" / f"{tag}-{args.image_size}px"
    pretrained = REPO / "models" / "pretrained" / "tf_efficientnet_lite0.safetensors"
    config = TrainConfig(architecture="tf_efficientnet_lite0", mode="pretrained_aug", epochs=args.epochs,
                         image_size=args.image_size, batch_size=32, warmup_epochs=0.3, patience=3,
                         threads=args.threads, shared_backbone=True, cross_lab=True, pretrained_file=str(pretrained))
    started = time.perf_counter()
    if not (folder / "familiarity.json").is_file():
        def report(progress: Progress) -> None:
            if progress.kind in ("log", "plan", "node", "epoch"):
                print(progress.kind, progress.node, progress.epoch or "", progress.message, flush=True)
        train_tree(tree, known, config, folder, name=f"without-{tag}", callback=report)
    trained_s = time.perf_counter() - started
    if args.refit:
        refit(folder, tree, known)
    classifier = TreeClassifier(folder, tree)
    results = {"left_out": {code: review(classifier, [c for c in held if code in tree.path(c.label)])
                            for code in args.leave_out},
               "known_test": review(classifier, [cell for cell in known if cell.split == "test"])}
    for name, result in {**results["left_out"], "known test": results["known_test"]}.items():
        print(name, result, flush=True)
    payload = {"leave_out": args.leave_out, "folder": str(folder.relative_to(REPO)), "epochs": args.epochs,
               "image_size": args.image_size, "n_train": sum(c.split == "train" for c in known),
               "training_s": round(trained_s), "results": results}
    path = write_result(f"leave_one_out-{tag}", payload)
    lines = [f"# Types the set does not know ({path.stem})", "", "Hardware: {cpu}, {cores} cores, torch {torch}.".format_map(hardware()), "",
             f"A set trained without {', '.join(args.leave_out)} ({args.image_size} px, {args.epochs} epochs, "
             f"{payload['n_train']} training cells, shared EfficientNet-Lite0 from ImageNet, --cross-lab), "
             "familiarity fitted on its training cells with the threshold on its validation cells "
             f"({read_set(folder).metrics.get('familiarity', {}).get('method', 'mahalanobis')}).", "",
             "| cells | n | flagged unfamiliar | in review (flagged or unsure) | unflagged taken for |",
             "|---|---|---|---|---|"]
    for name, r in {**{f"{code} (never seen)": v for code, v in results["left_out"].items()},
                    "known types, PBC test": results["known_test"]}.items():
        taken = ", ".join(f"{code} {count}" for code, count in r["unflagged_as"].items()) or "—"
        lines.append(f"| {name} | {r['n']} | {r['unfamiliar_share']:.1%} | {r['review_share']:.1%} | {taken} |")
    known_test = results["known_test"]
    lines += ["", f"Known types: coverage {known_test['coverage']:.3f}, accuracy on the unflagged cells "
                  f"{known_test['accuracy_unflagged']:.3f}."]
    (RESULTS / f"{path.stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
