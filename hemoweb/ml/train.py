"""Training the hierarchical classifier: a classifier per inner tree node, written as a model set.

`train_tree` decodes every image once, trains each node top-down (AdamW, warm-up + cosine, label
smoothing, early stopping on validation macro-F1, best epoch kept), writes `<NODE>.safetensors` +
card as each node finishes and `set.json` at the end. An epoch checkpoint per node lets a run that
was killed continue where it stopped. Progress goes to one callback, which may raise to cancel.

With `shared_backbone` the nodes are heads on one backbone, trained together (each cell feeds the
heads of every node it is an example of): one backbone pass per cell instead of one per node, in
training and in classification.
"""

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .data import (AugmentConfig, Augmenter, DataError, LabShift, NodeSet, build_node_sets, decode_cache,
                   training_scale)
from .evaluate import choose_second_look, record_second_look
from .familiarity import FAMILIARITY_FILE, fit_familiarity, record_familiarity
from .infer import TreeClassifier, pick_device
from .standardise import colour_card, colour_reference, white_balance
from .metrics import choose_threshold, classification_metrics
from .tree import CellTree, resolve_single_path
from .weights import (ModelCard, ModelFileError, ModelSetCard, as_half, classifier_key, create_model, read_card,
                      save_state, write_safetensors, write_set)

MODES = ("scratch", "pretrained", "pretrained_aug")
CHECKPOINTS = "checkpoints"
SHARED = "shared"  # progress label and checkpoint name of a shared-backbone run
BACKBONE = "backbone.safetensors"


class TrainingError(ValueError):
    """The training cannot start or cannot go on; the message is meant for a lab user."""


class TrainingCancelled(Exception):
    """Raised by a progress callback to stop a run; checkpoints stay for a later resume."""


@dataclass
class TrainConfig:
    architecture: str = "mobilenetv3_small_100"
    mode: str = "scratch"
    epochs: int = 10
    image_size: int = 128
    batch_size: int = 64
    lr: float | None = None  # None: 2e-3 from scratch, 5e-4 from pretrained weights
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 5
    min_images: int = 10
    balance: str = "cap"  # cap | weights | none
    balance_threshold: int = 1000
    seed: int = 0
    device: str = "auto"
    augment: bool | None = None  # None: on for pretrained_aug only
    pretrained_file: str = ""  # empty: <pretrained_dir>/<architecture>.safetensors
    pretrained_dir: str = "models/pretrained"
    nodes: list[str] = field(default_factory=list)  # empty: every trainable inner node
    threads: int = 0  # 0: leave torch's default
    decode_workers: int = 2
    min_coverage: float = 0.98  # for the per-node confidence threshold
    max_steps_per_epoch: int = 0  # 0: the whole training set every epoch
    shared_backbone: bool = False  # one backbone with a head per node: one pass per cell, in training and use
    cross_lab: bool = False  # white balance on the background, other-lab augmentation, the training scale measured

    @property
    def use_augmentation(self) -> bool:
        return self.mode == "pretrained_aug" if self.augment is None else self.augment

    @property
    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        return 2e-3 if self.mode == "scratch" else 5e-4


@dataclass
class CellRecord:
    """One labelled image as training sees it."""

    path: str
    label: str  # tree code
    split: str  # train | val | test


@dataclass
class Progress:
    kind: str  # plan | decode | step | epoch | node | log
    node: str = ""
    node_index: int = 0  # 1-based
    node_count: int = 0
    epoch: int = 0  # 1-based
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    message: str = ""
    metrics: dict = field(default_factory=dict)


Callback = Callable[[Progress], None]


def _silent(_: Progress) -> None:
    pass


