"""Pooling, normalisation, similarity and top-k search as small pure numpy functions.

Every function takes float32 arrays and returns float32 arrays; none does I/O or keeps state.
The exporter's in-graph pooling is tested against these same functions.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from embedrt._enums import parse_enum

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps, which sentence-transformers uses
_MASK_EPS = 1e-9  # sentence-transformers clamps the token count at this value


class Pooling(str, enum.Enum):
    """How token embeddings become one sentence embedding."""

    MEAN = "mean"
    CLS = "cls"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len"

    @classmethod
    def parse(cls, value: str) -> Pooling:
        """Return the member named ``value``; the error lists the valid names."""
        return parse_enum(cls, value, "pooling")


class Similarity(str, enum.Enum):
    """Similarity functions; higher always means more similar (euclidean is negated)."""

    COSINE = "cosine"
    DOT = "dot"
    EUCLIDEAN = "euclidean"

    @classmethod
    def parse(cls, value: str) -> Similarity:
        """Return the member named ``value``; the error lists the valid names."""
        aliases = {"cos": "cosine", "cos_sim": "cosine", "dot_product": "dot", "dot_score": "dot"}
        return parse_enum(cls, aliases.get(value, value), "similarity")


def pool(token_embeddings: FloatArray, attention_mask: npt.NDArray[np.integer], mode: Pooling) -> FloatArray:
    """Pool ``[batch, seq, dim]`` token embeddings into ``[batch, dim]`` as sentence-transformers does.

    Args:
        token_embeddings: the encoder's last hidden state, float32 ``[batch, seq, dim]``.
        attention_mask: 1 for real tokens, 0 for padding, ``[batch, seq]``.
        mode: the pooling mode.

    Returns:
        float32 ``[batch, dim]``.
    """
    h = np.asarray(token_embeddings, dtype=np.float32)
    mask = np.asarray(attention_mask).astype(np.float32)[:, :, None]
    if mode is Pooling.CLS:
        return np.array(h[:, 0, :], dtype=np.float32)
    if mode is Pooling.MAX:
        # padded positions must never win the max, the same trick sentence-transformers uses
        return np.asarray(np.where(mask > 0, h, np.float32(-1e9)).max(axis=1), dtype=np.float32)
    summed = (h * mask).sum(axis=1)
    counts = np.maximum(mask.sum(axis=1), np.float32(_MASK_EPS))
    if mode is Pooling.MEAN:
        return np.asarray(summed / counts, dtype=np.float32)
    if mode is Pooling.MEAN_SQRT_LEN:
        return np.asarray(summed / np.sqrt(counts), dtype=np.float32)
    raise ValueError(f"unsupported pooling {mode!r}")


def l2_normalize(x: FloatArray) -> FloatArray:
    """Scale each row to unit L2 norm (rows of zeros stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):  # an overflow is handled below
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
    over = np.isinf(norms) & np.isfinite(x).all(axis=-1, keepdims=True)
    if over.any():  # |x|^2 overflows float32 (components above ~1e19): the norm in float64, which holds it
        norms = np.where(over, np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True), norms)
    return np.asarray(x / np.maximum(norms, np.float32(_NORM_EPS)), dtype=np.float32)


def row_cosine(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Cosine of each row of ``a`` with the same row of ``b``; a zero row gives 0.

    Computed and returned in float64, unlike the rest of this module: parity figures such as a minimum
    cosine of 0.9999999999991 need the digits float32 cannot hold.

    Raises:
        ValueError: ``a`` and ``b`` have different shapes.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"row_cosine needs equal shapes, got {x.shape} and {y.shape}")
    denom = np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)
    return np.asarray((x * y).sum(axis=-1) / denom, dtype=np.float64)


