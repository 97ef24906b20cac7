"""One system, one fresh process: ``python benchmarks/peer_worker.py SPEC_JSON``; run by ``benchmarks.peers``.

Standalone on purpose: sentence-transformers' OpenVINO backend (optimum-intel) pins another transformers than
embedrt's stack, so it runs from its own environment (``.venv-stov``), where embedrt is not installed. The
spec names the system, its texts file and where to write; the worker loads the system, warms it up, times
the passages at batch 32 once and each single query alone, and saves the embeddings for the cosine columns.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _st(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(spec["threads"])
    backend = spec.get("backend", "torch")
    kwargs: dict[str, Any] = {"device": "cpu", "backend": backend}
    if backend == "openvino":
        config = {"INFERENCE_NUM_THREADS": spec["threads"], **spec.get("ov_config", {})}
        kwargs["model_kwargs"] = {"ov_config": config}
    model = SentenceTransformer(spec["path"], **kwargs)
    info: dict[str, Any] = {"torch": torch.__version__}
    if backend == "openvino":
        request = model[0].auto_model.request  # a CompiledModel in optimum-intel 2.x, an InferRequest before
        compiled = request if hasattr(request, "get_property") else request.get_compiled_model()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        info["inference_precision"] = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        import openvino

        info["openvino"] = openvino.get_version()

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))

    return encode, info


def _embedrt(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import embedrt

    # no "device" in the spec: load's own default, what a user gets without options
    device = {"device": spec["device"]} if "device" in spec else {}
    model = embedrt.load(spec["path"], threads=spec["threads"], **device)
    info = {"device": model.device, "precision": model.manifest.precision.value, "running": model.precision,
            "inference_precision": model.plan.inference_precision, "providers": list(model.providers)}
    return model.encode, info


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    texts = json.loads(Path(spec["texts"]).read_text())
    passages, queries = texts["passages"], texts["queries"]
    start = time.perf_counter()
    encode, info = _st(spec) if spec["kind"] == "st" else _embedrt(spec)
    info["load_s"] = round(time.perf_counter() - start, 2)
    encode(passages[:8], 32)  # warm-up: first shapes, thread pools
    for q in queries[:8]:
        encode([q], 1)
    start = time.perf_counter()
    emb_p = encode(passages, 32)
    passages_s = time.perf_counter() - start
    latencies, emb_q = [], []
    for q in queries:
        t = time.perf_counter()
        emb_q.append(encode([q], 1)[0])
        latencies.append(time.perf_counter() - t)
    out = Path(spec["out"])
    np.save(out.with_suffix(".passages.npy"), np.asarray(emb_p, dtype=np.float32))
    np.save(out.with_suffix(".queries.npy"), np.asarray(emb_q, dtype=np.float32))
    out.write_text(json.dumps({**info, "passages_per_s": len(passages) / passages_s,
                               "single_p50_ms": 1000 * statistics.median(latencies), "pid": os.getpid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
