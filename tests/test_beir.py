"""Retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from embedrt.beir import ndcg_at_k, recall_at_k, score_rankings


def test_ndcg_by_hand() -> None:
    relevant = {"a": 1, "b": 1}
    # hits at ranks 1 and 3: (1 + 1/log2(4)) / (1 + 1/log2(3))
    want = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["a", "x", "b"], relevant, 10) == pytest.approx(want)
    assert ndcg_at_k(["x"] * 10 + ["a"], relevant, 10) == 0.0


def test_recall_and_identical_ids() -> None:
    assert recall_at_k(["a", "x"], {"a": 1, "b": 1}, 100) == 0.5
    # the query's own id is dropped from its ranking, as BEIR and MTEB do
    scores = score_rankings({"q1": ["q1", "a"]}, {"q1": {"a": 1}})
    assert scores["ndcg@10"] == pytest.approx(100.0)
