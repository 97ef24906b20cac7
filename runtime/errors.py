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


def shown_below(value: float, threshold: float, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals, or more where those do not show it below ``threshold`` (0.99998
    under 0.99999 was printed as 1.0000)."""
    for shown in range(digits, 10):
        if round(value, shown) < threshold:
            return f"{value:.{shown}f}"
    return repr(value)


class ParityError(EmbedrtError):
    """An exported artifact does not reproduce sentence-transformers closely enough.

    Attributes:
        artifact: which artifact failed (``"onnx"``, ``"openvino"``, ...).
        min_cosine: the smallest cosine similarity over the probe texts.
        max_abs_diff: the largest absolute element difference.
        threshold: the minimum cosine that was required.
    """

    def __init__(self, artifact: str, min_cosine: float, max_abs_diff: float, threshold: float,
                 norm_error: float | None = None, norm_limit: float | None = None) -> None:
        self.artifact = artifact
        self.min_cosine = min_cosine
        self.max_abs_diff = max_abs_diff
        self.threshold = threshold
        self.norm_error = norm_error
        if norm_error is not None and norm_limit is not None and min_cosine >= threshold:
            why = (f"vector lengths differ by up to {100 * norm_error:.3g}% (allowed {100 * norm_limit:.3g}%) "
                   f"though the min cosine is {min_cosine:.7f}")
        else:
            why = f"min cosine {shown_below(min_cosine, threshold, 7)} < required {threshold}"
        super().__init__(f"{artifact} parity failed: {why} (max abs diff {max_abs_diff:.3g}); nothing was written")


class QualityGateError(EmbedrtError):
    """A quantised model keeps less retrieval quality than the gate requires."""


class OutputPathError(EmbedrtError):
    """An output path cannot be written: its parent is a file, it has the wrong kind, or the location is read-only."""