def check_config(config: TrainConfig) -> Path | None:
    """Fail fast, before any image is decoded: unknown architecture or mode, missing pretrained weights."""
    import timm

    if config.mode not in MODES:
        raise TrainingError(f"Unknown training mode {config.mode!r}: use one of {', '.join(MODES)}.")
    if not timm.is_model(config.architecture):
        raise TrainingError(f"Unknown architecture {config.architecture!r}: it is not a timm model name "
                            "(for example resnet18, mobilenetv3_small_100, tf_efficientnet_lite0).")
    if config.epochs < 1 or config.image_size < 16 or config.batch_size < 2:
        raise TrainingError("Epochs must be at least 1, the image size at least 16 px and the batch size at least 2.")
    if config.mode == "scratch":
        return None
    path = Path(config.pretrained_file) if config.pretrained_file else (
        Path(config.pretrained_dir) / f"{config.architecture}.safetensors")
    if not path.is_file():
        hint = (" Run `python manage.py convert_pretrained` to create it from the installed EfficientNet-Lite0 "
                "ImageNet weights." if config.architecture == "tf_efficientnet_lite0" else
                f" Put ImageNet weights for {config.architecture} there (safetensors with timm key names), "
                "or train from scratch.")
        raise TrainingError(f"Mode {config.mode} needs pretrained weights: expected the file {path}.{hint}")
    return path


