"""One scheduler per model: the inputs of all waiting requests form the inference calls.

Requests arrive tokenized (tokenization runs in the edge threads, not here) and wait in one of two lanes,
interactive (few, short inputs) and bulk. Each lane has its own worker thread; a worker takes a window of
rows from its lane's waiting requests (at most half a window from each, the leading request first), lets
:func:`embedrt.batching.plan_batches` (the planner ``encode`` uses: length-sorted, token budget, cost per
call) cut it into calls, and runs the call holding the leading request's first row with
``EmbeddingModel.encode_tokens``. A request with more rows than one call is split across calls, and its rows
share calls with other requests' rows.

Fairness:
    * Within a lane, the request with the fewest tokens left leads (shortest remaining work first), so a
      9-input request waits for the running call behind a 2,000-input one, not for all of it, and a burst of
      equal requests is served one after another: under overload the first ones finish within their
      deadlines. Taking turns instead (round robin) had every request of such a burst progress in step and
      reach its deadline unfinished together, its computed rows thrown away. A request with half its timeout
      or less left leads before those with more (the nearest deadline first), so a stream of small requests
      cannot hold a large one back until its deadline.
    * Interactive rows never wait behind bulk ones: they have their own worker, which starts a call as soon
      as the previous interactive call ends, even while a bulk call runs.
    * Priority: the bulk worker does not start a call while an interactive call runs or interactive rows
      wait, except that after ``bulk_yield_limit`` interactive calls in a row it goes ahead anyway
      (anti-starvation). While interactive traffic is active, bulk calls are capped at ``mixed_bulk_tokens``
      so an overlap is short.
    * Deadlines: rows of a request whose deadline passed, or whose client went away, are dropped before
      they reach inference, and counted.
    * Backpressure: each model's queue is bounded in tokens; a request that does not fit is refused at once
      (429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedrt.batching import BatchCost, plan_batches
from embedrt.serve import protocol
from embedrt.serve.config import ServeConfig

log = logging.getLogger("embedrt.serve")


class Lane(enum.Enum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class DropReason(enum.Enum):
    DEADLINE = "deadline"
    DISCONNECTED = "disconnected"
    DRAINING = "draining"
    CANCELLED = "cancelled"  # the host server cancelled the handler (a disconnect or shutdown there)


@dataclasses.dataclass(eq=False)
class Job:
    """One request's inputs in the scheduler; ``future`` gets the ``(n, dim)`` embeddings or an ApiError."""

    ids: list[np.ndarray]
    lengths: np.ndarray
    lane: Lane
    deadline: float  # time.monotonic()
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    out: np.ndarray
    enqueued: float
    timeout: float = 0.0  # seconds it was given (for the 504's message)
    pending: collections.deque[int] = dataclasses.field(default_factory=collections.deque)  # rows not taken
    untaken: int = 0  # rows still waiting in the lane
    unfinished: int = 0  # rows not yet embedded
    queued_tokens: int = 0
    alive: bool = True
    started: float | None = None  # when its first row went into a call
    inference_s: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


@dataclasses.dataclass
class CallStats:
    """What one inference call did (for the metrics)."""

    lane: Lane
    rows: int
    padded_tokens: int
    seconds: float


