"""INT8: ONNX Runtime fusion + dynamic or static (QDQ) quantisation, and OpenVINO int8 through NNCF."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from embedrt.cpu import SATURATING_TARGETS, TARGETS
from embedrt.tokenize import TextTokenizer


class Method(str, enum.Enum):
    """How activations get their int8 scales."""

    DYNAMIC = "dynamic"  # per batch at run time: fast to build, but a text depends on its batch-mates
    STATIC = "static"  # calibrated once (QDQ): batch-invariant

    @classmethod
    def parse(cls, value: str) -> Method:
        """Return the member named ``value``; the error lists the valid names."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown quantisation {value!r}; valid: dynamic, static") from None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The int8 recipe."""

    method: Method
    target: str
    calibration_texts: tuple[str, ...]
    calibration_method: str = "minmax"
    per_channel: bool = True
    keep_ffn_output_fp32: bool = False

    @property
    def reduce_range(self) -> bool:
        """7-bit weights where the target's u8 x s8 kernels saturate (x86 without VNNI/AMX)."""
        return self.target in SATURATING_TARGETS

    def describe(self) -> dict[str, Any]:
        """What goes into the manifest."""
        return {
            "method": self.method.value, "target": self.target, "required_features": list(TARGETS[self.target]),
            "reduce_range": self.reduce_range, "per_channel": self.per_channel, "weights": "int8 symmetric",
            "activations": "uint8", "ops": "MatMul with constant weights (activation x activation stays fp32)",
            "calibration": ({"texts": len(self.calibration_texts), "method": self.calibration_method}
                            if self.method is Method.STATIC else None),
        }


def default_calibration_texts() -> tuple[str, ...]:
    """The calibration set that ships with embedrt (general-domain queries and passages)."""
    text = files("embedrt.export").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def optimize_graph(src: Path, dest: Path, num_heads: int, hidden_size: int, embed_fusion: bool = True,
                   ) -> dict[str, int]:
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
    opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=1, optimization_options=options)
    opt.save_model_to_file(str(dest))
    stats = opt.get_fused_operator_statistics()
    return {name: int(count) for name, count in stats.items() if count}


def _calibration_feeds(tokenizer: TextTokenizer, texts: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    # one text per feed: no padding enters the activation ranges
    for ids in tokenizer.encode(list(texts)):
        yield tokenizer.feeds([ids], len(ids))


# fused contrib ops with integer kernels (QAttention, QEmbedLayerNormalization); QDQ cannot express them
_DYNAMIC_ONLY = ["Attention", "EmbedLayerNormalization"]
_FFN_OUTPUT = re.compile(r"(/ffn/lin2/|(?<!attention)/output/dense/)MatMul")


def _fp32_nodes(path: Path) -> list[str]:
    """The FFN down-projections: GELU outputs have the outliers that int8 activations clip worst."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and _FFN_OUTPUT.search(n.name)]


def quantize_onnx(src: Path, dest: Path, config: QuantConfig, tokenizer: TextTokenizer) -> None:
    """Write an int8 copy of ``src`` (ideally already fused) following ``config``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    common: dict[str, Any] = {
        "per_channel": config.per_channel, "reduce_range": config.reduce_range, "weight_type": QuantType.QInt8,
        # dynamic also quantises the fused Attention's QKV projection (QAttention); QDQ cannot express it
        "op_types_to_quantize": ["MatMul", "Gather"] + (_DYNAMIC_ONLY if config.method is Method.DYNAMIC else []),
        "nodes_to_exclude": _fp32_nodes(src) if config.keep_ffn_output_fp32 else [],
        # fused contrib ops defeat ONNX shape inference; their outputs are float
        "extra_options": {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    }
    if config.method is Method.DYNAMIC:
        quantize_dynamic(str(src), str(dest), **common)
        return

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = _calibration_feeds(tokenizer, config.calibration_texts)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if config.calibration_method not in methods:
        raise ValueError(f"unknown calibration method {config.calibration_method!r}; valid: {', '.join(methods)}")
    quantize_static(
        str(src), str(dest), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
        calibrate_method=methods[config.calibration_method], **common,
    )


def quantize_openvino(xml: Path, dest_folder: Path, config: QuantConfig, tokenizer: TextTokenizer) -> None:
    """NNCF post-training int8 quantisation of an OpenVINO IR with the same calibration texts."""
    from embedrt._optional import require

    nncf = require("nncf", "quantize")
    ov = require("openvino", "openvino")
    model = ov.Core().read_model(str(xml))
    dataset = nncf.Dataset(list(_calibration_feeds(tokenizer, config.calibration_texts)))
    quantized = nncf.quantize(
        model, dataset, model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(config.calibration_texts),
    )
    ov.save_model(quantized, str(dest_folder / xml.name), compress_to_fp16=False)
