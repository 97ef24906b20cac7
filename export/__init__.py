"""embedrt.export: turn sentence-transformers checkpoints into verified model folders.

This package needs the ``export`` extra (torch, transformers, sentence-transformers, onnx); the runtime
(``embedrt``) never imports it.
"""

from __future__ import annotations

from embedrt.export.pipeline import ExportOptions, Format, export_model, parse_formats

__all__ = ["ExportOptions", "Format", "export_model", "parse_formats"]
