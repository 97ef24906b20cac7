"""ONNX -> OpenVINO IR conversion (xml + bin, dynamic batch and sequence)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embedrt._optional import require
from embedrt.manifest import OPENVINO_XML


def stamp_ir(model: Any, contract: dict[str, Any]) -> None:
    """Store the manifest's contract in the IR's ``rt_info`` (as the ONNX graph's ``metadata_props``)."""
    model.set_rt_info(json.dumps(contract), ["embedrt"])


def convert_to_ir(onnx_path: Path, folder: Path, contract: dict[str, Any], fp16_weights: bool = False) -> Path:
    """Convert a plain (unfused) ONNX graph to OpenVINO IR in ``folder``; weights stay fp32 unless asked.

    ``contract`` (the manifest's) is stamped into the IR, so the runtime can check the manifest against it.

    Returns:
        The path of the written ``.xml``.
    """
    ov = require("openvino", "openvino")
    model = ov.convert_model(str(onnx_path))
    stamp_ir(model, contract)
    xml = folder / OPENVINO_XML
    ov.save_model(model, str(xml), compress_to_fp16=fp16_weights)
    return xml