def _as_matrix(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a vector or a [n, dim] matrix, got shape {arr.shape}")
    return arr


def similarity(a: npt.ArrayLike, b: npt.ArrayLike, metric: Similarity | str = Similarity.COSINE) -> FloatArray:
    """Pairwise similarity of every row of ``a`` with every row of ``b``.

    Args:
        a: ``[n, dim]`` (or one ``[dim]`` vector).
        b: ``[m, dim]`` (or one ``[dim]`` vector).
        metric: cosine, dot, or euclidean (returned as the negative distance, so higher is closer).

    Returns:
        float32 ``[n, m]``.

    Raises:
        ValueError: unknown metric or mismatched dimensions.
    """
    metric = _metric(metric)
    qa, qb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if qa.shape[1] != qb.shape[1]:
        raise ValueError(f"dimension mismatch: a has {qa.shape[1]} columns, b has {qb.shape[1]}")
    if metric is Similarity.COSINE:
        return (l2_normalize(qa) @ l2_normalize(qb).T).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below
        scores = _scores(qa, qb, metric)
    if not np.isfinite(scores).all() and np.isfinite(qa).all() and np.isfinite(qb).all():
        # finite vectors whose products overflow float32 (inf - inf gave NaN): computed again in float64; a
        # dot product beyond float32's range is then +-inf, not NaN, and a distance is exact
        with np.errstate(over="ignore"):
            scores = _scores(qa.astype(np.float64), qb.astype(np.float64), metric).astype(np.float32)
    return scores


def _scores(qa: npt.NDArray[Any], qb: npt.NDArray[Any], metric: Similarity) -> FloatArray:
    if metric is Similarity.DOT:
        return np.asarray(qa @ qb.T, dtype=np.float32)
    # |a-b|^2 = |a|^2 + |b|^2 - 2ab, clipped at 0 against rounding
    sq = (qa * qa).sum(1)[:, None] + (qb * qb).sum(1)[None, :] - 2.0 * (qa @ qb.T)
    return np.asarray(-np.sqrt(np.maximum(sq, 0.0)), dtype=np.float32)


def top_k(
    queries: npt.ArrayLike,
    corpus: npt.ArrayLike,
    k: int = 10,
    metric: Similarity | str = Similarity.COSINE,
    chunk_size: int = 16384,
) -> tuple[IntArray, FloatArray]:
    """The ``k`` best corpus rows for each query, best first, scanning the corpus in chunks.

    Memory is bounded by ``queries x chunk_size`` scores, whatever the corpus size.

    Args:
        queries: ``[n, dim]`` query embeddings (or one ``[dim]`` vector).
        corpus: ``[m, dim]`` corpus embeddings.
        k: how many hits per query; capped at ``m``.
        metric: cosine, dot, or euclidean.
        chunk_size: corpus rows scored at a time.

    Returns:
        ``(indices, scores)``, int64 and float32, each ``[n, min(k, m)]``: the first ``k`` rows ordered by
        score descending, then by index ascending, whatever ``chunk_size`` is (ties at the k-th place go to
        the lowest index).

    Raises:
        ValueError: ``k`` or ``chunk_size`` below 1, mismatched dimensions, or a query or corpus row with
            NaN/inf values (names the array and the first such row).
    """
    for name, value in (("k", k), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    metric = _metric(metric)
    q, c = _as_matrix(queries, "queries"), _as_matrix(corpus, "corpus")
    if c.size and q.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {q.shape[1]} columns, corpus has {c.shape[1]}")
    _check_finite(q, "queries", 0)
    cosine = metric is Similarity.COSINE
    if cosine:  # normalise the queries once, not once per chunk; each corpus chunk is normalised as it is scored
        q, metric = l2_normalize(q), Similarity.DOT
    k = min(int(k), c.shape[0])
    best_idx = np.zeros((q.shape[0], 0), dtype=np.int64)
    best_score = np.zeros((q.shape[0], 0), dtype=np.float32)
    if q.shape[0] == 0:  # no query: no hits, [0, k]
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    for start in range(0, c.shape[0], chunk_size):
        chunk = c[start : start + chunk_size]
        _check_finite(chunk, "corpus", start)  # chunk by chunk, so the check's memory stays bounded too
        scores = similarity(q, l2_normalize(chunk) if cosine else chunk, metric)
        if not np.isfinite(scores).all():  # finite rows whose dot product is beyond float32: no order to give
            i, j = (int(v[0]) for v in np.nonzero(~np.isfinite(scores)))
            raise ValueError(f"the {metric.value} score of query row {i} and corpus row {start + j} is beyond "
                             "float32's range (vectors with components above ~1e19)")
        idx = np.broadcast_to(np.arange(start, start + scores.shape[1], dtype=np.int64), scores.shape)
        best_idx, best_score = _merge_top_k(
            np.concatenate([best_idx, idx], axis=1), np.concatenate([best_score, scores], axis=1), k
        )
    return best_idx, best_score


def _metric(metric: Similarity | str) -> Similarity:
    if isinstance(metric, Similarity):
        return metric
    if isinstance(metric, str):
        return Similarity.parse(metric)
    valid = ", ".join(m.value for m in Similarity)
    raise TypeError(f"metric must be a Similarity or one of {valid}, got {metric!r}")


def _check_finite(x: FloatArray, name: str, offset: int) -> None:
    """Raise naming the first row of ``x`` (numbered from ``offset``) that holds NaN or inf."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        # a NaN score sorts anywhere, so such a row would return arbitrary hits instead of an error
        raise ValueError(f"{name} row {offset + int(np.argmax(bad))} has NaN/inf values")


def _merge_top_k(idx: IntArray, scores: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """The first ``k`` candidates of each row by score descending, then index ascending."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)
        kth = np.take_along_axis(scores, part[:, k - 1 : k], 1)
        tied = scores >= kth
        width = max(int(tied.sum(axis=1).max()), k)  # k at least, should a score overflow to NaN
        if width > k:
            # argpartition picks an arbitrary subset of the scores tied at the k-th place; keep them all
            # (they come first in a stable sort on "not tied") so the lexsort below picks the lowest indices
            part = np.argsort(~tied, axis=1, kind="stable")
        part = part[:, :width]
        idx, scores = np.take_along_axis(idx, part, 1), np.take_along_axis(scores, part, 1)
    # sort by score descending, then index ascending, so results are deterministic
    order = np.lexsort((idx, -scores), axis=1)[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)
