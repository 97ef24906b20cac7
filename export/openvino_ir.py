"""ONNX -> OpenVINO IR conversion (xml + bin, dynamic batch and sequence)."""

from __future__ import annotations

from pathlib import Path

from embedrt._optional import require
from embedrt.manifest import OPENVINO_XML


def convert_to_ir(onnx_path: Path, folder: Path, fp16_weights: bool = False) -> Path:
    """Convert a plain (unfused) ONNX graph to OpenVINO IR in ``folder``; weights stay fp32 unless asked.

    Returns:
        The path of the written ``.xml``.
    """
    ov = require("openvino", "openvino")
    model = ov.convert_model(str(onnx_path))
    xml = folder / OPENVINO_XML
    ov.save_model(model, str(xml), compress_to_fp16=fp16_weights)
    return xml
