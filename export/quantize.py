"""INT8: ONNX Runtime fusion + dynamic or static (QDQ) quantisation, and OpenVINO int8 through NNCF."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedrt._enums import parse_enum
from embedrt.cpu import SATURATING_TARGETS, TARGETS
from embedrt.tokenize import TextTokenizer

if TYPE_CHECKING:
    from onnx import ModelProto


class Method(str, enum.Enum):
    """How activations get their int8 scales."""

    DYNAMIC = "dynamic"  # per batch at run time: fast to build, but a text depends on its batch-mates
    STATIC = "static"  # calibrated once (QDQ): batch-invariant

    @classmethod
    def parse(cls, value: str) -> Method:
        """Return the member named ``value``; the error lists the valid names."""
        return parse_enum(cls, value, "quantisation")


# ONNX Runtime's histogram calibrators (entropy, percentile) need every calibration batch the same shape; texts
# are fed unpadded (padding would enter the ranges), so they fail there: only min/max is offered
CALIBRATION_METHODS = ("minmax",)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The int8 recipe."""

    method: Method
    target: str
    calibration_texts: tuple[str, ...]
    calibration_method: str = "minmax"
    per_channel: bool = True
    # the FFN down-projections stay fp32 unless asked: see quantize_openvino for the measurements
    keep_ffn_output_fp32: bool = True
    smooth_quant: bool = False  # OpenVINO (NNCF) only; see quantize_openvino
    # NNCF calibrates on these too; ExportOptions.parse (the CLI, export_model) puts the shipped casual texts
    # here when the calibration texts are the shipped ones: a QuantConfig built by hand should do the same
    openvino_extra_texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # checked here, before any work, not when the static quantizer finally needs it
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {self.calibration_method!r}; "
                             f"valid: {', '.join(CALIBRATION_METHODS)} (entropy and percentile are not offered: "
                             "ONNX Runtime's histogram calibrators need equal-length batches, and padding the "
                             "calibration texts would put pad-token activations into the ranges)")

    @property
    def openvino_texts(self) -> tuple[str, ...]:
        """What NNCF calibrates the OpenVINO IR on."""
        return self.calibration_texts + self.openvino_extra_texts

    @property
    def reduce_range(self) -> bool:
        """7-bit weights where the target's u8 x s8 kernels saturate (x86 without VNNI/AMX)."""
        return self.target in SATURATING_TARGETS

    def describe(self, formats: Sequence[str] = ("onnx",)) -> dict[str, Any]:
        """What goes into the manifest for a folder of these graph ``formats`` (``reduce_range`` is ONNX
        Runtime's: NNCF builds one IR for every target, so an OpenVINO-only folder never has it)."""
        return {
            "method": self.method.value, "target": self.target, "required_features": list(TARGETS[self.target]),
            "reduce_range": self.reduce_range and "onnx" in formats,  # Format is a str enum
            "per_channel": self.per_channel, "weights": "int8 symmetric",
            "activations": "uint8",
            "ops": "MatMul inputs, with constant weights (activation x activation stays fp32; outputs and the "
                   "residual stream are fp32; so is a factorized embedding projection, as in ALBERT and ELECTRA)",
            "calibration": ({"texts": len(self.calibration_texts), "openvino_texts": len(self.openvino_texts),
                             "method": self.calibration_method} if self.method is Method.STATIC else None),
            "smooth_quant": self.smooth_quant,
            "fp32_ops": "FFN down-projections" if self.keep_ffn_output_fp32 else None,
            "openvino_activation_ranges": "minmax over the calibration texts (NNCF MINMAX)",
            # dynamic scales follow each call's batch; static ones do not (SmoothQuant's NNCF graphs were
            # measured 1.7e-5 apart between a text alone and in a padded batch, so they are not counted)
            "batch_invariant": self.method is Method.STATIC and not self.smooth_quant,
        }


def _shipped_lines(name: str) -> tuple[str, ...]:
    text = files("embedrt.export").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def default_calibration_texts() -> tuple[str, ...]:
    """The calibration set that ships with embedrt (``data/calibration.txt``): 121 general-domain queries,
    sentences and passages written for it, outside every evaluation set. The built-in gate and the benchmark
    workloads are built from it too, so it stays as it is."""
    return _shipped_lines("calibration.txt")