def train_tree(
    tree: CellTree,
    cells: Sequence[CellRecord],
    config: TrainConfig,
    out_dir: Path,
    *,
    name: str = "",
    callback: Callback | None = None,
    data_info: dict | None = None,
) -> ModelSetCard:
    """Train every trainable inner node on `cells` (splits already assigned) and write a model set into `out_dir`.

    Nodes whose weights are already in `out_dir` are kept (a resumed run); a node with an epoch
    checkpoint continues from it.
    """
    callback = callback or _silent
    pretrained = check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(pick_device(config.device))
    labels = [cell.label for cell in cells]
    try:
        node_sets, skipped = build_node_sets(
            tree, labels, [cell.split for cell in cells], nodes=config.nodes, min_images=config.min_images,
            balance=config.balance, balance_threshold=config.balance_threshold, seed=config.seed)
    except DataError as error:
        raise TrainingError(str(error)) from error
    for plan in skipped:
        callback(Progress("log", node=plan.node, message=f"{plan.node} skipped: {plan.skipped}"))
    if not node_sets:
        reasons = "; ".join(f"{plan.node}: {plan.skipped}" for plan in skipped) or "no inner node has data"
        raise TrainingError(f"No node of the tree can be trained with this data ({reasons}).")
    for node_set in node_sets:
        counts = ", ".join(f"{code} {node_set.counts['train'].get(code, 0)}/{node_set.counts['val'].get(code, 0)}/"
                           f"{node_set.counts['test'].get(code, 0)}" for code in node_set.classes)
        callback(Progress("plan", node=node_set.node, message=f"{node_set.node} train/val/test per class: {counts}"))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used = sorted({index for ns in node_sets for part in (ns.train, ns.val, ns.test) for index, _ in part})
    done = {ns.node for ns in node_sets if (out_dir / f"{ns.node}.safetensors").is_file()}
    if config.shared_backbone and not ((out_dir / BACKBONE).is_file() and len(done) == len(node_sets)):
        done = set()  # the heads belong to one backbone: an unfinished set is trained (or resumed) as a whole
    cache = torch.empty(0)
    row = {index: position for position, index in enumerate(used)}
    if len(done) < len(node_sets):
        started = time.perf_counter()
        cache = decode_cache([cells[i].path for i in used], config.image_size, interpolation_for(config.architecture),
                             workers=config.decode_workers,
                             progress=lambda step, total: callback(Progress("decode", step=step, steps=total)))
        callback(Progress("log", message=f"Decoded {len(used)} images at {config.image_size} px "
                                         f"in {time.perf_counter() - started:.1f} s."))
        if device.type == "cuda":
            cache = cache.to(device)  # 6.7k cells at 224 px are 1 GB: decode once, feed from GPU memory
    remapped = [NodeSet(
        node=ns.node, classes=ns.classes,
        train=[(row[i], c) for i, c in ns.train], val=[(row[i], c) for i, c in ns.val],
        test=[(row[i], c) for i, c in ns.test], counts=ns.counts, available=ns.available,
        class_weights=ns.class_weights) for ns in node_sets]
    cards: dict[str, ModelCard] = {node: read_card(out_dir / f"{node}.safetensors") for node in sorted(done)}
    scale: dict = {}
    if config.cross_lab:  # the training cells are the scale's reference: the network sees them as they are
        scale = training_scale([cells[i].path for i in used if cells[i].split == "train"], seed=config.seed).as_card()
        callback(Progress("log", message=f"Training scale: red cells {scale['px_per_um']:.2f} px/µm, a field of "
                                         f"{scale['field_um']:.1f} µm; white cells {scale['white_cell_um']:.1f} µm."))
    for node in sorted(done):
        callback(Progress("log", node=node, message=f"{node} already trained: kept."))

    def finish(node_set: NodeSet, card: ModelCard) -> None:
        card.resolves_to = {code: resolved for code in card.classes
                            if (resolved := resolve_single_path(tree, labels, code)) != code}
        card.class_names = [tree.names.get(code, code) for code in card.classes]
        card.scale = scale
        card.data = {**(data_info or {}), "counts": node_set.counts, "available_train": node_set.available}
        cards[node_set.node] = card

    def announce(node: str, node_index: int, node_count: int) -> None:
        test = cards[node].metrics["test"]
        callback(Progress("node", node=node, node_index=node_index, node_count=node_count, metrics=test,
                          message=f"{node} done: test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}"))

    if config.shared_backbone and not done:
        model, trained = train_heads(remapped, cache, config, device, label=SHARED, pretrained=pretrained,
                                     checkpoint_dir=out_dir / CHECKPOINTS, callback=callback)
        backbone_card = ModelCard(architecture=config.architecture, node=SHARED, classes=[],
                                  input_size=config.image_size, mean=trained[node_sets[0].node].mean,
                                  std=trained[node_sets[0].node].std, interpolation=interpolation_for(config.architecture),
                                  mode=config.mode, data=dict(data_info or {}), split_seed=config.seed,
                                  colour=trained[node_sets[0].node].colour, scale=scale)
        save_state(model.backbone.state_dict(), backbone_card, out_dir / BACKBONE)
        for node_set in remapped:
            finish(node_set, trained[node_set.node])
            cards[node_set.node].backbone = BACKBONE
            save_state(model.heads[node_set.node].state_dict(), cards[node_set.node],
                       out_dir / f"{node_set.node}.safetensors")
        _drop_checkpoint(out_dir, SHARED)
        for node_index, node_set in enumerate(remapped, 1):
            announce(node_set.node, node_index, len(remapped))
    for node_index, node_set in enumerate(remapped, 1):
        if node_set.node in cards:
            continue
        model, trained = train_heads(
            [node_set], cache, config, device, label=node_set.node, pretrained=pretrained,
            checkpoint_dir=out_dir / CHECKPOINTS, callback=callback, node_index=node_index, node_count=len(remapped))
        finish(node_set, trained[node_set.node])
        save_state(model.node_state(node_set.node), cards[node_set.node], out_dir / f"{node_set.node}.safetensors")
        _drop_checkpoint(out_dir, node_set.node)
        announce(node_set.node, node_index, len(remapped))
    set_card = ModelSetCard(
        name=name or out_dir.name,
        nodes={node: f"{node}.safetensors" for node in cards},
        architecture=config.architecture,
        mode=config.mode,
        input_size=config.image_size,
        backbone=BACKBONE if config.shared_backbone else "",
        metrics={"nodes": {node: _summary(card.metrics.get("test", {})) for node, card in cards.items()}},
        data={**(data_info or {}), "config": asdict(config),
              "skipped": {plan.node: plan.skipped for plan in skipped}},
    )
    write_set(out_dir, set_card)
    val = [index for index in used if cells[index].split == "val"]
    if val:
        images = cache[[row[index] for index in val]] if len(cache) else decode_cache(
            [cells[index].path for index in val], config.image_size, interpolation_for(config.architecture),
            workers=config.decode_workers)
        views, scores = choose_second_look(TreeClassifier(out_dir, tree, device), images,
                                           [cells[index].label for index in val])
        record_second_look(set_card, views, scores)
        write_set(out_dir, set_card)
        tried = ", ".join(f"{k or 'none'} {v:.3f}" for k, v in scores.items())
        callback(Progress("log", message=f"Second look for unsure cells: {views or 'none'} "
                                         f"(whole-tree accuracy on {len(val)} validation cells by views: {tried})."))
    train = [index for index in used if cells[index].split == "train"]
    if config.shared_backbone and train and val:
        _fit_familiarity(tree, cells, train, val, cache, row, config, device, out_dir, set_card, callback)
    return set_card


