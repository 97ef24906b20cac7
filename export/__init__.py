"""embedrt.export: turn sentence-transformers checkpoints into verified model folders.

This package needs the ``export`` extra (torch, transformers, sentence-transformers, onnx); the runtime
(``embedrt``) never imports it.
"""

from __future__ import annotations

from embedrt.export.options import ExportOptions, Format, parse_formats
from embedrt.export.pipeline import export_model

__all__ = ["ExportOptions", "Format", "export_model", "parse_formats"]
