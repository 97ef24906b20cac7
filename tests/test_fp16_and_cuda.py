"""fp16 export (checked on the CPU here, on CUDA where there is one) and the CUDA path."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embedrt
from embedrt.export import export_model
from embedrt.export.validate import PROBE_TEXTS, parity_figures


def _cuda() -> bool:
    import onnxruntime

    from embedrt.providers import cuda_unavailable_reason

    return cuda_unavailable_reason(onnxruntime) is None


def test_fp16_graph_keeps_fragile_ops_fp32(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx
    from sentence_transformers import SentenceTransformer

    checkpoint = tiny_bert[0]
    folder = export_model(str(checkpoint), tmp_path / "fp16", precision="fp16")
    manifest = json.loads((folder / "embedrt.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["parity"]["onnx"]["threshold"] == 0.999
    graph = onnx.load(str(folder / "model.onnx")).graph
    fp16 = onnx.TensorProto.FLOAT16
    assert any(init.data_type == fp16 for init in graph.initializer)  # the matmul weights are fp16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # output stays fp32
    layernorm_inputs = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization"}
    casts_to_fp32 = {n.output[0] for n in graph.node if n.op_type == "Cast"
                     and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    assert layernorm_inputs and layernorm_inputs <= casts_to_fp32 | {i.name for i in graph.input}
    ref = SentenceTransformer(str(checkpoint), device="cpu").encode(list(PROBE_TEXTS))
    got = embedrt.load(folder, device="cuda" if _cuda() else "cpu").encode(list(PROBE_TEXTS))
    assert parity_figures(ref, got)["min_cosine"] >= 0.999


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_fp32_and_fp16_parity_with_iobinding(minilm_checkpoint, minilm_st, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from .conftest import scifact_docs

    try:
        texts = [*scifact_docs(300), "", "x", "emoji 😀", "long " * 400]
    except pytest.skip.Exception:
        texts = [*PROBE_TEXTS]
    ref = minilm_st.encode(texts, convert_to_numpy=True)
    for precision, threshold in (("fp32", 0.99999), ("fp16", 0.999)):
        folder = export_model(str(minilm_checkpoint), tmp_path / precision, precision=precision)
        model = embedrt.load(folder, device="cuda")
        assert model.device == "cuda:0" and model.providers[0] == "CUDAExecutionProvider"
        got = model.encode(texts, batch_size=64)
        assert got.dtype == np.float32
        assert parity_figures(ref, got)["min_cosine"] >= threshold, precision
        assert embedrt.load(folder, device="auto").device == "cuda:0"
