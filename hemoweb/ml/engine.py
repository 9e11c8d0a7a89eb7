"""Inference engines for classification: PyTorch, or ONNX Runtime on the CPU.

On a small CPU, PyTorch eager uses a fraction of what the cores can do: the shipped EfficientNet-Lite0 at 224 px
ran 17-20 images/s eager against 117-134 in ONNX Runtime on 2 cores. So on the CPU the set's networks (its shared
backbone, or each node's whole model in a set with one network per node) are exported to ONNX on first use and run
by ONNX Runtime. Everything around them stays in torch: white balance and normalisation before, and after them the
linear heads, the tree walk, the second look and the familiarity scores, which see the same features within float
rounding (the export is checked against PyTorch on a test batch before it is used).

The export is cached beside the set, `<set>/.onnx/<weights stem>-<sha256 of the weights, 16 hex>-<size>px.onnx` with
a JSON card (the weights' and the ONNX file's sha256, versions, the difference to PyTorch measured at export), or
under a fallback folder when the set folder is read-only. New weights get a new file; a damaged or foreign file
(its sha256 differs from its card) is exported again. ONNX files hold only the graph and tensors: never a pickle.

PyTorch stays the engine on a GPU and the fallback wherever ONNX Runtime is missing or the export fails (said in the
log, never a crash); explanations always use PyTorch (they need gradients).

Plain torch/onnxruntime, no Django.
"""

import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from .weights import ModelCard, ModelFileError, mtime_cached, read_card, write_json

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "torch")
FORMAT = "hemoweb-onnx-1"
CACHE_FOLDER = ".onnx"  # inside the set folder
OPSET = 17
# An export is used only if its outputs on a test batch match PyTorch's within this (relative to their scale). The
# float32 kernels of the two engines round differently from one CPU to another (1.3e-4 seen on an AMD EPYC, under
# 1e-4 on an Intel Xeon): 1e-3 still keeps the probabilities within the 1e-3 the predictions are tested at.
EXPORT_TOLERANCE = 1e-3


class EngineError(RuntimeError):
    """A network could not be exported to ONNX or loaded into ONNX Runtime."""


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version; None where it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def resolve_engine(requested: str, device: str | torch.device) -> str:
    """The engine to use: `auto` is ONNX Runtime on the CPU when it is installed, PyTorch on a GPU.

    ONNX Runtime is used on the CPU only (PyTorch is the GPU path); asked for where it cannot run, PyTorch, logged."""
    if requested not in ENGINES:
        raise ValueError(f"Unknown inference engine {requested!r}: use {', '.join(ENGINES)}.")
    if requested == "torch":
        return "torch"
    if torch.device(device).type != "cpu":
        if requested == "onnxruntime":
            log.info("inference engine onnxruntime runs on the CPU only: PyTorch classifies on %s", device)
        return "torch"
    if onnxruntime_version() is None:
        if requested == "onnxruntime":
            log.warning("inference engine onnxruntime was asked for but is not installed: PyTorch classifies")
        return "torch"
    return "onnxruntime"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxNetwork:
    """An exported network in an ONNX Runtime session, called like the torch module it stands for.

    A batch is run `batch` rows at a time (the last piece padded to that size, so the session sees one shape): on
    the CPU small batches are faster than large ones, their activations staying in the caches (EfficientNet-Lite0 at
    224 px: batch 4 costs a quarter of the CPU time per image of batch 64). Threads wait without spinning, so the cores are free for the
    run's decoding pool between two calls.
    """

    def __init__(self, path: Path, threads: int | None = None, batch: int = 4):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: ONNX Runtime warns about unused initialisers
        self.path, self.batch = Path(path), batch
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a damaged graph
            raise EngineError(f"ONNX Runtime cannot load {path}: {error}") from error
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        n, pieces = len(array), []
        for start in range(0, n, self.batch):
            piece = array[start:start + self.batch]
            if len(piece) < self.batch:  # rows do not mix: the padding's outputs are dropped
                piece = np.concatenate([piece, np.repeat(piece[-1:], self.batch - len(piece), axis=0)])
            pieces.append(self.session.run([self._output], {self._input: piece})[0])
        return torch.from_numpy(np.concatenate(pieces)[:n]) if pieces else torch.empty(0)