def _fit_familiarity(tree: CellTree, cells: Sequence[CellRecord], train: list[int], val: list[int], cache: torch.Tensor,
                     row: dict[int, int], config: TrainConfig, device: torch.device, out_dir: Path,
                     set_card: ModelSetCard, callback: Callback) -> None:
    """Familiarity statistics of the finished set: fitted on its training cells, threshold on its validation cells."""
    def images(indices: list[int]) -> list[torch.Tensor]:
        if len(cache):  # views into the decoded cache: no copy of the training set
            return [cache[row[index]] for index in indices]
        return list(decode_cache([cells[index].path for index in indices], config.image_size,
                                 interpolation_for(config.architecture), workers=config.decode_workers))

    card = fit_familiarity(TreeClassifier(out_dir, tree, device), images(train), [cells[i].label for i in train],
                           images(val), val_labels=[cells[i].label for i in val], fitted_on="train split",
                           threshold_on="val split")
    record_familiarity(set_card, card)
    write_set(out_dir, set_card)
    callback(Progress("log", message=f"Familiarity: threshold {card['threshold']:.1f} (the {card['quantile']:.0%} "
                                     f"quantile of {card['n_val']} validation cells), fitted on {card['n_train']} "
                                     "training cells."))


def _drop_checkpoint(out_dir: Path, label: str) -> None:
    for suffix in (".safetensors", ".json"):
        (out_dir / CHECKPOINTS / f"{label}{suffix}").unlink(missing_ok=True)


def _summary(metrics: dict) -> dict:
    return {key: metrics.get(key) for key in ("n", "accuracy", "balanced_accuracy", "macro_f1")}


def interpolation_for(architecture: str) -> str:
    """TensorFlow-ported weights (tf_*) were trained on bicubic resizing."""
    return "bicubic" if architecture.startswith("tf_") else "bilinear"


class HeadedModel(torch.nn.Module):
    """A timm backbone without its classifier, and one linear head per tree node.

    Trained per node it holds one head (a node classifier as the thesis trains it); with a shared
    backbone it holds a head for every node, so a cell costs one backbone pass for the whole tree.
    """

    def __init__(self, backbone: torch.nn.Module, features: int, classifier_key: str, heads: dict[str, int]):
        super().__init__()
        self.backbone = backbone
        self.classifier_key = classifier_key  # where timm's full model keeps the head (for saving node files)
        self.heads = torch.nn.ModuleDict({node: torch.nn.Linear(features, k) for node, k in heads.items()})
        for head in self.heads.values():  # start near zero: see the note in _build_model
            torch.nn.init.normal_(head.weight, std=0.01)
            torch.nn.init.zeros_(head.bias)

    def node_state(self, node: str) -> dict[str, torch.Tensor]:
        """The state dict of timm's full model for this node (backbone + this head)."""
        state = dict(self.backbone.state_dict())
        state.update({f"{self.classifier_key}.{k}": v for k, v in self.heads[node].state_dict().items()})
        return state


