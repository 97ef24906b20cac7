"""The batch planner: every text once, limits kept, and the cheapest grouping (checked by brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import embedrt
from embedrt.batching import BatchCost, plan_batches


def _check_plan(batches: list[np.ndarray], lengths: np.ndarray, batch_size: int, budget: int | None) -> None:
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths))), "every index exactly once"
    assert all(1 <= len(b) <= batch_size for b in batches)
    if budget is not None:
        assert all(len(b) == 1 or len(b) * lengths[b].max() <= budget for b in batches)
    assert np.all(np.diff(lengths[flat]) <= 0), "longest first, sorted run"


def _plan_cost(batches: list[np.ndarray], lengths: np.ndarray, cost: BatchCost) -> float:
    return sum(cost.call(len(b), int(lengths[b].max())) for b in batches)


def test_without_overhead_it_is_the_fixed_count_plan() -> None:
    lengths = np.array([5, 9, 1, 7, 7, 3, 2])
    batches = plan_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 3, 4], [0, 5, 6], [2]]


@pytest.mark.parametrize("seed", range(30))
def test_cheapest_plan_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    lengths = rng.integers(1, 512, n)
    batch_size = int(rng.integers(1, 6))
    budget = int(rng.choice([0, 300, 1000])) or None
    cost = BatchCost(call_overhead=float(rng.choice([1, 32, 400])), attention_span=4608, token_budget=budget)
    batches = plan_batches(lengths, batch_size, cost)
    _check_plan(batches, lengths, batch_size, budget)
    ordered = np.argsort(-lengths, kind="stable")
    best = np.inf
    for cuts in itertools.product([False, True], repeat=n - 1):  # every grouping of the sorted run
        bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
        groups = [ordered[a:b] for a, b in itertools.pairwise(bounds)]
        if all(len(g) <= batch_size and (len(g) == 1 or not budget or len(g) * lengths[g].max() <= budget)
               for g in groups):
            best = min(best, _plan_cost(groups, lengths, cost))
    assert _plan_cost(batches, lengths, cost) == pytest.approx(best)


def test_passage_lengths_lose_little_to_padding() -> None:
    lengths = np.random.default_rng(0).integers(187, 513, 64)
    fixed = plan_batches(lengths, 32)
    planned = plan_batches(lengths, 32, BatchCost(32, 4608, 4096))
    _check_plan(planned, lengths, 32, 4096)

    def padding(batches: list[np.ndarray]) -> float:
        padded = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - lengths.sum() / padded

    assert padding(fixed) > 0.15 and padding(planned) < 0.03
    assert len(planned) < len(lengths) / 2, "not one call per text"


def test_equal_lengths_are_not_split() -> None:
    lengths = np.full(70, 20)
    batches = plan_batches(lengths, 32, BatchCost(32, 4608, 4096))
    assert len(batches) == 3, "no more calls than a fixed count of 32 would make"


def test_bucketed_lengths_are_planned_on_the_padded_length() -> None:
    lengths = np.array([17, 18, 30, 31, 33])
    padded = -(-lengths // 16) * 16
    batches = plan_batches(lengths, 8, BatchCost(8, 4608, None), padded)
    assert [sorted(b.tolist()) for b in batches] == [[4], [0, 1, 2, 3]]


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(np.array([3]), 0)
    with pytest.raises(ValueError, match="call_overhead"):
        BatchCost(call_overhead=-1)
    with pytest.raises(ValueError, match="token_budget"):
        BatchCost(token_budget=0)


def test_encode_uses_the_backend_budget_and_rejects_a_bad_one(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1], device="auto:cpu")  # the CPU budget, on either CPU backend
    assert model.batch_cost().token_budget == 4096 and model.batch_cost(100).token_budget == 100
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        model.encode(["a"], max_tokens=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.encode(["a"], batch_size=0)


def test_shape_buckets_are_few_and_fine_for_short_texts() -> None:
    from embedrt.batching import padded_lengths
    from embedrt.plan import EXACT, SHAPE_BUCKETS

    lengths = np.arange(1, 600)
    padded = padded_lengths(lengths, SHAPE_BUCKETS, 512)
    assert np.all(padded >= lengths)
    assert len(set(padded[lengths <= 512].tolist())) == 28, "bounded shape variety up to 512"
    assert np.all(padded[lengths <= 64] - lengths[lengths <= 64] < 8)
    assert np.all(padded[lengths > 512] == lengths[lengths > 512]), "never padded past max_length"
    assert padded_lengths(lengths, EXACT, 512).tolist() == lengths.tolist()


@pytest.mark.parametrize("seed", range(12))
def test_row_sizes_limit_the_shapes_and_stay_cheapest(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 11))
    lengths = rng.integers(1, 512, n)
    allowed = (1, 2, 3, 4, 6, 8)
    cost = BatchCost(call_overhead=float(rng.choice([0, 32, 400])), attention_span=4608,
                     token_budget=int(rng.choice([600, 4096])))
    batches = plan_batches(lengths, 7, cost, row_sizes=allowed)
    _check_plan(batches, lengths, 7, cost.token_budget)
    assert all(len(b) in allowed for b in batches), [len(b) for b in batches]
    if cost.call_overhead == 0:
        return
    ordered = np.argsort(-lengths, kind="stable")
    best = np.inf
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n]
        groups = [ordered[a:b] for a, b in itertools.pairwise(bounds)]
        if all(len(g) in allowed and len(g) <= 7 and (len(g) == 1 or len(g) * lengths[g].max() <= cost.token_budget)
               for g in groups):
            best = min(best, _plan_cost(groups, lengths, cost))
    assert _plan_cost(batches, lengths, cost) == pytest.approx(best)


def test_row_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="row_sizes"):
        plan_batches(np.array([3, 4]), 2, row_sizes=(0, 2))


def test_openvino_calls_take_few_row_counts(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """OpenVINO keeps state per shape: its calls use the plan's row sizes, ONNX Runtime's any count."""
    from embedrt.plan import ROW_SIZES

    ov = embedrt.load(tiny_bert[1], device="openvino")
    assert ov.row_sizes == ROW_SIZES and 5 not in ROW_SIZES and 7 not in ROW_SIZES
    seen: list[int] = []
    run = ov._run
    ov._run = lambda ids, pad_to: (seen.append(len(ids)), run(ids, pad_to))[1]  # type: ignore[method-assign]
    texts = [f"text number {i} " + "word " * (i % 3) for i in range(7)]
    got = ov.encode(texts, batch_size=7)
    assert seen and all(size in ROW_SIZES for size in seen) and sum(seen) == 7, seen
    np.testing.assert_allclose(got, np.vstack([ov.encode([t]) for t in texts]), atol=1e-5)
    assert embedrt.load(tiny_bert[1], device="cpu").row_sizes == ()
