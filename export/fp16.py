"""fp16 graphs for GPUs that keep the numerically fragile parts in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto

# LayerNorm's variance overflows fp16 on long inputs; pooling sums up to 512 token vectors and the
# L2 norm squares them, so those run in fp32 too. Softmax and the matmuls are where fp16 pays off.
FP32_OPS = ["LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "ReduceL2", "ReduceSum", "ReduceMean", "Pow", "Sqrt", "Erf"]
FP32_SCOPES = ("/pooling/", "/head.")


def convert_fp16(src: Path) -> ModelProto:
    """An fp16 copy of ``src`` whose inputs/outputs, LayerNorms, pooling and head stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node if n.name.startswith(FP32_SCOPES)]
    half: ModelProto = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=keep)
    _drop_duplicate_nodes(half.graph)
    _sort_topologically(half.graph)
    onnx.checker.check_model(half)
    return half


def _drop_duplicate_nodes(graph: GraphProto) -> None:
    """Remove nodes identical to an earlier one (same op, inputs, outputs, attributes).

    The converter inserts one Cast per blocked consumer of a tensor, all with the same name and output,
    which ONNX Runtime rejects ("two nodes with same node name").
    """
    seen = set()
    unique = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(node)
    del graph.node[:]
    graph.node.extend(unique)


def _sort_topologically(graph: GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (the converter appends its Casts)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"fp16 graph has a cycle or a dangling input near node {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
            ordered.append(node)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)
