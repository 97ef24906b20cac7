"""Prometheus metrics of one server, in its own registry (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from embedrt.serve.scheduler import CallStats, DropReason, Lane, Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters and histograms updated by the app and the schedulers; queue depth read at scrape time."""

    def __init__(self, schedulers: Callable[[], dict[str, Scheduler]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedrt_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=r)
        self.request_seconds = Histogram("embedrt_request_duration_seconds", "Time from arrival to response",
                                         ["path"], buckets=_SECONDS, registry=r)
        self.inputs = Counter("embedrt_inputs", "Inputs embedded", ["model"], registry=r)
        self.tokens = Counter("embedrt_prompt_tokens", "Tokens embedded (after truncation)", ["model"], registry=r)
        self.truncated = Counter("embedrt_truncated_inputs", "Inputs cut at the model's max length", ["model"],
                                 registry=r)
        self.dropped = Counter("embedrt_dropped_inputs", "Inputs dropped before inference", ["model", "reason"],
                               registry=r)
        self.stage = Histogram("embedrt_stage_seconds", "Per-request time in each stage (queue, tokenize, "
                               "inference)", ["model", "stage"], buckets=_SECONDS, registry=r)
        self.batch_inputs = Histogram("embedrt_batch_inputs", "Inputs per inference call", ["model", "lane"],
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_padded = Histogram("embedrt_batch_padded_tokens", "Padded tokens per inference call",
                                      ["model", "lane"], buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384),
                                      registry=r)
        self.call_seconds = Histogram("embedrt_inference_call_seconds", "Duration of one inference call",
                                      ["model", "lane"], buckets=_SECONDS, registry=r)
        r.register(_QueueCollector(schedulers))

    def add_model(self, model: str) -> None:
        """Create the model's drop counters, so they read 0 rather than being absent."""
        for reason in DropReason:
            self.dropped.labels(model, reason.value)

    def on_call(self, model: str) -> Callable[[CallStats], None]:
        def record(stats: CallStats) -> None:
            lane = stats.lane.value
            self.batch_inputs.labels(model, lane).observe(stats.rows)
            self.batch_padded.labels(model, lane).observe(stats.padded_tokens)
            self.call_seconds.labels(model, lane).observe(stats.seconds)

        return record

    def on_drop(self, model: str) -> Callable[[DropReason, int], None]:
        def record(reason: DropReason, rows: int) -> None:
            self.dropped.labels(model, reason.value).inc(rows)

        return record

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _QueueCollector:
    """Queue depth in requests and tokens per model and lane, read when scraped."""

    def __init__(self, schedulers: Callable[[], dict[str, Scheduler]]) -> None:
        self._schedulers = schedulers

    def collect(self) -> Iterator[Any]:
        requests = GaugeMetricFamily("embedrt_queue_requests", "Requests with inputs waiting",
                                     labels=["model", "lane"])
        tokens = GaugeMetricFamily("embedrt_queue_tokens", "Tokens waiting", labels=["model", "lane"])
        for name, scheduler in self._schedulers().items():
            depth = scheduler.depth()
            for lane in Lane:
                requests.add_metric([name, lane.value], depth[lane][0])
                tokens.add_metric([name, lane.value], depth[lane][1])
        yield requests
        yield tokens
