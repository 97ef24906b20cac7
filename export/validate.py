"""Parity of an artifact with sentence-transformers on a fixed probe set of awkward texts."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedrt.errors import ParityError
from embedrt.ops import FloatArray, row_cosine

FP32_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.999
# bf16 keeps 8 mantissa bits: measured on all-MiniLM-L6-v2 per-text cosine >= 0.99997 to fp32
BF16_MIN_COSINE = 0.9999

_LONG = (
    "Semantic search embeds a query and every document into one vector space and ranks the documents by "
    "their similarity to the query, which works across paraphrases that share no keywords at all. "
)

# mixed lengths: one word up to far past any max_seq_length, the empty string, whitespace, non-Latin
# scripts, emoji, accents, code and numbers
PROBE_TEXTS: tuple[str, ...] = (
    "hello",
    "",
    "   ",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "COVID-19 vaccines reduce the risk of severe illness and hospitalisation in older adults.",
    "Ünïcödé àccents, naïve café résumé — and “smart quotes”.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "Москва — столица России, крупнейший город страны.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "नई दिल्ली भारत की राजधानी है।",
    "I love this! 😀🚀🔥 Emoji-heavy text 👩‍👩‍👧‍👦 with ZWJ sequences.",
    "def f(x): return x ** 2  # code, numbers 3.14159 and URLs https://example.com/a?b=c",
    _LONG,
    _LONG * 4,
    _LONG * 12,
    _LONG * 40,
    "word " * 600,
)


def reference_embeddings(st_model: Any, texts: list[str], batch_size: int = 16) -> FloatArray:
    """sentence-transformers' own float32 embeddings of ``texts`` (the ground truth)."""
    out = st_model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


def parity_figures(reference: FloatArray, candidate: FloatArray) -> dict[str, float]:
    """Row-wise cosine, relative length difference and absolute difference between two embedding matrices."""
    cos = row_cosine(reference, candidate)
    ref_norm = np.linalg.norm(reference.astype(np.float64), axis=1)
    got_norm = np.linalg.norm(candidate.astype(np.float64), axis=1)
    norm_error = np.abs(got_norm - ref_norm) / np.maximum(ref_norm, 1e-12)
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - candidate).max()),
        "max_norm_error": float(norm_error.max()),
        "n_texts": len(reference),
    }


def norm_limit(threshold: float) -> float:
    """The relative length difference a cosine threshold allows: the same size as the angle it allows
    (sqrt(2 (1 - cos)): 0.45% at 0.99999, 1.4% at 0.9999, 4.5% at 0.999). Cosine alone let a graph that
    normalised where sentence-transformers did not pass with min cosine 1.0."""
    return float(np.sqrt(2.0 * (1.0 - threshold)))


def check_parity(artifact: str, reference: FloatArray, candidate: FloatArray, threshold: float) -> dict[str, float]:
    """Figures of ``candidate`` against ``reference``.

    Raises:
        ParityError: the smallest cosine is below ``threshold``, a vector's length differs by more than
            :func:`norm_limit` allows, or the shapes differ.
    """
    if candidate.shape != reference.shape:
        raise ParityError(artifact, float("nan"), float("nan"), threshold)
    figures = parity_figures(reference, candidate)
    if not np.isfinite(figures["min_cosine"]) or figures["min_cosine"] < threshold:
        raise ParityError(artifact, figures["min_cosine"], figures["max_abs_diff"], threshold)
    limit = norm_limit(threshold)
    if not figures["max_norm_error"] <= limit:
        raise ParityError(artifact, figures["min_cosine"], figures["max_abs_diff"], threshold,
                          figures["max_norm_error"], limit)
    return {**figures, "threshold": threshold}
