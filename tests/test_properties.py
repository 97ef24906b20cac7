"""Property-based checks of ``encode`` over hostile input: any unicode, any length, any batch size or order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedrt

# any code point, plus what real data smuggles in: lone surrogates, NUL and escape codes, zero-width and
# combining characters, emoji, right-to-left text
_ODD = ["\ud800", "\udfff", "\ud83d", "\x00", "\x1b", "\u200b", "\u0301", "\U0001f600", "\u05d0", "\r", "\t"]
_CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(_ODD))
_TEXT = st.one_of(st.text(_CHARS, max_size=40), st.text(_CHARS, min_size=500, max_size=5000),
                  st.builds(lambda word, n: word * n, st.text(_CHARS, min_size=1, max_size=8), st.integers(1, 700)))
_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])


@pytest.fixture(scope="module", params=["cpu", "openvino"])
def model(request: pytest.FixtureRequest, tiny_bert: Any) -> embedrt.EmbeddingModel:
    return embedrt.load(tiny_bert[1], device=request.param)


@_SETTINGS
@given(texts=st.lists(_TEXT, max_size=10), batch_size=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_rows_are_in_order_and_independent_of_batch_mates(
    model: embedrt.EmbeddingModel, texts: list[str], batch_size: int, seed: int
) -> None:
    out = model.encode(texts, batch_size=batch_size)
    assert out.shape == (len(texts), model.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    alone = np.stack([model.encode([t])[0] for t in texts]) if texts else out
    np.testing.assert_allclose(out, alone, atol=2e-6, rtol=0)
    order = np.random.default_rng(seed).permutation(len(texts))
    shuffled = model.encode([texts[i] for i in order], batch_size=max(1, batch_size - 1))
    np.testing.assert_allclose(shuffled, out[order], atol=2e-6, rtol=0)


@_SETTINGS
@given(texts=st.lists(st.text(_CHARS, max_size=20), max_size=6), bad=st.sampled_from([None, 3, 2.5, b"x", ["x"]]),
       at=st.integers(0, 6))
def test_a_non_str_item_is_a_type_error_naming_its_index(
    model: embedrt.EmbeddingModel, texts: list[str], bad: Any, at: int
) -> None:
    at = min(at, len(texts))
    items: list[Any] = [*texts[:at], bad, *texts[at:]]
    with pytest.raises(TypeError, match=rf"texts\[{at}\] is {type(bad).__name__}, not str"):
        model.encode(items)