def _build_model(config: TrainConfig, node_sets: Sequence[NodeSet], pretrained: Path | None) -> HeadedModel:
    """The backbone (from scratch or a local pretrained file) with a fresh head per node.

    Heads start near zero: timm's EfficientNet/MobileNet init scales the head by 1/sqrt(num_classes);
    with 2–6 classes its first logits reach ±40 and the first epochs are spent undoing that.
    """
    try:
        model = create_model(config.architecture, 2, pretrained)
    except ModelFileError as error:
        raise TrainingError(str(error)) from error
    except RuntimeError as error:
        raise TrainingError(f"The pretrained weights do not fit {config.architecture}: {error}") from error
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear):
        raise TrainingError(f"{config.architecture} has no single linear classifier head, which hemoweb trains per "
                            "node: choose another architecture.")
    key = classifier_key(model)
    model.reset_classifier(0)
    return HeadedModel(model, head.in_features, key, {ns.node: len(ns.classes) for ns in node_sets})


def train_heads(
    node_sets: Sequence[NodeSet],
    cache: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    *,
    label: str,
    pretrained: Path | None = None,
    checkpoint_dir: Path | None = None,
    callback: Callback | None = None,
    node_index: int = 1,
    node_count: int = 1,
) -> tuple[HeadedModel, dict[str, ModelCard]]:
    """Train one backbone with a head per node set on rows of `cache` (uint8 N×3×S×S).

    Every training cell feeds the heads of the nodes it is an example of (the loss is their sum);
    early stopping and the best epoch follow the mean validation macro-F1 over the nodes. `label`
    names the run in progress reports and checkpoints (a node code, or "shared").
    """
    import timm

    callback = callback or _silent
    torch.manual_seed(config.seed)
    model = _build_model(config, node_sets, pretrained)
    data_config = timm.data.resolve_data_config({}, model=model.backbone)
    mean_list, std_list = [float(v) for v in data_config["mean"]], [float(v) for v in data_config["std"]]
    mean = torch.tensor(mean_list, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_list, device=device).view(1, 3, 1, 1)
    cuda = device.type == "cuda"
    model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fns = [torch.nn.CrossEntropyLoss(
        weight=torch.tensor(ns.class_weights, device=device) if ns.class_weights else None,
        label_smoothing=config.label_smoothing, ignore_index=-100) for ns in node_sets]
    # one row per training cell; column j holds its class at node j, or -100 where it is no example of node j
    train_rows = sorted({index for ns in node_sets for index, _ in ns.train})
    position = {index: i for i, index in enumerate(train_rows)}
    train_targets = torch.full((len(train_rows), len(node_sets)), -100, dtype=torch.long)
    for j, ns in enumerate(node_sets):
        for index, target in ns.train:
            train_targets[position[index], j] = target
    train_rows = torch.tensor(train_rows)
    batch_size = min(config.batch_size, len(train_rows))
    steps = len(train_rows) // batch_size  # drop the last partial batch (a batch of 1 breaks batch norm)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    total_steps, warmup = steps * config.epochs, max(1, int(steps * config.warmup_epochs))
    augmenter = None
    if config.use_augmentation:
        augmenter = Augmenter(AugmentConfig(scale=(0.75, 1.33)) if config.cross_lab else AugmentConfig(), seed=config.seed)
    lab_shift = LabShift(seed=config.seed) if config.cross_lab and config.use_augmentation else None
    sample = train_rows[::max(1, len(train_rows) // 512)]  # the training cells' background, from up to ~512 of them
    colour = colour_card(colour_reference(cache[sample.to(cache.device)])) if config.cross_lab else {}
    nodes = [ns.node for ns in node_sets]

    state = {"epoch": 0, "best_score": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [],
             "node_history": {node: [] for node in nodes}}
    best_state = None
    checkpoint = Path(checkpoint_dir) / f"{label}.safetensors" if checkpoint_dir else None
    if checkpoint and checkpoint.is_file():
        state, best_state = _load_checkpoint(checkpoint, model, optimizer)
        callback(Progress("log", node=label, message=f"{label}: resumed after epoch {state['epoch']} from its checkpoint."))

    def report(kind: str, epoch: int, step: int, loss: float | None, **extra) -> None:
        callback(Progress(kind, node=label, node_index=node_index, node_count=node_count, epoch=epoch,
                          epochs=config.epochs, step=step, steps=steps, loss=loss, **extra))

    for epoch in range(state["epoch"], config.epochs):
        model.train()
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(config.seed * 1009 + epoch))
        running, seen = 0.0, 0
        for step in range(steps):
            chosen = order[step * batch_size:(step + 1) * batch_size]
            x = cache[train_rows[chosen].to(cache.device)].to(device, non_blocking=True)
            y = train_targets[chosen].to(device, non_blocking=True)
            x = augmenter(x) if augmenter else x.float() / 255.0
            if lab_shift:
                x = lab_shift(x)
            x = _normalize(_balanced(x, colour), mean, std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * _lr_factor(epoch * steps + step, warmup, total_steps)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                features = model.backbone(x)
                losses = []
                for j, node in enumerate(nodes):
                    valid = y[:, j] != -100
                    if valid.any():
                        losses.append(loss_fns[j](model.heads[node](features[valid]).float(), y[valid, j]))
            loss = torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(chosen)
            seen += len(chosen)
            report("step", epoch + 1, step + 1, loss.item())
        evaluation = _evaluate_heads(model, cache, node_sets, "val", device, mean, std, config.batch_size, colour=colour)
        for node, (metrics, val_loss) in evaluation.items():
            state["node_history"][node].append({
                "epoch": epoch + 1, "train_loss": round(running / max(1, seen), 5), "val_loss": round(val_loss, 5),
                "val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
                "lr": round(optimizer.param_groups[0]["lr"], 8)})
        state["history"].append(_mean_entry([history[-1] for history in state["node_history"].values()]))
        latest = state["history"][-1]
        state["epoch"] = epoch + 1
        if latest["val_macro_f1"] > state["best_score"]:
            state.update(best_score=latest["val_macro_f1"], best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        if checkpoint:
            _save_checkpoint(checkpoint, model, optimizer, best_state, state)
        report("epoch", epoch + 1, steps, latest["train_loss"], metrics=dict(latest),
               message=f"{label} epoch {epoch + 1}/{config.epochs}: train loss {latest['train_loss']:.3f}, "
                       f"val loss {latest['val_loss']:.3f}, val macro-F1 {latest['val_macro_f1']:.3f}")
        if state["bad_epochs"] >= config.patience:
            callback(Progress("log", node=label, message=f"{label}: early stop, no better validation macro-F1 for "
                                                         f"{config.patience} epochs (best epoch {state['best_epoch']})."))
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    val = _evaluate_heads(model, cache, node_sets, "val", device, mean, std, config.batch_size, keep_probs=True,
                          colour=colour)
    test = _evaluate_heads(model, cache, node_sets, "test", device, mean, std, config.batch_size, colour=colour)
    cards = {}
    for ns in node_sets:
        (val_metrics, _, top, correct) = val[ns.node]
        cards[ns.node] = ModelCard(
            architecture=config.architecture,
            node=ns.node,
            classes=list(ns.classes),
            input_size=cache.shape[-1],
            mean=mean_list,
            std=std_list,
            interpolation=interpolation_for(config.architecture),
            threshold=choose_threshold(top, correct, config.min_coverage, len(ns.classes)),
            colour=colour,
            mode=config.mode,
            metrics={"val": val_metrics, "val_macro_f1": val_metrics["macro_f1"], "test": test[ns.node][0],
                     "history": state["node_history"][ns.node], "best_epoch": state["best_epoch"]},
            split_seed=config.seed,
        )
    return model.to("cpu").to(memory_format=torch.contiguous_format), cards


def _mean_entry(entries: list[dict]) -> dict:
    """One history entry for several nodes: the mean of each value (the same values for one node)."""
    return {key: (entries[0][key] if key in ("epoch", "train_loss", "lr")
                  else round(sum(e[key] for e in entries) / len(entries), 5)) for key in entries[0]}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def _balanced(x: torch.Tensor, colour: dict) -> torch.Tensor:
    """White balanced on the background when the set normalises colour (its card's `colour`)."""
    return white_balance(x, colour["reference"], colour["quantile"])[0] if colour else x


@torch.inference_mode()
def _evaluate_heads(model: HeadedModel, cache, node_sets, split: str, device, mean, std, batch_size,
                    keep_probs: bool = False, colour: dict | None = None) -> dict:
    """Per node: (metrics, mean NLL loss) on `split`; with keep_probs also (top probabilities, correct flags).

    The backbone runs once per cell, whichever nodes the cell belongs to.
    """
    model.eval()
    rows = sorted({index for ns in node_sets for index, _ in getattr(ns, split)})
    position = {index: i for i, index in enumerate(rows)}
    chunks = []
    row_tensor = torch.tensor(rows, dtype=torch.long)
    for start in range(0, len(rows), batch_size * 2):
        x = cache[row_tensor[start:start + batch_size * 2].to(cache.device)].to(device).float() / 255.0
        x = _normalize(_balanced(x, colour or {}), mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(model.backbone(x).float())
    features = torch.cat(chunks) if chunks else None
    result = {}
    for ns in node_sets:
        items = getattr(ns, split)
        targets = torch.tensor([c for _, c in items], dtype=torch.long)
        if not items:
            result[ns.node] = (_metrics(ns.classes, targets, torch.empty(0, 0)), 0.0, [], [])
            continue
        chosen = torch.tensor([position[i] for i, _ in items], device=features.device)
        probs = model.heads[ns.node](features[chosen]).float().softmax(dim=1).cpu()
        loss = float(torch.nn.functional.nll_loss(probs.clamp_min(1e-8).log(), targets))
        top, predicted = probs.max(dim=1)
        extra = (top.tolist(), (predicted == targets).tolist()) if keep_probs else ()
        result[ns.node] = (_metrics(ns.classes, targets, probs), loss, *extra)
    return result


def _metrics(classes: list[str], targets: torch.Tensor, probs: torch.Tensor) -> dict:
    predicted = probs.argmax(dim=1).tolist() if len(targets) else []
    return classification_metrics([classes[t] for t in targets.tolist()], [classes[p] for p in predicted], classes)


def _save_checkpoint(path: Path, model, optimizer, best_state, state: dict) -> None:
    """Model, best model and AdamW moments as safetensors; epoch, history and optimizer settings as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    optimizer_state = optimizer.state_dict()
    for param_id, moments in optimizer_state["state"].items():
        for key, value in moments.items():
            tensors[f"opt.{param_id}.{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    groups = [{k: v for k, v in group.items()} for group in optimizer_state["param_groups"]]
    write_safetensors(path, tensors, card={**state, "param_groups": groups})


def _load_checkpoint(path: Path, model, optimizer) -> tuple[dict, dict | None]:
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path), device="cpu")
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, param_id, name = key.split(".", 2)
            moments.setdefault(int(param_id), {})[name] = value if name == "step" else value.to(device)
    optimizer.load_state_dict({"state": moments, "param_groups": meta.pop("param_groups")})
    return meta, best


def store_half(folder: Path) -> int:
    """Rewrite a set's node weights with float16 tensors (half the size; loaded back into float32 models).

    Returns the bytes saved. Integer tensors (BatchNorm counters) stay as they are.
    """
    saved = 0
    for weights in sorted(Path(folder).glob("*.safetensors")):
        if weights.name == FAMILIARITY_FILE:  # statistics, not weights: a precision matrix wants float32
            continue
        before = weights.stat().st_size
        tensors = load_file(str(weights))
        half = as_half(tensors)
        card = read_card(weights)
        write_safetensors(weights, half, {"node": card.node, "architecture": card.architecture, "dtype": "float16"})
        saved += before - weights.stat().st_size
    return saved