class Scheduler:
    """The queue and the two workers of one model.

    Args:
        model: an ``EmbeddingModel`` (or anything with its ``encode_tokens``, ``batch_cost``,
            ``padded_lengths`` and ``dim``).
        config: the server's options.
        on_call: called (from a worker thread) with each call's :class:`CallStats`.
        on_drop: called with ``(reason, rows)`` for rows dropped before inference.
        bulk_model: another instance of the same model folder for the bulk lane, or None to share ``model``.
    """

    def __init__(self, model: Any, config: ServeConfig, on_call: Callable[[CallStats], None] | None = None,
                 on_drop: Callable[[DropReason, int], None] | None = None, bulk_model: Any | None = None) -> None:
        self.model = model
        # a second instance of the model for the bulk lane: on a backend that runs one call at a time
        # (OpenVINO's latency hint: one stream), an interactive call would otherwise wait for a bulk one
        self._models = {Lane.INTERACTIVE: model, Lane.BULK: bulk_model if bulk_model is not None else model}
        self.config = config
        self.queue_limit = config.queue_tokens(int(model.manifest.max_seq_length))
        self._cost: BatchCost = model.batch_cost(config.max_batch_tokens)
        budget = self._cost.token_budget
        self._mixed_cost: BatchCost = model.batch_cost(min(config.mixed_bulk_tokens, budget or 2**62))
        self._on_call = on_call or (lambda stats: None)
        self._on_drop = on_drop or (lambda reason, rows: None)
        self._work = threading.Condition()
        # per lane, the requests with rows waiting (a window takes them in _priority order: the first one leads)
        self._lanes: dict[Lane, collections.deque[Job]] = {lane: collections.deque() for lane in Lane}
        self._open: set[Job] = set()  # requests not yet answered (for abandon)
        self._tokens = dict.fromkeys(Lane, 0)
        self._jobs = dict.fromkeys(Lane, 0)  # requests with rows still waiting
        self._busy = dict.fromkeys(Lane, False)
        self._interactive_seen = -math.inf
        self._interactive_streak = 0  # interactive calls started while bulk rows waited
        self._tokens_per_s = 0.0  # smoothed inference rate, for Retry-After
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, args=(lane,), name=f"embedrt-{lane.value}",
                                          daemon=True) for lane in Lane]
        for thread in self._threads:
            thread.start()

    # ---- the event loop's side (all under the lock, all short) ----

    def full(self) -> bool:
        """Whether the queue is already at its token bound (a cheap check before tokenizing)."""
        return sum(self._tokens.values()) >= self.queue_limit

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained enough to take a request."""
        queued = sum(self._tokens.values())
        rate = self._tokens_per_s or 1000.0
        return int(min(60, max(1, math.ceil(queued / rate))))

    def submit(self, ids: list[np.ndarray], lane: Lane, deadline: float, timeout: float | None = None) -> Job:
        """Queue one request's tokenized inputs; its ``future`` resolves on the calling event loop.

        ``deadline`` is a ``time.monotonic()`` time; ``timeout`` the seconds it stands for (the 504 names it;
        the server's request timeout when not given).

        Raises:
            ApiError: 413 if the request alone exceeds the queue bound, 429 if it does not fit now,
                503 once the scheduler is closing.
        """
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        tokens = int(lengths.sum())
        loop = asyncio.get_running_loop()
        job = Job(ids, lengths, lane, deadline, loop.create_future(), loop,
                  np.empty((len(ids), self.model.dim), dtype=np.float32), time.monotonic(),
                  self.config.request_timeout if timeout is None else timeout,
                  collections.deque(range(len(ids))), untaken=len(ids), unfinished=len(ids), queued_tokens=tokens)
        limit = self.queue_limit
        if tokens > limit:
            raise protocol.too_large(f"The request holds {tokens} tokens; this server queues at most {limit} "
                                     "per model: split it.", "input")
        with self._work:
            if self._closed:
                raise protocol.unavailable("The server is shutting down.", "draining")
            if sum(self._tokens.values()) + tokens > limit:
                raise protocol.queue_full(self.retry_after())
            self._lanes[lane].append(job)
            self._open.add(job)
            self._tokens[lane] += tokens
            self._jobs[lane] += 1
            if lane is Lane.INTERACTIVE:
                self._interactive_seen = job.enqueued
            self._work.notify_all()
        return job

    def cancel(self, job: Job, reason: DropReason) -> int:
        """Drop a request's rows that have not reached inference; returns how many were dropped."""
        with self._work:
            if not job.alive:
                return 0
            job.alive = False
            dropped = self._forget(job)
            self._open.discard(job)
        if dropped:
            self._on_drop(reason, dropped)
        return dropped

    def abandon(self, error: BaseException) -> int:
        """Answer every request not yet answered with ``error`` (a drain that ran out of time), and take no more.

        Their waiting rows are dropped (counted as ``draining``); rows already in a running call finish
        there, unread. Returns how many requests were answered so.
        """
        with self._work:
            self._closed = True  # a request still on its way in (uploading, tokenizing) gets the 503 at submit
            jobs = [job for job in self._open if job.alive]
            dropped = 0
            for job in jobs:
                job.alive = False
                dropped += self._forget(job)
            self._open.clear()
            self._work.notify_all()
        if dropped:
            self._on_drop(DropReason.DRAINING, dropped)
        for job in jobs:
            _resolve(job, error)
        return len(jobs)

    def depth(self) -> dict[Lane, tuple[int, int]]:
        """Per lane: (requests, tokens) waiting."""
        with self._work:
            return {lane: (self._jobs[lane], self._tokens[lane]) for lane in Lane}

    def close(self, timeout: float) -> bool:
        """Refuse new work, let the queued work finish (at most ``timeout`` s), stop the workers.

        Returns:
            True if the queue drained in time.
        """
        end = time.monotonic() + timeout
        with self._work:
            self._closed = True
            self._work.notify_all()
            while (any(self._lanes.values()) or any(self._busy.values())) and time.monotonic() < end:
                self._work.wait(0.05)
            drained = not any(self._busy.values()) and not any(self._lanes.values())
            self._lanes = {lane: collections.deque() for lane in Lane}
            self._work.notify_all()
        # the workers are daemon threads: one still in a call past the drain's end (its requests were answered
        # 503 at the cut-off) does not hold the exit; waiting for it here overran --drain-timeout by 1.4 s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return drained

    # ---- the workers ----

    def _forget(self, job: Job) -> int:
        """Take a dead job's waiting rows off the books and out of its lane. Lock held."""
        dropped = job.untaken
        if dropped:
            self._tokens[job.lane] -= job.queued_tokens
            self._jobs[job.lane] -= 1
            job.untaken, job.queued_tokens = 0, 0
        if job.pending:
            job.pending.clear()
            with contextlib.suppress(ValueError):  # rows of it are out in a window being planned
                self._lanes[job.lane].remove(job)
        return dropped

    def _worker(self, lane: Lane) -> None:
        while True:
            with self._work:
                while True:
                    if self._closed and not self._lanes[lane]:
                        self._work.notify_all()
                        return
                    window = self._window(lane)
                    if window:
                        break
                    self._work.wait(0.25)
                self._busy[lane] = True
                if lane is Lane.INTERACTIVE and self._lanes[Lane.BULK]:
                    self._interactive_streak += 1
                elif lane is Lane.BULK:
                    self._interactive_streak = 0
                cost = self._lane_cost(lane)
            try:
                self._run_call(lane, window, cost)
            finally:
                with self._work:
                    self._busy[lane] = False
                    self._work.notify_all()

    def _lane_cost(self, lane: Lane) -> BatchCost:
        if lane is Lane.BULK and (self._lanes[Lane.INTERACTIVE] or self._busy[Lane.INTERACTIVE] or
                                  time.monotonic() - self._interactive_seen < self.config.interactive_window):
            return self._mixed_cost
        return self._cost

    def _bulk_yields(self) -> bool:
        """Whether the bulk worker should let interactive work go first (priority, bounded by the streak)."""
        interactive = bool(self._lanes[Lane.INTERACTIVE]) or self._busy[Lane.INTERACTIVE]
        return interactive and self._interactive_streak < self.config.bulk_yield_limit

    def _window(self, lane: Lane) -> list[tuple[Job, int]]:
        """Take rows of the lane's waiting requests in priority order (at most about two calls' worth). Lock held.

        Each request gives at most half the window, so the planner can fill a call with rows of similar
        length from the next ones too; the first row is the leading request's.
        """
        waiting = self._lanes[lane]
        if not waiting or (lane is Lane.BULK and not self._closed and self._bulk_yields()):
            return []
        now = time.monotonic()
        for job in [job for job in waiting if job.deadline <= now]:
            self._expire(job)
        cost = self._lane_cost(lane)
        max_rows = 2 * self.config.max_batch_inputs
        # a window holds at most max_rows requests: the first of them in priority order, not the whole lane
        # sorted (under the lock the event loop's submit waits on: 34 ms for 50,000 queued queries)
        jobs = heapq.nsmallest(max_rows, self._lanes[lane], key=lambda job: _priority(job, now))
        max_tokens = 2 * cost.token_budget if cost.token_budget else math.inf
        window: list[tuple[Job, int]] = []
        tokens = 0
        for job in jobs:
            share_rows, share_tokens = 0, 0
            while (job.pending and len(window) < max_rows and tokens < max_tokens
                   and (not window or (share_rows < max_rows // 2 and share_tokens < max_tokens / 2))):
                row = job.pending.popleft()
                window.append((job, row))
                length = int(job.lengths[row])
                tokens += length
                share_rows += 1
                share_tokens += length
            if len(window) >= max_rows or tokens >= max_tokens:
                break
        return window

    def _expire(self, job: Job) -> None:
        """A job whose deadline passed while queued: drop its rows, answer 504. Lock held."""
        job.alive = False
        dropped = self._forget(job)
        if dropped:
            self._on_drop(DropReason.DEADLINE, dropped)
        self._open.discard(job)
        _resolve(job, protocol.deadline_passed(job.timeout))

    def _run_call(self, lane: Lane, window: list[tuple[Job, int]], cost: BatchCost) -> None:
        lengths = np.fromiter((job.lengths[row] for job, row in window), dtype=np.int64, count=len(window))
        padded = self.model.padded_lengths(lengths)
        plan = plan_batches(lengths, self.config.max_batch_inputs, cost, padded,
                            getattr(self._models[lane], "row_sizes", ()))
        chosen = next(call for call in plan if 0 in call)  # the call holding the oldest row
        picked = set(chosen.tolist())
        with self._work:
            for i in reversed(range(len(window))):  # rows not in this call go back, in their order
                job, row = window[i]
                if i not in picked and job.alive:
                    job.pending.appendleft(row)
            self._leave_lane(lane)
            rows = []
            for i in sorted(picked):
                job, row = window[i]
                if not job.alive:  # cancelled while the call was planned: already counted as dropped
                    continue
                job.untaken -= 1
                job.queued_tokens -= int(job.lengths[row])
                self._tokens[lane] -= int(job.lengths[row])
                if job.untaken == 0:
                    self._jobs[lane] -= 1
                rows.append((job, row))
        if not rows:
            return
        start = time.monotonic()
        for job, _ in rows:
            if job.started is None:
                job.started = start
        try:
            emb = self._models[lane].encode_tokens([job.ids[row] for job, row in rows], batch_size=len(rows),
                                           max_tokens=cost.token_budget)
        except Exception as exc:  # never leave a request hanging: answer every job of the call
            log.exception("inference failed on a call of %d inputs", len(rows))
            error = protocol.ApiError(500, f"Inference failed: {exc}", type="server_error", code="inference_error")
            with self._work:
                for job, _ in rows:
                    job.alive = False
                    self._forget(job)
                    self._open.discard(job)
            for job, _ in rows:
                _resolve(job, error)
            return
        seconds = time.monotonic() - start
        pad = int(padded[sorted(picked)].max()) * len(rows)
        self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (pad / max(seconds, 1e-6)) if self._tokens_per_s \
            else pad / max(seconds, 1e-6)
        self._on_call(CallStats(lane, len(rows), pad, seconds))
        for job in {job for job, _ in rows}:
            job.inference_s += seconds
        done = []
        for (job, row), vector in zip(rows, emb, strict=True):
            job.out[row] = vector
            job.unfinished -= 1
            if job.unfinished == 0:
                done.append(job)
        with self._work:
            self._open.difference_update(done)
        for job in done:
            _resolve(job, job.out)

    def _leave_lane(self, lane: Lane) -> None:
        """After a window: requests with no rows left waiting leave the lane. Lock held."""
        jobs = self._lanes[lane]
        if any(not job.pending for job in jobs):
            self._lanes[lane] = collections.deque(job for job in jobs if job.pending)


def _priority(job: Job, now: float) -> tuple[int, float, float]:
    """A lane's order: requests with half their timeout or less left first, the nearest deadline first; then
    the rest by the tokens they have left waiting (shortest remaining work first), the older first among
    equals."""
    if job.deadline - now <= job.timeout / 2:
        return (0, job.deadline, 0.0)
    return (1, job.queued_tokens, job.enqueued)


def _resolve(job: Job, result: np.ndarray | BaseException) -> None:
    """Settle a job's future on its event loop (from any thread)."""

    def settle() -> None:
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop has closed: nobody is waiting any more
        pass
