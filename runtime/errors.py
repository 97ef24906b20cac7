"""The exception tree of embedrt: one base class, one subclass per way things go wrong."""

from __future__ import annotations


class EmbedrtError(Exception):
    """Base class of every error embedrt raises on purpose."""


class ModelFolderError(EmbedrtError):
    """A model folder is missing, incomplete, corrupt or breaks the manifest contract."""


class SourceError(EmbedrtError):
    """A checkpoint to export cannot be found, read or is not supported."""


class ProviderUnavailableError(EmbedrtError):
    """An execution provider or device that was asked for cannot be used."""


class MissingDependencyError(EmbedrtError, ImportError):
    """An optional package is needed; the message names the extra that installs it."""


class ParityError(EmbedrtError):
    """An exported artifact does not reproduce sentence-transformers closely enough.

    Attributes:
        artifact: which artifact failed (``"onnx"``, ``"openvino"``, ...).
        min_cosine: the smallest cosine similarity over the probe texts.
        max_abs_diff: the largest absolute element difference.
        threshold: the minimum cosine that was required.
    """

    def __init__(self, artifact: str, min_cosine: float, max_abs_diff: float, threshold: float) -> None:
        self.artifact = artifact
        self.min_cosine = min_cosine
        self.max_abs_diff = max_abs_diff
        self.threshold = threshold
        super().__init__(
            f"{artifact} parity failed: min cosine {min_cosine:.7f} < required {threshold} "
            f"(max abs diff {max_abs_diff:.3g}); nothing was written"
        )


class QualityGateError(EmbedrtError):
    """A quantised model keeps less retrieval quality than the gate requires."""


class OutputPathError(EmbedrtError):
    """An output path cannot be written: its parent is a file, it has the wrong kind, or the location is read-only."""
