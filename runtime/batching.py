"""Batches formed by cost, not by a fixed count: few padded tokens, few calls, bounded memory.

A fixed count of texts per call pads every text to the longest in its batch. On 64 SciFact passages of
187-512 tokens in two batches of 32 that is 25% padding, and one 32 x 512 call holds 400 MB of attention
scores. The planner here sorts texts by length and cuts the sorted run where the padding saved is worth
another call, under a cap on padded tokens per call.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchCost:
    """How much one inference call costs, in units of one padded token through the encoder.

    Attributes:
        call_overhead: fixed cost of a call (weights streamed, kernels launched) in padded tokens.
        attention_span: a padded token in a sequence of length ``L`` costs ``1 + L / attention_span``
            (attention grows with length; ``6 x hidden`` for a BERT layer with a 4x feed-forward).
        token_budget: most padded tokens (rows x length) in one call, bounding activation memory;
            None for no cap. A single text always fits.
    """

    call_overhead: float = 0.0
    attention_span: float = math.inf
    token_budget: int | None = None

    def __post_init__(self) -> None:
        if self.call_overhead < 0:
            raise ValueError(f"call_overhead must be >= 0, got {self.call_overhead}")
        if self.attention_span <= 0:
            raise ValueError(f"attention_span must be > 0, got {self.attention_span}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1 or None, got {self.token_budget}")

    def call(self, rows: int, padded_length: int) -> float:
        """Cost of one call of ``rows`` texts padded to ``padded_length``."""
        return self.call_overhead + rows * padded_length * (1.0 + padded_length / self.attention_span)


def padded_lengths(lengths: np.ndarray, buckets: tuple[tuple[int, int], ...], max_length: int) -> np.ndarray:
    """Each length rounded up to its bucket's multiple, never past ``max_length`` (nor below the length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = lengths.copy()
    lower = 0
    for upper, multiple in buckets:
        inside = (lengths > lower) & (lengths <= upper)
        out[inside] = -(-lengths[inside] // multiple) * multiple
        lower = upper
    return np.asarray(np.minimum(out, np.maximum(lengths, max_length)), dtype=np.int64)


def plan_batches(
    lengths: np.ndarray, batch_size: int, cost: BatchCost | None = None, padded: np.ndarray | None = None,
    row_sizes: tuple[int, ...] = (),
) -> list[np.ndarray]:
    """Group text indices into calls, longest first, at the least total cost.

    Args:
        lengths: token count of each text.
        batch_size: most texts in one call.
        cost: the cost model; None (or a zero ``call_overhead``) gives consecutive runs of ``batch_size``
            texts in length order, capped only by the token budget.
        padded: the length each text would be padded to if it were a batch's longest (bucketing);
            ``lengths`` if None.
        row_sizes: the only row counts a call may have (1 is always allowed); empty for any. A backend that
            keeps state per input shape then sees few shapes (see ``embedrt.plan.ROW_SIZES``).

    Returns:
        Index arrays, one per call; together they cover every index exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    pad = np.asarray(lengths if padded is None else padded)[order].astype(np.float64)
    cost = cost or BatchCost()
    limits = np.minimum(batch_size, len(order) - np.arange(len(order)))
    if cost.token_budget is not None:
        limits = np.minimum(limits, np.maximum(1, cost.token_budget // np.maximum(pad, 1)).astype(np.int64))
    allowed = np.unique(np.asarray([1, *row_sizes], dtype=np.int64)) if len(row_sizes) else None
    if allowed is not None:
        if allowed[0] < 1:
            raise ValueError(f"row_sizes must be >= 1, got {row_sizes}")
        limits = allowed[np.searchsorted(allowed, limits, side="right") - 1]
    if cost.call_overhead == 0:
        sizes = _walk(limits)  # every call as large as allowed
    else:
        sizes = _walk(_cheapest(pad * (1.0 + pad / cost.attention_span), limits, cost.call_overhead, allowed))
    bounds = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _walk(take: np.ndarray) -> list[int]:
    """Call sizes from the start of the sorted run, where ``take[i]`` is the size of a call starting at i."""
    sizes, start = [], 0
    while start < len(take):
        sizes.append(int(take[start]))
        start += sizes[-1]
    return sizes


def _cheapest(per_row: np.ndarray, limits: np.ndarray, overhead: float, allowed: np.ndarray | None = None,
              ) -> np.ndarray:
    """Size of the best call starting at each sorted text, minimising sum(overhead + rows x per_row[first]).

    An exact dynamic programme over the cuts of the sorted run. ``per_row[i]`` is the cost of one row in a
    call whose longest text is sorted text ``i``; ``limits[i]`` the most rows such a call may hold;
    ``allowed`` the row counts a call may have (None: any). O(n x batch_size).
    """
    n = len(per_row)
    best = np.zeros(n + 1)
    take = np.ones(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        limit = int(limits[i])
        k = np.arange(1, limit + 1) if allowed is None else allowed[allowed <= limit]
        total = best[i + k] + k * per_row[i]
        j = len(total) - 1 - int(np.argmin(total[::-1]))  # on a tie, the larger call
        best[i] = overhead + total[j]
        take[i] = k[j]
    return take