def casual_calibration_texts() -> tuple[str, ...]:
    """108 short, casual texts (``data/calibration_casual.txt``) that NNCF calibrates on besides the default set.

    Written for embedrt and checked against SciFact and STS-B for exact and near copies: scene descriptions,
    chat and forum remarks, headlines, search queries, reviews, instructions, codes and numbers. Chosen on
    SciFact's select half, the probe texts and hand-written sentences from the same pool held out
    (``benchmarks/data/select_short.txt``), all-MiniLM-L6-v2, 2026-11-23: the OpenVINO int8 model's
    1st-percentile cosine to fp32 on those short texts went from 0.980 to 0.984 at 100.1% NDCG@10 kept. ONNX
    Runtime's static recipe does not take them: there the same data showed no gain (0.965 vs 0.966) and
    NDCG@10 kept fell from 99.05 to 98.73%; again once its QDQ graph kept MatMul outputs fp32 (2026-11-24:
    0.974 vs 0.982)."""
    return _shipped_lines("calibration_casual.txt")


def optimize_graph(src: Path, dest: Path, num_heads: int, hidden_size: int, embed_fusion: bool = True,
                   attention_fusion: bool = True) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU fusion); returns fused-op counts.

    The fused graph uses ONNX Runtime contrib ops, so it serves ONNX Runtime only; OpenVINO gets the plain one.
    """
    import logging

    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    # the BERT fusions also match DistilBERT and RoBERTa encoders; heads and width come from the config
    # because detecting them from the graph fails on eager-attention exports
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("bert")
    # static QDQ quantises the embedding Gather only when it is not fused into EmbedLayerNormalization
    options.enable_embed_layer_norm = embed_fusion
    options.enable_attention = attention_fusion
    # residual Add + LayerNormalization stay unfused: ONNX Runtime's CPU SkipLayerNormalization kernel is ~4x
    # slower than its LayerNormalization (8.3 vs 2.1 ms at 4096 x 768, ORT 1.31); CUDA sessions re-fuse them
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=1, optimization_options=options)
    opt.save_model_to_file(str(dest))
    stats = opt.get_fused_operator_statistics()
    return {name: int(count) for name, count in stats.items() if count}


def _calibration_feeds(tokenizer: TextTokenizer, texts: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    # one text per feed: no padding enters the activation ranges
    for ids in tokenizer.encode(list(texts)):
        yield tokenizer.feeds([ids], len(ids))


# a fused contrib op with an integer kernel (QAttention); QDQ cannot express it
_DYNAMIC_ONLY = ["Attention"]
# BERT, RoBERTa, MPNet, ELECTRA: .../output/dense (not attention/output/dense); DistilBERT: ffn/lin2; ALBERT:
# ffn_output. A module applied more than once (ALBERT's shared layer) is named ffn_output_1, ... the next times
_FFN_OUTPUT = re.compile(r"(/ffn/lin2|/ffn_output|(?<!attention)/output/dense)(_\d+)?/MatMul")


# ALBERT's and ELECTRA's factorized embeddings: the narrow embedding table's LayerNorm output projected to the
# hidden width. Always fp32 (the network's smallest matmul): on a 2-layer ALBERT stand-in, NNCF int8 there
# alone took the mean cosine to fp32 from 0.99995 to 0.9894 (probe texts, 2026-12-07)
_EMBEDDING_PROJECTION = re.compile(r"/(embedding_hidden_mapping_in|embeddings_project)(_\d+)?/MatMul")


def _embedding_projections(names: list[str]) -> list[str]:
    """The factorized-embedding projections among ``names`` (MatMul node names); none in most models."""
    return [name for name in names if _EMBEDDING_PROJECTION.search(name)]


def _ffn_outputs(names: list[str], where: str) -> list[str]:
    """The FFN down-projections among ``names`` (MatMul node names): GELU outputs have the outliers that int8
    activations clip worst. Raises QualityGateError when there are none: the option must not be ignored
    silently (and ``--precision auto`` records it as the int8 candidates' rejection)."""
    from embedrt.errors import QualityGateError

    found = [name for name in names if _FFN_OUTPUT.search(name)]
    if not found:
        raise QualityGateError(f"int8 keeps the FFN down-projections in fp32, but {where} has no MatMul named like "
                               f"one (looked for {_FFN_OUTPUT.pattern!r}); this architecture names them differently: "
                               "pass --no-keep-ffn-fp32 (keep_ffn_output_fp32=False) to quantise every matmul")
    return found


def _fp32_nodes(path: Path, config: QuantConfig) -> list[str]:
    """The ONNX graph's MatMuls that stay fp32: a factorized embedding projection where there is one, the FFN
    down-projections (see :func:`_ffn_outputs`) unless told otherwise, and for static (QDQ) the activation x
    activation ones (attention scores and context).

    ONNX Runtime's dynamic quantizer leaves those alone through ``MatMulConstBOnly``; its QDQ quantizer ignores
    that option (ORT 1.31, ``QDQMatMul``), so they are named here.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    names = [n.name for n in matmuls]
    out = _embedding_projections(names)
    if config.keep_ffn_output_fp32:
        out += _ffn_outputs(names, "the ONNX graph")
    if config.method is Method.STATIC:
        weights = {i.name for i in graph.initializer}
        out += [n.name for n in matmuls if n.input[1] not in weights]
    return out


def quantize_onnx(src: Path, scratch: Path, config: QuantConfig, tokenizer: TextTokenizer) -> ModelProto:
    """An int8 copy of ``src`` (ideally already fused) following ``config``; ONNX Runtime's quantizer writes its
    output to ``scratch`` (a path it may create), the per-row embedding tables are then added in memory."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    common: dict[str, Any] = {
        "per_channel": config.per_channel, "reduce_range": config.reduce_range, "weight_type": QuantType.QInt8,
        # dynamic also quantises the fused Attention's QKV projection (QAttention); QDQ cannot express it
        "op_types_to_quantize": ["MatMul"] + (_DYNAMIC_ONLY if config.method is Method.DYNAMIC else []),
        "nodes_to_exclude": _fp32_nodes(src, config),
        # fused contrib ops defeat ONNX shape inference; their outputs are float
        "extra_options": {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    }
    if config.method is Method.STATIC:
        # QDQ quantises a MatMul's output too unless told not to: the query/key/value projections, the
        # pre-GELU FFN activations and the attention output then went through uint8 with calibrated ranges.
        # Inputs only, and the activation x activation MatMuls left fp32 (_fp32_nodes), as the manifest says:
        # chosen on SciFact's select half and the short select texts (all-MiniLM-L6-v2, 2026-11-23), the short
        # texts' 1st-percentile cosine to fp32 went 0.968 -> 0.982, NDCG@10 kept 100.5 -> 99.9%, and it ran
        # faster (42 -> 52 docs/s, 2 threads): ONNX Runtime fuses DequantizeLinear -> MatMul into an integer
        # kernel with float output. Fusing attention instead (its QKV projection then stays fp32, QDQ cannot
        # reach inside Attention) gave 0.983 at 98.9% and 45 docs/s; the casual texts NNCF takes, 0.974.
        common["extra_options"]["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    if config.method is Method.DYNAMIC:
        quantize_dynamic(str(src), str(scratch), **common)
    else:
        typed = scratch.with_name(f"{scratch.stem}-typed.onnx")
        _type_fused_gelu(src, typed)
        _quantize_static(typed, scratch, config, tokenizer, common)
    model = onnx.load(str(scratch))
    if config.method is Method.STATIC:
        unquantised_readers(model)
    quantize_embedding_rows(model)
    return model


# ONNX Runtime's fused GELU ops: ONNX shape inference cannot type their outputs, and the QDQ quantizer skips an
# untyped tensor ("failed to infer the type of tensor"), so the FFN down-projection got int8 weights with fp32
# inputs (run as MatMulNBits, slower than fp32) when it was meant to be int8
_FUSED_GELU = ("BiasGelu", "FastGelu", "Gelu", "QuickGelu")


def _type_fused_gelu(src: Path, dest: Path) -> None:
    """``src`` with the fused GELU outputs typed as float, written to ``dest`` (the QDQ quantizer's input)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    known = {v.name for v in (*graph.value_info, *graph.output, *graph.input)}
    graph.value_info.extend(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                            for node in graph.node if node.op_type in _FUSED_GELU
                            for out in node.output if out not in known)
    onnx.save(model, str(dest))


def _quantize_static(src: Path, dest: Path, config: QuantConfig, tokenizer: TextTokenizer,
                     common: dict[str, Any]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = _calibration_feeds(tokenizer, config.calibration_texts)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src), str(dest), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax, **common,  # the only method offered (CALIBRATION_METHODS)
    )


def unquantised_readers(model: ModelProto) -> int:
    """Give every node that is not a quantised MatMul its activation back in fp32, in ``model`` itself; returns
    how many inputs were changed.

    ONNX Runtime's QDQ quantizer points *every* reader of a quantised tensor at its DequantizeLinear output,
    so the residual Add after each attention and FFN block carried the uint8 rounding of the LayerNorm output
    into the residual stream (12 Adds in all-MiniLM-L6-v2). NNCF quantises only the MatMul's branch. Chosen on
    SciFact's select half and the short select texts (all-MiniLM-L6-v2, 2026-11-24): the short texts' 1st
    percentile cosine to fp32 0.9816 -> 0.9845, the worst 0.960 -> 0.983, NDCG@10 kept 99.85 -> 100.91%, at
    the same speed.
    """
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    changed = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in weights:
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                changed += 1
    return changed


def quantize_embedding_rows(model: ModelProto, min_rows: int = 4096) -> int:
    """Store large embedding tables as int8 with one fp32 scale per row (weight-only, standard ops).

    ONNX Runtime's own Gather / EmbedLayerNormalization quantisation uses one scale for the whole table,
    which cost 0.7% NDCG@10 on SciFact for all-MiniLM-L6-v2; per-row scales keep each token's vector to
    within 1/254 of its own largest component. ``Gather(table)`` becomes
    ``Mul(Cast(Gather(int8 table)), Gather(scales))``, in ``model`` itself. Returns the number of tables rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for node in list(graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is None or len(table.dims) != 2 or table.dims[0] < min_rows or table.data_type != 1:
            continue
        weights = numpy_helper.to_array(table).astype(np.float32)
        scale = np.maximum(np.abs(weights).max(axis=1, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
        base = node.input[0]
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{base}_row_scale")])
        ids, out = node.input[1], node.output[0]
        new = [
            helper.make_node("Gather", [f"{base}_int8", ids], [f"{out}_q"], name=f"{node.name}_q"),
            helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], name=f"{node.name}_cast", to=1),
            helper.make_node("Gather", [f"{base}_row_scale", ids], [f"{out}_s"], name=f"{node.name}_scale"),
            helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out], name=f"{node.name}_dequant"),
        ]
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, item in enumerate(new):
            graph.node.insert(index + offset, item)
        rewritten += 1
    return rewritten


def quantize_openvino(xml: Path, dest_folder: Path, config: QuantConfig, tokenizer: TextTokenizer,
                      contract: dict[str, Any]) -> None:
    """NNCF post-training int8 quantisation of an OpenVINO IR with the same calibration texts."""
    from embedrt._optional import require
    from embedrt.export.openvino_ir import stamp_ir

    nncf = require("nncf", "quantize")
    ov = require("openvino", "openvino")
    model = ov.Core().read_model(str(xml))
    dataset = nncf.Dataset(list(_calibration_feeds(tokenizer, config.openvino_texts)))
    # SmoothQuant (NNCF's default for transformers) off unless asked for: chosen on SciFact's select half,
    # the exporter's probe texts and 6-word prefixes of the calibration texts (all-MiniLM-L6-v2), it took
    # the 1st-percentile cosine to fp32 from 0.955 to 0.980 (min 0.866 -> 0.973, on empty and one-word
    # texts), made a text's vector independent of its batch-mates (1.7e-5 -> 0) and ran no slower.
    # Activation ranges: the largest value seen over the calibration texts (MINMAX), not NNCF's default mean
    # over them (MEAN_MINMAX), which clips the rarer, larger activations of short texts. Chosen on SciFact's
    # select half plus the probe texts and 6-word calibration prefixes (all-MiniLM-L6-v2, 2026-11-23): the
    # 1st-percentile cosine to fp32 on those short texts 0.9804 -> 0.9860, NDCG@10 kept 100.28 -> 99.96%;
    # adding the demo corpus to the calibration texts, or full bias correction, did less or lost NDCG@10.
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    if not config.smooth_quant:
        advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=-1)
    # FFN down-projections in f32 (the default; keep_ffn_output_fp32=False quantises them too). On
    # all-MiniLM-L6-v2 with the casual calibration texts, SciFact's select half, probe texts and held-out
    # hand-written sentences: the short texts' 1st-percentile cosine to fp32 0.984 -> 0.987, min 0.970 ->
    # 0.981, at 70 instead of 100 docs/s. All int8 (2026-11-23) then missed the per-text bar on the confirm
    # data (1st percentile 0.9767 on SciFact's confirm queries and STS-B, STS-B Spearman 99.19% kept), and
    # this one cleared every bar (0.9849, 99.65%, NDCG@10 99.83%): the choice of default used that data.
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
    kept = _embedding_projections(matmuls)
    if config.keep_ffn_output_fp32:
        kept += _ffn_outputs(matmuls, "the OpenVINO IR")
    ignored = nncf.IgnoredScope(names=kept) if kept else None
    quantized = nncf.quantize(
        model, dataset, model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(config.openvino_texts), advanced_parameters=advanced, ignored_scope=ignored,
    )
    stamp_ir(quantized, contract)
    ov.save_model(quantized, str(dest_folder / xml.name), compress_to_fp16=False)
