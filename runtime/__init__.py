"""embedrt: run exported sentence-embedding models with ONNX Runtime or OpenVINO, and score them in numpy.

Importing this package loads numpy only; onnxruntime, tokenizers and openvino are imported when a model
is loaded. It never imports torch or transformers.
"""

from __future__ import annotations

from embedrt import _telemetry  # noqa: F401  (first: it turns onnxruntime's usage events off before its import)
from embedrt.batching import BatchCost
from embedrt.errors import (
    EmbedrtError,
    MissingDependencyError,
    ModelFolderError,
    ParityError,
    ProviderUnavailableError,
    QualityGateError,
    SourceError,
)
from embedrt.manifest import Manifest, Precision, read_manifest
from embedrt.model import EmbeddingModel, load
from embedrt.ops import Pooling, Similarity, l2_normalize, pool, similarity, top_k
from embedrt.plan import DevicePlan

__version__ = "0.2.0"

__all__ = [
    "BatchCost",
    "DevicePlan",
    "EmbeddingModel",
    "EmbedrtError",
    "Manifest",
    "MissingDependencyError",
    "ModelFolderError",
    "ParityError",
    "Pooling",
    "Precision",
    "ProviderUnavailableError",
    "QualityGateError",
    "Similarity",
    "SourceError",
    "__version__",
    "l2_normalize",
    "load",
    "pool",
    "read_manifest",
    "similarity",
    "top_k",
]
