"""Which familiarity score tells cells of a type the set never saw from its own cells? Measured on a leave-out set.

    .venv/bin/python benchmarks/familiarity_methods.py --leave-out BAS EBO [--image-size 128]

Needs the set `benchmarks/leave_one_out.py` trained without those types (var/leave-out/<types>-<size>px). No
Django. Every score is fitted on the set's training cells (which hold no left-out cell); each threshold is the
98 % (or 95 %) quantile of its validation cells; the left-out types' cells and the known types' test cells are
only scored. Scores:

- `md`: Mahalanobis distance to the nearest class mean, one shared covariance, on the pooled final features
  (Lee et al. 2018; what hemoweb ships);
- `rmd`: relative Mahalanobis (Ren et al. 2021): `md` minus the distance to one Gaussian of all training cells,
  which removes what every cell shares (background, stain) and keeps what tells types apart;
- `knn`: 1 − cosine similarity to the 10th nearest training cell (Sun et al. 2022);
- `md_layers`: `md` on the pooled output of every backbone stage from the 4th on and the final features, each
  standardised by its validation scores and summed (Lee et al.'s feature ensemble, without tuned weights);
- `rmd_layers`: the same with `rmd`;
- `knn_layers`: `knn` on every stage's pooled output from the 4th on and the final features, each L2-normalised,
  concatenated;
- `knn_2000`, `knn_pca256`: `knn` against 2,000 training cells drawn at random, and in the first 256 principal
  components of the training features (what a set can ship: 5 MB and 1 MB in float16 instead of 14 MB);
- `knn+rmd`: the two standardised and summed;
- `knn_pca256 or md`: either `knn_pca256` or `md` over its own scale (its validation cells' 99 % quantile): the
  neighbours see near types, the Mahalanobis distance what is far from every class (noise, another kind of image).

Features are computed once and kept in the set's folder (study-features.safetensors).

Writes benchmarks/results/familiarity_methods-<types>.{json,md}.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, hardware, write_result  # noqa: E402
from benchmarks.leave_one_out import left_out_by, pbc_cells  # noqa: E402
from hemoweb.ml.familiarity import RIDGE, Familiarity, fit_statistics  # noqa: E402
from hemoweb.ml.infer import TreeClassifier, _at_size  # noqa: E402
from hemoweb.ml.preprocess import model_input  # noqa: E402
from hemoweb.ml.tree import CellTree  # noqa: E402

FIRST_STAGE = 3  # stages 0-2 see edges and colour: stain, not cell type


def layer_features(classifier: TreeClassifier, paths: list[str], batch: int = 64) -> list[torch.Tensor]:
    """Pooled features of each backbone stage from FIRST_STAGE on, and the final pooled features, per cell."""
    backbone, card = classifier.backbone()  # the torch module: the hooks need its stages
    captured: list[torch.Tensor] = []
    hooks = [stage.register_forward_hook(lambda _m, _i, out: captured.append(out.mean(dim=(2, 3))))
             for stage in list(backbone.blocks)[FIRST_STAGE:]]
    per_layer: list[list[torch.Tensor]] = []
    try:
        for start in range(0, len(paths), 256):
            images = []
            for path in paths[start:start + 256]:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            prepared, _ = classifier._prepare(images, None, None)
            with torch.inference_mode():
                for first in range(0, len(prepared), batch):
                    stacked = torch.stack([_at_size(image, card) for image in prepared[first:first + batch]])
                    captured.clear()
                    final = backbone(model_input(stacked, card)).float()
                    outputs = [*captured, final]
                    if not per_layer:
                        per_layer = [[] for _ in outputs]
                    for store, out in zip(per_layer, outputs, strict=True):
                        store.append(out.float())
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in per_layer]


class Relative:
    """Relative Mahalanobis: class-conditional distance minus the distance to one Gaussian of all cells."""

    def __init__(self, features: torch.Tensor, labels: list[str]) -> None:
        means, precision, _ = fit_statistics(features, labels, RIDGE)
        self.classes = Familiarity(means, precision, {"threshold": 0.0})
        mean, background, _ = fit_statistics(features, ["all"] * len(features), RIDGE)
        self.background = Familiarity(mean, background, {"threshold": 0.0})

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.classes.scores(features) - self.background.scores(features)


class Nearest:
    def __init__(self, features: torch.Tensor, k: int = 10, sample: int = 0, components: int = 0) -> None:
        self.k, self.projection = k, None
        if sample and sample < len(features):
            features = features[torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:sample]]
        if components:
            self.mean = features.mean(dim=0)
            self.projection = torch.linalg.svd(features - self.mean, full_matrices=False).Vh[:components].T
            features = self._project(features)
        self.bank = torch.nn.functional.normalize(features, dim=1)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.projection is None else (features - self.mean) @ self.projection

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        similarity = torch.nn.functional.normalize(self._project(features), dim=1) @ self.bank.T
        return 1 - similarity.topk(self.k, dim=1).values[:, -1]


class Sum:
    """Scorers on the same features, standardised by their validation scores and summed."""

    def __init__(self, scorers: list, val: torch.Tensor) -> None:
        self.scorers = scorers
        scores = [scorer.scores(val) for scorer in scorers]
        self.centre, self.spread = [s.mean() for s in scores], [s.std() + 1e-9 for s in scores]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return sum((scorer.scores(features) - c) / s
                   for scorer, c, s in zip(self.scorers, self.centre, self.spread, strict=True))


class Either:
    """Scorers on the same features, each divided by its validation cells' 99 % quantile; a cell scores its largest
    (over 1 where any one finds it strange)."""

    def __init__(self, scorers: list, val: torch.Tensor) -> None:
        self.scorers = scorers
        self.scale = [torch.quantile(scorer.scores(val).double(), 0.99).float() for scorer in scorers]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([scorer.scores(features) / scale
                            for scorer, scale in zip(self.scorers, self.scale, strict=True)]).max(dim=0).values


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.nn.functional.normalize(part, dim=1) for part in parts], dim=1)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an outside cell scores higher than an inside one), ties half."""
    greater = (outside[:, None] > inside[None, :]).double().mean()
    ties = (outside[:, None] == inside[None, :]).double().mean()
    return round(float(greater + ties / 2), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave-out", nargs="+", default=["BAS", "EBO"])
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    tree = CellTree.default()
    tag = "-".join(args.leave_out)
    folder = REPO / "var" / "leave-out" / f"{tag}-{args.image_size}px"
    classifier = TreeClassifier(folder, tree)
    unknown = left_out_by(tree, args.leave_out)
    cells = pbc_cells()
    groups = {"train": [c for c in cells if not unknown(c.label) and c.split == "train"],
              "val": [c for c in cells if not unknown(c.label) and c.split == "val"],
              "known test": [c for c in cells if not unknown(c.label) and c.split == "test"]}
    for code in args.leave_out:
        groups[f"{code} (never seen)"] = [c for c in cells if code in tree.path(c.label)]
    cache = folder / "study-features.safetensors"
    stored = load_file(cache) if cache.is_file() else {}
    features = {}
    for name, group in groups.items():
        layers_of = sorted(key for key in stored if key.startswith(f"{name}|"))
        features[name] = ([stored[key] for key in layers_of] if layers_of else
                          layer_features(classifier, [c.path for c in group]))
    save_file({f"{name}|{i:02d}": part.contiguous() for name, parts in features.items()
               for i, part in enumerate(parts)}, cache)
    for name in groups:
        features[name].append(joined(features[name]))  # the last entry: every layer, joined
    labels = [c.label for c in groups["train"]]
    final, together = len(features["train"]) - 2, len(features["train"]) - 1
    train, val = features["train"], features["val"]
    methods: dict[str, list] = {  # per method: (layer, scorer) pairs, their standardised scores summed
        "md": [(final, Familiarity(*fit_statistics(train[final], labels, RIDGE)[:2], {"threshold": 0}))],
        "rmd": [(final, Relative(train[final], labels))],
        "knn": [(final, Nearest(train[final]))],
        "md_layers": [(i, Familiarity(*fit_statistics(train[i], labels, RIDGE)[:2], {"threshold": 0}))
                      for i in range(final + 1)],
        "rmd_layers": [(i, Relative(train[i], labels)) for i in range(final + 1)],
        "knn_layers": [(together, Nearest(train[together]))],
        "knn_2000": [(final, Nearest(train[final], sample=2000))],
        "knn_pca256": [(final, Nearest(train[final], components=256))],
        "knn+rmd": [(final, Sum([Nearest(train[final]), Relative(train[final], labels)], val[final]))],
        "knn_pca256 or md": [(final, Either([Nearest(train[final], components=256),
                                          Familiarity(*fit_statistics(train[final], labels, RIDGE)[:2],
                                                      {"threshold": 0})], val[final]))],
    }
    results = {}
    for method, scorers in methods.items():
        raw = {name: [scorer.scores(features[name][i]) for i, scorer in scorers] for name in groups if name != "train"}
        centre = [part.mean() for part in raw["val"]]
        spread = [part.std() + 1e-9 for part in raw["val"]]
        scores = {name: sum((part - c) / s for part, c, s in zip(parts, centre, spread, strict=True))
                  for name, parts in raw.items()}
        result = {}
        for quantile in (0.98, 0.95):
            threshold = torch.quantile(scores["val"].double(), quantile)
            result[f"flagged_at_{quantile:.0%}"] = {name: round(float((value > threshold).double().mean()), 4)
                                                   for name, value in scores.items()}
        result["auroc"] = {name: auroc(scores["known test"], value) for name, value in scores.items()
                           if name.endswith("(never seen)")}
        results[method] = result
        print(method, result, flush=True)
    path = write_result(f"familiarity_methods-{tag}", {"leave_out": args.leave_out, "folder": str(folder.relative_to(REPO)),
                                                     "n": {name: len(group) for name, group in groups.items()},
                                                     "results": results})
    unseen = [name for name in groups if name.endswith("(never seen)")]
    lines = [f"# Familiarity scores against types never seen ({path.stem})", "",
             "Hardware: {cpu}, {cores} cores, torch {torch}.".format_map(hardware()), "",
             f"Set trained without {', '.join(args.leave_out)} ({folder.relative_to(REPO)}); scores fitted on its "
             f"{len(groups['train'])} training cells, thresholds on its {len(groups['val'])} validation cells.", "",
             "| score | " + " | ".join(f"AUROC {name}" for name in unseen) + " | " +
             " | ".join(f"flagged {name} (98 % / 95 %)" for name in unseen) + " | flagged known test (98 % / 95 %) |",
             "|---" * (2 * len(unseen) + 2) + "|"]
    for method, r in results.items():
        flagged = [f"{r['flagged_at_98%'][name]:.1%} / {r['flagged_at_95%'][name]:.1%}" for name in [*unseen, "known test"]]
        lines.append(f"| {method} | " + " | ".join(f"{r['auroc'][name]:.3f}" for name in unseen) + " | " +
                     " | ".join(flagged) + " |")
    (RESULTS / f"{path.stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
