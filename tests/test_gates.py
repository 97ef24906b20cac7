"""The export's gates at their documented strength: these fail if a threshold is loosened.

Each check builds embeddings a known distance from the reference, so the figure the gate sees is set
here, not read back from an export that already passed.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedrt.errors import ParityError, QualityGateError
from embedrt.export import ExportOptions
from embedrt.export.gate import run_gate
from embedrt.export.validate import check_parity
from embedrt.manifest import Precision


def rotated(reference: np.ndarray, cosine: float, seed: int = 0) -> np.ndarray:
    """Each row of ``reference`` turned by the angle whose cosine is ``cosine`` (same norm)."""
    rng = np.random.default_rng(seed)
    ref = reference.astype(np.float64)
    noise = rng.standard_normal(ref.shape)
    noise -= (noise * ref).sum(1, keepdims=True) / (ref * ref).sum(1, keepdims=True) * ref  # orthogonal part
    noise *= np.linalg.norm(ref, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    sine = np.sqrt(1.0 - cosine**2)
    return cosine * ref + sine * noise


@pytest.mark.parametrize(("precision", "passes", "fails"), [("fp32", 0.999995, 0.99998), ("fp16", 0.9995, 0.998)])
def test_parity_gate_strength(precision: str, passes: float, fails: float) -> None:
    threshold = ExportOptions(precision=Precision(precision)).parity_threshold
    ref = np.random.default_rng(1).standard_normal((8, 384))
    figures = check_parity("onnx", ref, rotated(ref, passes), threshold)
    assert figures["min_cosine"] == pytest.approx(passes, abs=1e-9)
    with pytest.raises(ParityError):
        check_parity("onnx", ref, rotated(ref, fails), threshold)


def test_min_cosine_is_settable_and_checked() -> None:
    assert ExportOptions(min_cosine=0.9).parity_threshold == 0.9
    assert ExportOptions.parse(precision="fp16", min_cosine=0.99).parity_threshold == 0.99
    with pytest.raises(ValueError, match="min_cosine must be between -1 and 1"):
        ExportOptions(min_cosine=1.5)
    with pytest.raises(ValueError, match="unknown calibration method 'kl'; valid: minmax, entropy, percentile"):
        ExportOptions.parse(quantize="static", calibration_method="kl")


class Fake:
    """A model whose embedding of text ``i`` of the corpus is row ``i`` of a fixed matrix."""

    similarity_metric = "cosine"

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.rows[t] for t in texts]).astype(np.float32)


def _pair(cosine: float) -> tuple[Fake, Fake]:
    from embedrt.export.gate import builtin_texts

    corpus, queries = builtin_texts()
    texts = sorted(set(corpus) | set(queries))
    ref = np.random.default_rng(2).standard_normal((len(texts), 64))
    return Fake(dict(zip(texts, ref, strict=True))), Fake(dict(zip(texts, rotated(ref, cosine), strict=True)))


def test_builtin_int8_gate_strength() -> None:
    options = ExportOptions()
    gate = (None, options.min_retained, options.min_agreement, options.min_mean_cosine)
    figures = run_gate(*_pair(0.9999), *gate)  # barely moved: same ranking, mean cosine 0.9999
    assert figures["builtin"]["top10_agreement"] >= 0.95
    with pytest.raises(QualityGateError, match=r"mean cosine 0\.98500 \(needs 0\.99\)"):
        run_gate(*_pair(0.985), *gate)