def _export(model: torch.nn.Module, input_size: int, target: Path) -> float:
    """Write the model as ONNX (float32, any batch size) and return its largest difference to PyTorch on a test batch.

    The TorchScript-based exporter: it needs only the `onnx` package, and this graph (a CNN) has no control flow.
    """
    tmp = target.with_suffix(".onnx.tmp")
    model = model.float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on the legacy path and on traced constants
        torch.onnx.export(model, (torch.zeros(2, 3, input_size, input_size),), str(tmp), dynamo=False,
                          input_names=["images"], output_names=["output"], opset_version=OPSET,
                          dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    try:
        test = torch.randn(3, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = model(test).float()
        got = OnnxNetwork(tmp, threads=1)(test)
        difference = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
        if not difference <= EXPORT_TOLERANCE:  # also catches NaN
            raise EngineError(f"the ONNX export differs from PyTorch by {difference:.2e} (relative; at most "
                              f"{EXPORT_TOLERANCE:.0e} is accepted)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return difference


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cached_export(weights_path: Path, loader: Callable, fallback_dir: Path | None = None) -> Path:
    """The ONNX file of the network in `weights_path` (loader(path, "cpu") rebuilds it in PyTorch), exported when
    missing, stale or damaged; returns its path. Raises EngineError when the network cannot be exported, and
    ModelFileError when its weights are missing or damaged (as loading them in PyTorch would)."""
    weights_path = Path(weights_path)
    card: ModelCard = read_card(weights_path)
    if not weights_path.is_file():
        raise ModelFileError(f"The weights file {weights_path} is missing.")
    weights_sha = file_sha256(weights_path)
    name = f"{weights_path.stem}-{weights_sha[:16]}-{card.input_size}px"
    folder = weights_path.parent / CACHE_FOLDER
    if not _writable(folder) and not (folder / f"{name}.onnx").is_file():
        if fallback_dir is None or not _writable(Path(fallback_dir)):
            raise EngineError(f"neither {folder} nor a fallback cache folder can be written")
        folder = Path(fallback_dir)
    target, card_path = folder / f"{name}.onnx", folder / f"{name}.json"
    if target.is_file() and card_path.is_file():
        try:
            stored = json.loads(card_path.read_text())
            if stored.get("format") == FORMAT and stored.get("sha256") == file_sha256(target):
                return target
        except (OSError, json.JSONDecodeError):
            pass
        log.warning("the cached ONNX export %s is damaged or does not match its card: exporting it again", target)
    log.info("exporting %s to ONNX (%s)", weights_path.name, target)
    model, _ = loader(weights_path, "cpu")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        difference = _export(model, card.input_size, target)
    except EngineError:
        raise
    except Exception as error:  # the exporter raises many types (unsupported operators, tracing errors)
        raise EngineError(f"{weights_path.name} could not be exported to ONNX: {error}") from error
    write_json(card_path, {
        "format": FORMAT, "weights": weights_path.name, "weights_sha256": weights_sha, "sha256": file_sha256(target),
        "architecture": card.architecture, "input_size": card.input_size, "opset": OPSET,
        "exporter": f"torch.onnx (TorchScript) {torch.__version__}", "onnxruntime": onnxruntime_version(),
        "max_difference_to_torch": difference, "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    for old in folder.glob(f"{weights_path.stem}-*.onnx"):  # exports of weights this file no longer holds
        if old != target:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    return target


def load_onnx(weights_path: Path, loader: Callable, fallback_dir: Path | None = None) -> OnnxNetwork:
    """The network as an ONNX Runtime session, from the cached export (a file the runtime refuses is exported again)."""
    path = cached_export(weights_path, loader, fallback_dir)
    try:
        return OnnxNetwork(path)
    except EngineError as error:
        log.warning("%s; exporting it again", error)
        path.unlink(missing_ok=True)
        return OnnxNetwork(cached_export(weights_path, loader, fallback_dir))


_cache: dict = {}
_lock = threading.Lock()


def cached_onnx(weights_path: Path, loader: Callable, fallback_dir: Path | None = None) -> OnnxNetwork:
    """load_onnx once per process for each weights file, again when the file or its card changes."""
    return mtime_cached(_cache, _lock, weights_path, ("onnxruntime", loader.__name__, str(fallback_dir)),
                        lambda path, _: load_onnx(path, loader, fallback_dir))
