"""Numpy kernels against naive reference code, with awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest

from embedrt import Pooling, Similarity, l2_normalize, pool, similarity, top_k


def naive_pool(h: np.ndarray, mask: np.ndarray, mode: Pooling) -> np.ndarray:
    out = []
    for row, m in zip(h, mask, strict=False):
        real = row[m.astype(bool)]
        if mode is Pooling.CLS:
            out.append(row[0])
        elif mode is Pooling.MAX:
            out.append(real.max(0) if len(real) else np.full(row.shape[1], -1e9))
        elif mode is Pooling.MEAN:
            out.append(real.sum(0) / max(len(real), 1e-9))
        else:
            out.append(real.sum(0) / np.sqrt(max(len(real), 1e-9)))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("mode", list(Pooling))
@pytest.mark.parametrize("batch,seq,dim", [(1, 1, 3), (3, 5, 7), (4, 17, 2)])
def test_pool_matches_naive(mode: Pooling, batch: int, seq: int, dim: int) -> None:
    rng = np.random.default_rng(seq)
    h = rng.standard_normal((batch, seq, dim)).astype(np.float32)
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    np.testing.assert_allclose(pool(h, mask, mode), naive_pool(h, mask, mode), rtol=1e-5, atol=1e-6)


def test_pool_all_padding_row_is_finite_for_mean() -> None:
    h = np.ones((2, 4, 3), dtype=np.float32)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    out = pool(h, mask, Pooling.MEAN)
    assert np.isfinite(out).all() and np.allclose(out[1], 0.0)
    assert pool(h, mask, Pooling.MAX)[1].max() == np.float32(-1e9)


def test_l2_normalize_keeps_zero_rows_zero() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]])


@pytest.mark.parametrize("metric", list(Similarity))
def test_similarity_matches_naive(metric: Similarity) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 17)).astype(np.float32), rng.standard_normal((3, 17)).astype(np.float32)
    want = np.empty((5, 3))
    for i in range(5):
        for j in range(3):
            if metric is Similarity.DOT:
                want[i, j] = a[i] @ b[j]
            elif metric is Similarity.COSINE:
                want[i, j] = a[i] @ b[j] / np.linalg.norm(a[i]) / np.linalg.norm(b[j])
            else:
                want[i, j] = -np.linalg.norm(a[i] - b[j])
    got = similarity(a, b, metric)
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 17, 1000])
@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_top_k_matches_full_sort(chunk: int, metric: str) -> None:
    rng = np.random.default_rng(chunk)
    q, c = rng.standard_normal((4, 8)), rng.standard_normal((53, 8))
    idx, scores = top_k(q, c, k=7, metric=metric, chunk_size=chunk)
    full = similarity(q, c, metric)
    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5)


def test_top_k_caps_k_at_corpus_size_and_accepts_one_query_vector() -> None:
    idx, scores = top_k(np.ones(3), np.eye(3), k=10, metric="dot")
    assert idx.shape == (1, 3) and scores.shape == (1, 3)


def test_bad_metric_and_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="valid: cosine, dot, euclidean"):
        similarity(np.ones((1, 2)), np.ones((1, 2)), "manhattan")
    with pytest.raises(ValueError, match="dimension mismatch"):
        similarity(np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="k and chunk_size"):
        top_k(np.ones((1, 2)), np.ones((1, 2)), k=0)
