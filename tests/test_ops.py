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


def test_pool_takes_a_mode_by_its_value_and_names_the_modes() -> None:
    h = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    for mode in Pooling:  # "mean" was "unsupported pooling 'mean'"
        np.testing.assert_array_equal(pool(h, mask, mode.value), pool(h, mask, mode))
    with pytest.raises(ValueError, match=r"unknown pooling 'avg'; valid: mean, cls, max, mean_sqrt_len"):
        pool(h, mask, "avg")


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
    for bad in (None, 5, 2.5):  # not a silent euclidean
        with pytest.raises(TypeError, match="metric must be"):
            similarity(np.ones((1, 2)), np.ones((1, 2)), bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="metric must be"):
            top_k(np.ones((1, 2)), np.ones((1, 2)), metric=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k must be an int"):
        top_k(np.ones((1, 2)), np.ones((3, 2)), k=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension mismatch"):
        top_k(np.ones((1, 2)), np.ones((3, 3)))


def test_top_k_of_no_query_is_empty() -> None:
    idx, scores = top_k(np.empty((0, 3)), np.eye(3), k=2)
    assert idx.shape == scores.shape == (0, 2) and idx.dtype == np.int64 and scores.dtype == np.float32


def naive_top_k(q: np.ndarray, c: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Score everything, sort by score descending then index ascending, keep the first ``k``."""
    full = similarity(q, c, metric)
    idx = np.broadcast_to(np.arange(full.shape[1]), full.shape)
    order = np.lexsort((idx, -full), axis=1)[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(full, order, 1)


@pytest.mark.parametrize("chunk", [1, 5, 17, 1000])
@pytest.mark.parametrize("k", [1, 4, 53])
@pytest.mark.parametrize("n_queries", [1, 6])
@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_top_k_ties_match_naive_whatever_the_chunk(chunk: int, k: int, n_queries: int, metric: str) -> None:
    # values in {-1, 0, 1} and dim 3: 53 rows share at most 27 vectors, so exact ties are everywhere,
    # also at the k-th place and across chunk borders; integer scores are exact in float32
    for seed in range(20):
        rng = np.random.default_rng(seed)
        q = rng.integers(-1, 2, size=(n_queries, 3)).astype(np.float32)
        c = rng.integers(-1, 2, size=(53, 3)).astype(np.float32)
        idx, scores = top_k(q, c, k=k, metric=metric, chunk_size=chunk)
        want_idx, want_scores = naive_top_k(q, c, k, metric)
        np.testing.assert_array_equal(idx, want_idx, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(scores, want_scores, err_msg=f"seed {seed}")


def test_top_k_all_equal_scores_keep_the_lowest_indices() -> None:
    c = np.ones((40, 4), dtype=np.float32)
    for chunk in (1, 5, 17, 100):
        idx, _ = top_k(np.ones((2, 4)), c, k=6, metric="dot", chunk_size=chunk)
        np.testing.assert_array_equal(idx, np.tile(np.arange(6), (2, 1)), err_msg=f"chunk_size={chunk}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_top_k_names_the_non_finite_row(bad: float, metric: str) -> None:
    q, c = np.ones((5, 4), dtype=np.float32), np.ones((30, 4), dtype=np.float32)
    q[3, 2] = bad
    with pytest.raises(ValueError, match=r"queries row 3 has NaN/inf values"):
        top_k(q, c, k=2, metric=metric, chunk_size=7)
    q[3, 2] = 1.0
    c[23, 0] = bad  # in the fourth chunk of 7
    with pytest.raises(ValueError, match=r"corpus row 23 has NaN/inf values"):
        top_k(q, c, k=2, metric=metric, chunk_size=7)


def test_finite_vectors_beyond_float32_squares_score_correctly_or_raise() -> None:
    """|x|^2 overflowed float32: cosine of a vector with itself was 0, euclidean NaN, and top_k silently left
    out a corpus row whose dot score came out NaN."""
    a = np.array([[1e20, 1e20]], dtype=np.float32)
    assert similarity(a, a, "cosine")[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert similarity(a, a, "euclidean")[0, 0] == 0.0
    np.testing.assert_allclose(l2_normalize(a), [[2**-0.5, 2**-0.5]], rtol=1e-6)
    q = np.array([[1e30, -1e30]], dtype=np.float32)
    corpus = np.array([[1e30, 1e30], [1, 0], [0, 1]], dtype=np.float32)
    idx, scores = top_k(q, corpus, k=3, metric="dot")  # 1e60 - 1e60 is 0, not NaN
    assert idx.tolist() == [[1, 0, 2]]
    np.testing.assert_array_equal(scores, np.array([[1e30, 0.0, -1e30]], dtype=np.float32))
    with pytest.raises(ValueError, match="score of query row 0 and corpus row 0 is beyond float32's range"):
        top_k(np.array([[1e30, 1e30]], dtype=np.float32), corpus, k=2, metric="dot")


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_copies_of_a_row_score_alike_whatever_the_chunk_and_the_other_queries(metric: str) -> None:
    """One float32 matrix product rounds a pair differently with the shapes around it: three copies of the
    best row got three different scores, a later copy outranked the first, and a query scored otherwise next
    to other queries. Candidates are now scored again pair by pair in float64."""
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((16384 + 3, 384)).astype(np.float32)
    q = rng.standard_normal((1, 384)).astype(np.float32)
    best = int(top_k(q, corpus[:16384], 1, metric)[0][0, 0])
    corpus[16384:] = corpus[best]
    runs = [top_k(q, corpus, 4, metric, chunk_size=size) for size in (3, 1000, 16384, 10**6)]
    idx, scores = runs[0]
    assert idx[0].tolist() == [best, 16384, 16385, 16386]  # the four copies, lowest index first
    assert len(set(scores[0].tolist())) == 1
    for other_idx, other_scores in runs[1:]:
        np.testing.assert_array_equal(other_idx, idx)
        np.testing.assert_array_equal(other_scores, scores)
    mates = rng.standard_normal((7, 384)).astype(np.float32)
    mates[3] = q[0]
    together = top_k(mates, corpus, 4, metric)
    np.testing.assert_array_equal(together[0][3], idx[0])
    np.testing.assert_array_equal(together[1][3], scores[0])


def test_top_k_converts_the_corpus_chunk_by_chunk_and_refuses_what_is_not_real() -> None:
    """A float16 (or float64, or memory-mapped) corpus was converted to float32 whole: 916 MB peak for a
    292 MB file. Object and complex arrays gave NaN or dropped the imaginary part; finite float64 values
    beyond float32 were reported as NaN/inf."""
    import tracemalloc

    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((20_000, 384)).astype(np.float16)  # 15 MB; in float32, 31 MB
    q = rng.standard_normal((3, 384)).astype(np.float32)
    tracemalloc.start()
    try:
        idx, scores = top_k(q, corpus, 5, "dot", chunk_size=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MB at peak"
    want = top_k(q, corpus.astype(np.float32), 5, "dot")
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(scores, want[1])
    for bad in (np.array([None] * 8), np.ones(8, dtype=complex)):
        with pytest.raises(TypeError, match="must hold real numbers"):
            top_k(bad, np.ones((3, 8)), 2)
        with pytest.raises(TypeError, match="must hold real numbers"):
            similarity(np.ones(8), bad)
    with pytest.raises(ValueError, match=r"queries row 0 has values beyond float32's range"):
        top_k(np.full(8, 1e300), np.ones((3, 8)), 2)
    with pytest.raises(ValueError, match=r"corpus row 1 has values beyond float32's range"):
        top_k(np.ones(8), np.array([np.ones(8), np.full(8, 1e300)]), 2, chunk_size=1)


@pytest.mark.parametrize("metric", ["dot", "euclidean"])
def test_top_k_is_exact_where_float32_loses_digits_to_underflow(metric: str) -> None:
    """The rounding bound was relative only: tiny rows (squares underflowing float32) got a bound of 0 and
    products in the subnormal range were ranked by their rounding."""
    q = np.array([[2.0**-75] * 2], np.float32)
    c = np.array([[0.51 * 2.0**-74] * 2, [1.4 * 2.0**-74, 0.4 * 2.0**-74]], np.float32)
    if metric == "dot":  # exact: 1.43e-45 and 2.52e-45, both 1e-45 in float32
        assert top_k(q, c, k=1, metric=metric)[0].tolist() == [[1]]
    # near-duplicate rows at scales where float32's squares and products lose digits (seeds where the
    # relative-only bound ranked wrongly)
    rng = np.random.default_rng(6 if metric == "dot" else 3)
    base = rng.standard_normal(384)
    scale = 1e-24 if metric == "dot" else 1e-22
    corpus = ((base + rng.standard_normal((2000, 384)) * 1e-6) * scale).astype(np.float32)
    queries = (rng.standard_normal((3, 384)) * (1e24 if metric == "dot" else scale)).astype(np.float32)
    q64, c64 = queries.astype(np.float64), corpus.astype(np.float64)
    exact = q64 @ c64.T if metric == "dot" else -((q64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    want = np.lexsort((np.broadcast_to(np.arange(len(corpus)), exact.shape), -exact), axis=1)[:, :5]
    np.testing.assert_array_equal(top_k(queries, corpus, 5, metric, chunk_size=700)[0], want)


def test_euclidean_similarity_is_exact_for_close_vectors_and_agrees_with_top_k() -> None:
    """|a|^2 + |b|^2 - 2ab in float32 cancelled: a vector's distance to itself was -6e-4, and a distance of 1
    between vectors of norm 1000 came out between 0.94 and 1.22."""
    rng = np.random.default_rng(7)
    x = l2_normalize(rng.standard_normal((6, 384)).astype(np.float32))
    assert np.diag(similarity(x, x, "euclidean")).tolist() == [0.0] * 6
    assert not np.signbit(np.diag(similarity(x, x, "euclidean"))).any()  # 0.0, not -0.0 ("-0.0000" printed)
    far, near = 1000 * x, 1000 * x
    near[:, 0] += 1
    np.testing.assert_allclose(np.diag(similarity(far, near, "euclidean")), -1.0, atol=1e-5)
    y = rng.standard_normal((40, 384)).astype(np.float32)
    y[5] = x[2]  # an exact copy: distance 0
    want = -np.sqrt(((x[:, None, :].astype(np.float64) - y[None].astype(np.float64)) ** 2).sum(-1))
    got = similarity(x, y, "euclidean")
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max() and got[2, 5] == 0.0
    idx, scores = top_k(x, y, k=40, metric="euclidean")
    np.testing.assert_allclose(np.take_along_axis(got, idx, 1), scores, rtol=1e-5)
    # close pairs (a copy, a near copy) are scored as top_k scores them, to the bit
    y[7] = x[3] + np.float32(1e-3)
    got = similarity(x, y, "euclidean")
    idx, scores = top_k(x, y, k=1, metric="euclidean")
    assert idx[2, 0] == 5 and idx[3, 0] == 7 and got[2, 5] == scores[2, 0] and got[3, 7] == scores[3, 0]
    # tiny vectors: the squared distance (9e-60) was stored in float32, where it is 0: two "exact copies"
    a, b = np.array([[3e-30, 0]], np.float32), np.array([[0, 0], [1e-30, 0]], np.float32)
    got = similarity(a, b, "euclidean")
    idx, scores = top_k(a, b, k=2, metric="euclidean")
    np.testing.assert_allclose(got[0], [-3e-30, -2e-30], rtol=1e-6)
    assert idx[0].tolist() == [1, 0] and got[0, 1] == scores[0, 0] and got[0, 0] == scores[0, 1]


def test_vectors_of_no_columns_are_refused() -> None:
    """top_k(q, []) gave numpy's matmul error; similarity([], []) returned [[0.]]."""
    with pytest.raises(ValueError, match=r"corpus has no columns \(shape \(1, 0\)\)"):
        top_k(np.ones(4), [])
    with pytest.raises(ValueError, match=r"a has no columns"):
        similarity([], [])
    assert top_k(np.ones(4), np.zeros((0, 4)), k=3)[0].shape == (1, 0)  # no rows is a corpus, of no hits
