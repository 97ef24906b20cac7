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


def pool(token_embeddings: FloatArray, attention_mask: npt.NDArray[np.integer], mode: Pooling | str) -> FloatArray:
    """Pool ``[batch, seq, dim]`` token embeddings into ``[batch, dim]`` as sentence-transformers does.

    Args:
        token_embeddings: the encoder's last hidden state, float32 ``[batch, seq, dim]``.
        attention_mask: 1 for real tokens, 0 for padding, ``[batch, seq]``.
        mode: the pooling mode, a ``Pooling`` or its value (``"mean"``).

    Returns:
        float32 ``[batch, dim]``.

    Raises:
        ValueError: ``mode`` is no pooling mode (the message lists them).
    """
    mode = Pooling.parse(mode)  # "mean" was "unsupported pooling 'mean'"
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
    raise AssertionError(f"pooling {mode!r} has no implementation")


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


def _as_matrix(x: npt.ArrayLike, name: str, convert: bool = True) -> npt.NDArray[Any]:
    """``x`` as a 2-D array of real numbers: float32, or with ``convert=False`` its own dtype (``top_k``
    converts its corpus chunk by chunk, so a float16 or memory-mapped corpus is never copied whole)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a vector or a [n, dim] matrix, got shape {arr.shape}")
    if arr.shape[1] == 0:  # [] is one vector of no numbers: a product of it is 0, not a similarity
        raise ValueError(f"{name} has no columns (shape {arr.shape}); embeddings have dim >= 1")
    return _float32(arr, name, 0) if convert else arr


def _float32(arr: npt.NDArray[Any], name: str, offset: int) -> FloatArray:
    """``arr`` in float32; finite values beyond its range are an error naming the row, not a silent inf."""
    with np.errstate(over="ignore"):
        out = np.asarray(arr, dtype=np.float32)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
        beyond = np.isinf(out).any(axis=1) & np.isfinite(arr).all(axis=1)
        if beyond.any():
            raise ValueError(f"{name} row {offset + int(np.argmax(beyond))} has values beyond float32's range "
                             "(|x| > 3.4e38)")
    return out


def similarity(a: npt.ArrayLike, b: npt.ArrayLike, metric: Similarity | str = Similarity.COSINE) -> FloatArray:
    """Pairwise similarity of every row of ``a`` with every row of ``b``.

    Args:
        a: ``[n, dim]`` (or one ``[dim]`` vector).
        b: ``[m, dim]`` (or one ``[dim]`` vector).
        metric: cosine, dot, or euclidean (returned as the negative distance, so higher is closer).

    Returns:
        float32 ``[n, m]``. A row holding NaN gives NaN scores, as numpy's own products do; ``top_k``
        refuses such rows instead, since a NaN score would sort anywhere among the hits.

    Raises:
        ValueError: unknown metric or mismatched dimensions.
    """
    metric = _metric(metric)
    qa, qb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if qa.shape[1] != qb.shape[1]:
        raise ValueError(f"dimension mismatch: a has {qa.shape[1]} columns, b has {qb.shape[1]}")
    if metric is Similarity.COSINE:
        return (l2_normalize(qa) @ l2_normalize(qb).T).astype(np.float32)
    if metric is Similarity.EUCLIDEAN:
        return _euclidean(qa, qb)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below
        scores = np.asarray(qa @ qb.T, dtype=np.float32)
    if not np.isfinite(scores).all() and np.isfinite(qa).all() and np.isfinite(qb).all():
        # finite vectors whose products overflow float32 (inf - inf gave NaN): computed again in float64; a
        # dot product beyond float32's range is then +-inf, not NaN
        with np.errstate(over="ignore"):
            scores = (qa.astype(np.float64) @ qb.astype(np.float64).T).astype(np.float32)
    return scores


def _euclidean(qa: FloatArray, qb: FloatArray) -> FloatArray:
    """Minus the distance of every pair: one float32 product, and close pairs again in float64.

    ``|a|^2 + |b|^2 - 2ab`` cancels for close vectors (a vector's distance to itself came out as -6e-4 in
    float32, and varied with the other rows): pairs whose squared distance is within ``_CLOSE`` of their
    squared norms are computed again from their differences in float64, as ``top_k`` scores them, so near
    and exact duplicates score as it does. Where float32 overflows, everything is formed in float64.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        na, nb = np.einsum("ij,ij->i", qa, qa), np.einsum("ij,ij->i", qb, qb)
        squared = qa @ qb.T
        squared *= -2.0
        squared += na[:, None]
        squared += nb[None, :]
    if not (np.isfinite(na).all() and np.isfinite(nb).all() and np.isfinite(squared).all()):
        a, b = qa.astype(np.float64), qb.astype(np.float64)  # float32 values cannot overflow float64 here
        na, nb = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
        squared = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
    qi, cj = np.nonzero(squared <= _CLOSE * (na[:, None] + nb[None, :]))
    distance = np.sqrt(np.maximum(squared, 0.0))
    step = max(1, (1 << 21) // qa.shape[1])  # 16 MB of float64 differences at a time
    for s in range(0, qi.size, step):
        d = qa[qi[s : s + step]].astype(np.float64) - qb[cj[s : s + step]].astype(np.float64)
        # the distance, not its square, goes into the float32 array: a square below ~1e-45 was 0 there
        distance[qi[s : s + step], cj[s : s + step]] = np.sqrt((d * d).sum(1))
    return np.asarray(0.0 - distance, dtype=np.float32)  # 0.0 -: no -0.0


# pairs closer than this share of their squared norms are scored exactly (cosine above ~0.9 for unit vectors):
# the float32 product's error, ~1e-7 x sqrt(dim) of the squared norms, is then over ~1e-5 of the distance
_CLOSE = 0.1


def _squared_distances(qa: npt.NDArray[Any], qb: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``|a-b|^2 = |a|^2 + |b|^2 - 2ab`` for every pair of rows, in the arrays' own precision (one product)."""
    return np.asarray((qa * qa).sum(1)[:, None] + (qb * qb).sum(1)[None, :] - 2.0 * (qa @ qb.T))


def top_k(
    queries: npt.ArrayLike,
    corpus: npt.ArrayLike,
    k: int = 10,
    metric: Similarity | str = Similarity.COSINE,
    chunk_size: int = 16384,
) -> tuple[IntArray, FloatArray]:
    """The ``k`` best corpus rows for each query, best first, scanning the corpus in chunks.

    Memory is bounded by ``queries x chunk_size`` scores, whatever the corpus size (a float16, float64 or
    memory-mapped corpus is converted chunk by chunk). Each chunk is scored with one float32 matrix product;
    the rows that can still be among the ``k`` best, given that product's rounding bound, are then scored
    again one pair at a time in float64. So a query's hits and scores depend only on the query and the corpus
    rows: not on ``chunk_size``, the other queries, or where a row sits (a float32 product rounds a pair
    differently with the shapes around it, and gave copies of one row different scores).

    Args:
        queries: ``[n, dim]`` query embeddings (or one ``[dim]`` vector).
        corpus: ``[m, dim]`` corpus embeddings.
        k: how many hits per query; capped at ``m``.
        metric: cosine, dot, or euclidean.
        chunk_size: corpus rows scored at a time.

    Returns:
        ``(indices, scores)``, int64 and float32, each ``[n, min(k, m)]``: the first ``k`` rows ordered by
        their float64 score descending, then by index ascending (equal rows: the lowest index first; rows
        that differ, such as multiples of one vector under cosine, may round to one float32 score and still
        be ordered by their float64 scores).

    Raises:
        ValueError: ``k`` or ``chunk_size`` below 1, mismatched dimensions, a query or corpus row with
            NaN/inf values or values beyond float32's range (names the array and the first such row), or a
            score beyond float32's range.
        TypeError: arrays that do not hold real numbers.
    """
    for name, value in (("k", k), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    metric = _metric(metric)
    q, c = _as_matrix(queries, "queries"), _as_matrix(corpus, "corpus", convert=False)
    if c.size and q.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {q.shape[1]} columns, corpus has {c.shape[1]}")
    _check_finite(q, "queries", 0)
    k = min(int(k), c.shape[0])
    if q.shape[0] == 0:  # no query: no hits, [0, k]
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    exact = _Exact(q, metric)
    best_idx = np.zeros((q.shape[0], 0), dtype=np.int64)
    best_key = np.zeros((q.shape[0], 0), dtype=np.float64)  # exact keys: higher is better
    for start in range(0, c.shape[0], chunk_size):
        chunk = _float32(c[start : start + chunk_size], "corpus", start)
        _check_finite(chunk, "corpus", start)  # chunk by chunk, so the check's memory stays bounded too
        lower, upper = exact.bounds(chunk)
        # rows that cannot be among the k best, not even tied, are left out (see _Exact); the rest are scored
        # exactly: those that may reach the k-th best exact key so far, and, within the chunk, those that may
        # reach the k-th largest lower bound (k rows of the chunk are at least that good)
        threshold = np.full(q.shape[0], -np.inf)
        if chunk.shape[0] > k:
            threshold = np.partition(lower, chunk.shape[0] - k, axis=1)[:, chunk.shape[0] - k].astype(np.float64)
        del lower
        if best_key.shape[1] == k:
            threshold = np.maximum(threshold, best_key[:, -1])
        qi, cj = np.nonzero(upper >= threshold[:, None])
        del upper
        keys = exact.keys(qi, chunk, cj)
        counts = np.bincount(qi, minlength=q.shape[0])
        width = int(counts.max()) if counts.size else 0
        slot = np.arange(qi.size) - np.repeat(np.cumsum(counts) - counts, counts)
        cand_idx = np.full((q.shape[0], width), np.iinfo(np.int64).max, dtype=np.int64)
        cand_key = np.full((q.shape[0], width), -np.inf)
        cand_idx[qi, slot], cand_key[qi, slot] = cj + start, keys
        all_idx = np.concatenate([best_idx, cand_idx], axis=1)
        all_key = np.concatenate([best_key, cand_key], axis=1)
        keep = min(k, start + chunk.shape[0])
        order = np.lexsort((all_idx, -all_key), axis=1)[:, :keep]
        best_idx, best_key = np.take_along_axis(all_idx, order, 1), np.take_along_axis(all_key, order, 1)
    return best_idx, exact.scores(best_key, best_idx)


class _Exact:
    """Scores for ``top_k``: bounds of the exact keys for a whole chunk (one float32 matrix product), and exact
    keys (float64, one pair at a time) for the rows those bounds cannot rule out.

    Keys are "higher is better": the score for cosine and dot, minus the squared distance for euclidean. A
    row is ruled out when its upper bound is below the k-th largest lower bound of its chunk (k rows of the
    chunk are better for sure) or below the k-th best exact key found so far (k rows found are better): it
    cannot be among the best, not even tied.
    """

    def __init__(self, q: FloatArray, metric: Similarity) -> None:
        self.metric = metric
        self.q64 = q.astype(np.float64)
        self.q_norm = np.linalg.norm(self.q64, axis=1)
        if metric is Similarity.COSINE:
            self.q64 = self.q64 / np.maximum(self.q_norm, _NORM_EPS)[:, None]
            self.q_approx = l2_normalize(q)
        else:
            self.q_approx = q

    def bounds(self, chunk: FloatArray) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """Lower and upper bounds ``[n, rows]`` of the chunk's exact keys, from one float32 matrix product.

        A float32 dot product of dim d is within (d + 2) units of rounding of sum |a_i b_i| <= |a| |b| of
        the exact one, plus (for products in float32's subnormal range) half a subnormal step per operation.
        The bound per pair is twice that, which also covers the rounding of the normalisation, of the squared
        norms (euclidean) and of the bounds' own float32 arithmetic.
        """
        d = chunk.shape[1]
        qa, ca = self.q_approx, (l2_normalize(chunk) if self.metric is Similarity.COSINE else chunk)
        with np.errstate(over="ignore", invalid="ignore"):
            approx = self._approx_keys(qa, ca)
        eps, tiny = float(np.finfo(np.float32).eps), float(np.finfo(np.float32).smallest_subnormal)
        if not np.isfinite(approx).all():  # finite vectors whose products overflow float32: in float64,
            # where float32 values cannot overflow (|x|^2 * dim stays below 1e84)
            approx = self._approx_keys(qa.astype(np.float64), ca.astype(np.float64))
            eps, tiny = float(np.finfo(np.float64).eps), float(np.finfo(np.float64).smallest_subnormal)
        gamma, floor = (2 * d + 8) * eps, (4 * d + 16) * tiny
        dtype = approx.dtype.type
        with np.errstate(over="ignore"):  # a bound beyond float32 is inf: every such row is scored exactly
            if self.metric is Similarity.COSINE:  # unit vectors (or zero rows)
                err: npt.NDArray[Any] = np.full((1, 1), gamma + floor, dtype=dtype)
            else:
                c_norm = _row_norms(chunk)
                if self.metric is Similarity.DOT:
                    err = np.multiply.outer((gamma * self.q_norm).astype(dtype), c_norm.astype(dtype))
                else:
                    err = np.add.outer((2.0 * gamma * self.q_norm**2).astype(dtype),
                                       (2.0 * gamma * c_norm**2).astype(dtype))
                err += dtype(floor)
            upper = approx + err
            approx -= err  # the lower bounds, in place
        return approx, upper

    def _approx_keys(self, qa: npt.NDArray[Any], ca: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if self.metric is Similarity.EUCLIDEAN:
            return -_squared_distances(qa, ca)
        return np.asarray(qa @ ca.T)

    def keys(self, qi: IntArray, chunk: FloatArray, cj: IntArray) -> npt.NDArray[np.float64]:
        """Exact keys of the pairs (query ``qi[p]``, chunk row ``cj[p]``), in float64, in blocks."""
        out = np.empty(qi.size, dtype=np.float64)
        step = max(1, (1 << 21) // max(1, chunk.shape[1]))  # 16 MB of float64 pairs at a time
        for s in range(0, qi.size, step):
            a, b = self.q64[qi[s : s + step]], chunk[cj[s : s + step]].astype(np.float64)
            if self.metric is Similarity.EUCLIDEAN:
                d = a - b
                out[s : s + step] = -(d * d).sum(axis=1)
            elif self.metric is Similarity.COSINE:
                out[s : s + step] = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(b, axis=1), _NORM_EPS)
            else:
                out[s : s + step] = (a * b).sum(axis=1)
        return out

    def scores(self, keys: npt.NDArray[np.float64], idx: IntArray) -> FloatArray:
        """The returned scores of the hits ``idx``: their keys (minus the distance for euclidean) in float32."""
        values = 0.0 - np.sqrt(-np.minimum(keys, 0.0)) if self.metric is Similarity.EUCLIDEAN else keys
        if (np.abs(values) > np.finfo(np.float32).max).any():  # finite vectors, a product beyond float32
            i, j = (int(v[0]) for v in np.nonzero(np.abs(values) > np.finfo(np.float32).max))
            raise ValueError(f"the {self.metric.value} score of query row {i} and corpus row {int(idx[i, j])} is "
                             "beyond float32's range (vectors with components above ~1e19)")
        return values.astype(np.float32)


def _metric(metric: Similarity | str) -> Similarity:
    if isinstance(metric, Similarity):
        return metric
    if isinstance(metric, str):
        return Similarity.parse(metric)
    valid = ", ".join(m.value for m in Similarity)
    raise TypeError(f"metric must be a Similarity or one of {valid}, got {metric!r}")


def _row_norms(x: FloatArray) -> npt.NDArray[np.float64]:
    """The L2 norm of each row, never rounded down to 0 or up to inf: the squares are summed in float32, and
    again in float64 for rows where that underflows (components below ~1e-19) or overflows (above ~1e19)."""
    with np.errstate(over="ignore", under="ignore"):
        squares = np.einsum("ij,ij->i", x, x).astype(np.float64)
    redo = ~np.isfinite(squares) | (squares < 2.0**-100)
    if redo.any():
        rows = x[redo].astype(np.float64)
        squares[redo] = np.einsum("ij,ij->i", rows, rows)
    return np.asarray(np.sqrt(squares) * (1.0 + 1e-3))  # the float32 sum's own rounding, with room


def _check_finite(x: FloatArray, name: str, offset: int) -> None:
    """Raise naming the first row of ``x`` (numbered from ``offset``) that holds NaN or inf."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        # a NaN score sorts anywhere, so such a row would return arbitrary hits instead of an error
        raise ValueError(f"{name} row {offset + int(np.argmax(bad))} has NaN/inf values")
