"""embedrt.export: turn sentence-transformers checkpoints into verified model folders.

This package needs the ``export`` extra (torch, transformers, sentence-transformers, onnx); the runtime
(``embedrt``) never imports it.
"""

from __future__ import annotations

import sys

# No usage data leaves an export: NNCF and OpenVINO's converter send it to Google Analytics through
# openvino_telemetry (a process forked from a worker thread, which also hung a Ctrl-C'd export in its DNS
# lookup). Both fall back to their own no-op stubs when it cannot be imported; None in sys.modules makes the
# import fail. A process that imported it before keeps it.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

from embedrt.export.options import ExportOptions, Format, parse_formats  # noqa: E402
from embedrt.export.pipeline import export_model  # noqa: E402
from embedrt.export.quantize import Method, QuantConfig  # noqa: E402

__all__ = ["ExportOptions", "Format", "Method", "QuantConfig", "export_model", "parse_formats"]
