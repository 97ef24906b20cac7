"""embedrt serve against the real openai client, on live servers bound to 127.0.0.1 (each stopped by its test)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

import embedrt  # noqa: E402
from embedrt.serve import ServeConfig, create_app  # noqa: E402
from embedrt.serve.run import MAX_HEAD_BYTES, http_protocol  # noqa: E402

TEXTS = [
    "How do vaccines train the immune system?",
    "fastest way to travel between cities in Europe",
    "x",
    "",
    "Leaves change colour in autumn because chlorophyll breaks down. " * 40,  # over 256 tokens: truncated
    "naïve café — 東京 🚄",
]


class LiveServer:
    """An app on a uvicorn server in a thread, on a port bound before it starts."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.service = app.state.service
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        # the HTTP protocol embedrt serve runs (httptools with the request head bounded)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=http_protocol())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"

    def client(self, key: str = "unused", **options: Any) -> Any:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, **options)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.service.metrics.exposition().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


class Gated:
    """A model whose inference waits for ``gate`` and records the rows it embeds (deterministic queue states)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.gate = threading.Event()
        self.rows = 0
        self.entered = threading.Event()
        self.calls: list[list[tuple[int, ...]]] = []  # each call's inputs, in the order they ran

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_tokens(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.rows += len(ids)
        self.calls.append([tuple(int(t) for t in x) for x in ids])
        return self._model.encode_tokens(ids, *args, **kwargs)


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> Any:
    return embedrt.load(minilm_dir, threads=2)


@pytest.fixture(scope="module")
def tiny(tiny_bert: tuple[Path, Path]) -> Any:
    return embedrt.load(tiny_bert[1], threads=1)


@pytest.fixture(scope="module")
def live(minilm: Any, tiny: Any) -> Iterator[LiveServer]:
    with LiveServer(create_app([minilm, tiny], ServeConfig(max_inputs=64, max_body_bytes=200_000))) as server:
        yield server


def _error(exc: Any) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _tiny_name(live: LiveServer) -> str:
    return next(name for name in live.service.models if name != "all-MiniLM-L6-v2")


def _vectors(result: Any) -> np.ndarray:
    rows = [d.embedding for d in sorted(result.data, key=lambda d: d.index)]
    if rows and isinstance(rows[0], str):  # base64 asked for explicitly: the client hands the string over
        return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows])
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("fmt", ["float", "base64", None])
def test_openai_client_matches_encode(live: LiveServer, minilm: Any, tiny: Any, fmt: str | None) -> None:
    """float, base64, and the client's default (it asks for base64 and decodes it itself)."""
    client = live.client()
    for name, model in (("all-MiniLM-L6-v2", minilm), (_tiny_name(live), tiny)):
        options = {} if fmt is None else {"encoding_format": fmt}
        raw = client.embeddings.with_raw_response.create(model=name, input=TEXTS, **options)
        result = raw.parse()
        got = _vectors(result)
        assert got.shape == (len(TEXTS), model.dim)
        assert np.abs(got - model.encode(TEXTS)).max() <= 1e-6
        tokenized = model.tokenize_batch(TEXTS)
        assert result.usage.prompt_tokens == result.usage.total_tokens == int(tokenized.lengths.sum())
        assert raw.headers["x-embedrt-truncated-inputs"] == str(int(tokenized.truncated.sum()))
        assert result.model == name
    if fmt == "base64":  # the wire format itself: little-endian float32
        status, _, body = live.request("POST", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "x",
                                                                   "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(json.loads(body)["data"][0]["embedding"]), dtype="<f4")
        assert status == 200 and np.array_equal(vector, minilm.encode(["x"])[0])


def test_token_id_inputs(live: LiveServer, minilm: Any) -> None:
    client = live.client()
    texts = [TEXTS[0], TEXTS[4]]
    # the text's own tokens, without [CLS] / [SEP]: the server adds them as the tokenizer does for text
    tokens = [row[1:-1] for row in minilm.tokenize([texts[0]])]
    sentence = TEXTS[4][: TEXTS[4].index(".") + 1]
    long_ids = minilm.tokenize([sentence])[0][1:-1] * 40  # TEXTS[4]'s tokens, untruncated: 400+ ids
    assert len(long_ids) > minilm.manifest.max_seq_length
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=tokens[0], encoding_format="float")
    assert np.abs(np.array(one.data[0].embedding, dtype=np.float32) - minilm.encode(texts[:1])[0]).max() <= 1e-6
    raw = client.embeddings.with_raw_response.create(model="all-MiniLM-L6-v2", input=[tokens[0], long_ids])
    result = raw.parse()
    assert np.abs(_vectors(result) - minilm.encode(texts)).max() <= 1e-6
    assert raw.headers["x-embedrt-truncated-inputs"] == "1"
    assert result.usage.prompt_tokens == len(tokens[0]) + 2 + minilm.manifest.max_seq_length
    # the empty text's ids are [] (it was refused, while "" embeds)
    empty = client.embeddings.create(model="all-MiniLM-L6-v2", input=[[], tokens[0]], encoding_format="float")
    assert np.abs(_vectors(empty) - minilm.encode(["", texts[0]])).max() <= 1e-6
    assert empty.usage.prompt_tokens == 2 + len(tokens[0]) + 2


def test_bad_requests_are_400_naming_the_field(live: LiveServer) -> None:
    client = live.client()
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"model": "all-MiniLM-L6-v2", "input": []}, "input"),
        ({"model": "all-MiniLM-L6-v2", "input": ["a", 3]}, "input[1]"),
        ({"model": "all-MiniLM-L6-v2", "input": [[1, 2], [1.5]]}, "input[1]"),
        ({"model": "all-MiniLM-L6-v2", "input": [[1, 2], [10**9]]}, "input[1]"),
        ({"model": "all-MiniLM-L6-v2", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "all-MiniLM-L6-v2", "input": "a", "dimensions": 128}, "dimensions"),
        ({"model": "all-MiniLM-L6-v2", "input": ["a", TEXTS[4]], "truncate": False}, "input[1]"),
        ({"input": "a"}, "model"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/embeddings", body=body, cast_to=object)
        error = _error(info.value)
        assert info.value.status_code == 400 and error["param"] == param, (body, error)
    deep = b"[" * 5000 + b"]" * 5000
    for raw in (b"{not json", deep, b'{"model": "x", "input": ' + deep + b"}"):
        status, _, body = live.request("POST", "/v1/embeddings", raw)  # nested too deeply: 400, not 500
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json", (raw[:20], body)
    status, _, body = live.request("POST", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": [1.5]})
    message = json.loads(body)["error"]["message"]  # was "input[0] must be a list of token ids like input[0]"
    assert status == 400 and message == "input[0] must be a string, a token id or a list of token ids, got float."
    # dimensions equal to the model's own is no cut: accepted; 'user' is accepted
    ok = client.embeddings.create(model="all-MiniLM-L6-v2", input="a", dimensions=384, user="u-1")
    assert len(ok.data[0].embedding) == 384


def test_unknown_model_404_and_limits_413(live: LiveServer) -> None:
    client = live.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert _error(info.value)["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["a"] * 65)
    assert info.value.status_code == 413 and _error(info.value)["param"] == "input"
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["word " * 50_000])
    assert info.value.status_code == 413
    models = client.models.list()
    assert {m.id for m in models.data} == set(live.service.models)


def test_concurrent_clients_get_their_own_results(live: LiveServer, minilm: Any) -> None:
    """Requests that share batches: every client gets exactly its own vectors, in its own order."""
    corpus = [f"{t} #{i}" for i in range(8) for t in TEXTS[:3] + TEXTS[5:]]
    expected = minilm.encode(corpus)
    failures: list[str] = []

    def work(k: int) -> None:
        client = live.client()
        for r in range(4):
            pick = [(k * 7 + r * 3 + j) % len(corpus) for j in range(1 + (k + r) % 5)]
            result = client.embeddings.create(model="all-MiniLM-L6-v2", input=[corpus[i] for i in pick])
            if np.abs(_vectors(result) - expected[pick]).max() > 1e-6:
                failures.append(f"client {k} request {r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert live.metric("embedrt_batch_inputs_count") > 0


@contextlib.contextmanager
def _gated_server(tiny: Any, **config: Any) -> Iterator[tuple[LiveServer, Gated]]:
    gated = Gated(tiny)
    with LiveServer(create_app([gated], ServeConfig(**config))) as server:
        try:
            yield server, gated
        finally:
            gated.gate.set()


def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait(predicate: Any, what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queue_full_429_deadline_504_disconnect_dropped(tiny: Any) -> None:
    with _gated_server(tiny, max_queue_tokens=64) as (server, gated):
        name = next(iter(server.service.models))
        scheduler = server.service.models[name].scheduler
        client = server.client()
        # A goes into inference and blocks there; B (30 tokens) waits in the queue
        a_thread, a = _in_thread(client.embeddings.create, model=name, input="first")
        _wait(gated.entered.is_set, "the first call")
        b_thread, b = _in_thread(client.embeddings.create, model=name, input=["word " * 28])
        _wait(lambda: scheduler.depth()[next(iter(scheduler.depth()))][1] > 0, "B queued")
        # C does not fit next to B: 429 at once, with Retry-After
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model=name, input=["word " * 40])
        assert _error(info.value)["code"] == "queue_full"
        assert int(info.value.response.headers["retry-after"]) >= 1
        # D has a 0.3 s deadline: dropped before inference, 504
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(model=name, input="late", extra_headers={"X-Request-Timeout": "0.3"})
        assert info.value.status_code == 504 and _error(info.value)["code"] == "deadline_exceeded"
        assert "(0.3 s)" in _error(info.value)["message"]  # its own deadline, not the server's default
        # the openai client retries a 5xx twice unless told not to: the same request, in vain, twice more
        assert info.value.response.headers["x-should-retry"] == "false"
        # E's client goes away while E waits: dropped, counted
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.3)
        conn.request("POST", "/v1/embeddings", body=json.dumps({"model": name, "input": ["gone", "away"]}),
                     headers={"Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            conn.getresponse()
        conn.close()
        _wait(lambda: server.metric("embedrt_dropped_inputs_total", reason="disconnected") == 2, "E dropped")
        gated.gate.set()
        for thread in (a_thread, b_thread):
            thread.join(30)
        assert "result" in a and "result" in b, (a, b)
        assert gated.rows == 2  # A and B only: D and E never reached inference
        assert server.metric("embedrt_dropped_inputs_total", reason="deadline") == 1
        assert server.metric("embedrt_requests_total", status="429") == 1
        assert server.metric("embedrt_requests_total", status="504") == 1


@contextlib.contextmanager
def _first_call_held(tiny: Any) -> Iterator[tuple[LiveServer, Gated, str, tuple[threading.Thread, dict[str, Any]]]]:
    """A gated server whose first request's call is running, held at the gate: the server, the gate, the
    model's name and that request's thread and outcome."""
    with _gated_server(tiny) as (server, gated):
        name = next(iter(server.service.models))
        first = _in_thread(server.client().embeddings.create, model=name, input="first")
        _wait(gated.entered.is_set, "the first call")
        yield server, gated, name, first


def test_a_pipelining_client_that_hangs_up_has_its_running_request_dropped(tiny: Any,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn tells only the latest request on a connection that its client went away: the one running
    before it (pipelined) ran to the end, counted a 200, and wrote to the closed socket (an ERROR each)."""
    with _first_call_held(tiny) as (server, gated, name, (first_thread, first)):
        scheduler = server.service.models[name].scheduler
        ok = server.metric("embedrt_requests_total", status="200")
        one = json.dumps({"model": name, "input": ["pipelined", "request"]}).encode()
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(one)}\r\n\r\n").encode()
        with caplog.at_level(logging.ERROR), socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((head + one) * 2)
            _wait(lambda: sum(n for n, _ in scheduler.depth().values()) == 1, "the first pipelined request queued")
        _wait(lambda: server.metric("embedrt_dropped_inputs_total", reason="disconnected") == 2,
              "the running pipelined request dropped")
        gated.gate.set()
        first_thread.join(30)
        assert "result" in first, first
        _wait(lambda: server.metric("embedrt_requests_total", status="200") == ok + 1, "the first request's 200")
        assert server.metric("embedrt_requests_total", status="499") == 1
        assert gated.rows == 1  # the pipelined requests never reached inference
        time.sleep(0.2)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_deadline_the_handler_and_the_scheduler_both_reach_logs_no_error(
        tiny: Any, caplog: pytest.LogCaptureFixture) -> None:
    """When the scheduler's expiry answers a job 504 just as its handler gives up on it, nobody read that
    504: asyncio logged "Future exception was never retrieved" at ERROR (18 of 400 short deadlines under load)."""
    import gc

    with _first_call_held(tiny) as (server, gated, name, (first_thread, _)):
        scheduler = server.service.models[name].scheduler
        client = server.client()
        cancel = scheduler.cancel

        def expired_first(job: Any, reason: Any) -> int:  # the worker's window reached the job first
            with scheduler._work:
                scheduler._expire(job)
            return cancel(job, reason)

        with caplog.at_level(logging.ERROR), mock.patch.object(scheduler, "cancel", expired_first):
            with pytest.raises(openai.APIStatusError) as info:
                client.embeddings.create(model=name, input="late", extra_headers={"X-Request-Timeout": "0.2"})
            gated.gate.set()
            first_thread.join(30)
            client.embeddings.create(model=name, input="after")
            gc.collect()  # a future's unread exception is logged when the future is collected
            time.sleep(0.2)
            gc.collect()
        assert info.value.status_code == 504
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _finished_after(gated: Gated, model: Any, texts: list[str]) -> int | None:
    """How many rows the gated model had embedded when the last of ``texts`` ran (None if one never did)."""
    mine = {tuple(int(t) for t in x) for x in model.tokenize_batch(texts).ids}
    rows, done_at, seen = 0, None, set()
    for call in gated.calls:
        rows += len(call)
        if mine & set(call):
            seen |= mine & set(call)
            done_at = rows
    return done_at if seen == mine else None


@contextlib.contextmanager
def _gated_bulk(tiny: Any) -> Iterator[tuple[Gated, Any, Any]]:
    """A gated server of calls of 4 rows: the gate, the scheduler, and a function sending a bulk-lane request."""
    with _gated_server(tiny, max_batch_inputs=4) as (server, gated):
        name = next(iter(server.service.models))
        client = server.client()

        def bulk(texts: list[str]) -> Any:
            return client.embeddings.create(model=name, input=texts, extra_headers={"X-Embedrt-Lane": "bulk"})

        yield gated, server.service.models[name].scheduler, bulk


def test_a_small_request_goes_ahead_of_a_large_one_in_its_lane(tiny: Any) -> None:
    """A small bulk request waits for the running call behind a large one, not for all of it."""
    with _gated_bulk(tiny) as (gated, scheduler, bulk):
        large = [f"large request, passage {i}" for i in range(40)]
        small = [f"small request, passage {i}" for i in range(9)]
        a_thread, a = _in_thread(bulk, large)
        _wait(gated.entered.is_set, "the large request's first call")
        b_thread, b = _in_thread(bulk, small)
        _wait(lambda: sum(n for n, _ in scheduler.depth().values()) == 2, "both queued")
        gated.gate.set()
        for thread in (a_thread, b_thread):
            thread.join(60)
        assert np.abs(_vectors(a["result"]) - tiny.encode(large)).max() <= 1e-6
        assert np.abs(_vectors(b["result"]) - tiny.encode(small)).max() <= 1e-6
        # calls of 4 rows: the running one, then the small request's 9 rows lead (sharing calls with rows of
        # the large one of a like length); first come, first served, they would wait for all 40
        done_at = _finished_after(gated, tiny, small)
        assert done_at is not None and done_at <= 4 + 2 * 9, ("the small request waited for the large one", done_at)


def test_a_burst_of_equal_requests_is_served_one_after_another(tiny: Any) -> None:
    """Under overload, requests that take turns all progress in step and all reach their deadline unfinished;
    served one after another (shortest remaining work first), the first ones finish."""
    with _gated_bulk(tiny) as (gated, scheduler, bulk):
        first = _in_thread(bulk, ["warm the gate"])
        _wait(gated.entered.is_set, "the first call")
        burst = [[f"request {k} passage {i}" for i in range(12)] for k in range(3)]
        threads = []
        for k, texts in enumerate(burst):
            threads.append(_in_thread(bulk, texts))
            _wait(lambda k=k: sum(n for n, _ in scheduler.depth().values()) == k + 1, f"request {k} queued")
        gated.gate.set()
        for thread, _ in (first, *threads):
            thread.join(60)
        for (_, out), texts in zip(threads, burst):
            assert np.abs(_vectors(out["result"]) - tiny.encode(texts)).max() <= 1e-6
        done = [_finished_after(gated, tiny, texts) for texts in burst]
        # after the first call (1 row), each request's 12 rows run in 3 calls of 4, one request after another;
        # taking turns, the first to finish did so after about 30 rows
        assert done == [1 + 12, 1 + 24, 1 + 36], done


def test_a_lane_serves_the_least_work_first_and_ages_the_rest() -> None:
    """The order itself: fewest tokens left first, the older first among equals; a request with half its
    timeout or less left goes before all of those, the nearest deadline first."""
    import asyncio

    from embedrt.serve.scheduler import Job, Lane, _priority

    loop = asyncio.new_event_loop()
    try:
        def job(tokens: int, enqueued: float, timeout: float = 60.0) -> Job:
            return Job([], np.zeros(0), Lane.BULK, enqueued + timeout, loop.create_future(), loop,
                       np.zeros((0, 1)), enqueued, timeout, queued_tokens=tokens)

        big_old, small, small_later, big_aged, short_aged = (job(5000, 0.0), job(10, 5.0), job(10, 6.0),
                                                             job(9000, -31.0), job(8000, 8.0, timeout=2.0))
        order = sorted([big_old, small, small_later, big_aged, short_aged], key=lambda j: _priority(j, 9.5))
        assert order == [short_aged, big_aged, small, small_later, big_old]
    finally:
        loop.close()


def test_lane_header_cannot_put_a_large_request_among_the_queries(live: LiveServer) -> None:
    name = _tiny_name(live)
    for count, asked, lane in ((2, "bulk", "bulk"), (2, "interactive", "interactive"), (20, "interactive", "bulk")):
        status, headers, _ = live.request("POST", "/v1/embeddings", {"model": name, "input": ["q"] * count},
                                          headers={"X-Embedrt-Lane": asked})
        assert status == 200 and headers["x-embedrt-lane"] == lane, (count, asked, headers)


def test_a_few_long_passages_go_to_the_bulk_lane(live: LiveServer) -> None:
    """A request of few inputs but many tokens is bulk work: sent one per request by an async client, such
    passages held single queries up 600-fold in the interactive lane."""
    passage = "word " * 200  # 202 tokens for all-MiniLM-L6-v2
    for inputs, asked, lane in (([passage] * 2, None, "interactive"), ([passage] * 3, None, "bulk"),
                                ([passage] * 3, "interactive", "bulk"), (["q"] * 8, None, "interactive")):
        status, headers, _ = live.request("POST", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": inputs},
                                          headers={"X-Embedrt-Lane": asked} if asked else {})
        assert status == 200 and headers["x-embedrt-lane"] == lane, (len(inputs), asked, headers)


def test_a_client_gone_while_sending_its_body_is_499_not_a_server_error(live: LiveServer) -> None:
    before = live.metric("embedrt_requests_total", status="500")
    gone = live.metric("embedrt_requests_total", status="499")
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b'Content-Length: 1000\r\n\r\n{"model": ')
    _wait(lambda: live.metric("embedrt_requests_total", status="499") == gone + 1, "the 499")
    assert live.metric("embedrt_requests_total", status="500") == before


def test_a_request_head_over_the_limit_is_431_and_closed(live: LiveServer) -> None:
    """Without a bound, a 200 MiB header took 98 s of the event loop's time and 230 MB, stalling every client."""
    for size, want in ((32 * 1024, b"HTTP/1.1 200 "), (MAX_HEAD_BYTES + 300 * 1024, b"HTTP/1.1 431 ")):
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
            sent = 0
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: ")
                for _ in range(size // 4096):
                    sock.sendall(b"A" * 4096)
                    sent += 4096
                sock.sendall(b"\r\n\r\n")
            except OSError:  # the server closed the connection while the rest was on its way
                pass
            answer = sock.recv(200)
            assert answer.startswith(want), (size, sent, answer)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"A" * (MAX_HEAD_BYTES + 1000) + b"\r\n\r\n"
    assert _exchange(live.port, head).startswith(b"HTTP/1.1 431 ")  # the whole head in one write
    # a lingering close: after its 431 the server reads and drops what the client still sends until the
    # client is done. Closing at once, with the client's bytes unread, answered them with a reset, which on a
    # real network can destroy the 431 before the client reads it (here: EPIPE / ECONNRESET below)
    with socket.create_connection(("127.0.0.1", live.port), timeout=20) as sock:
        sock.sendall(head)
        answer = b""
        while not answer.endswith(b" bytes."):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        time.sleep(0.2)
        for _ in range(64):
            sock.sendall(b"A" * 4096)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # the server's close once we are done, not a reset
    # a request answered first keeps its answer: the oversized one after it is not answered, then the close
    first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _exchange(live.port, first + head)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    if b"HTTP/1.1 431 " in answer:  # the first answer finished before the second head was read: then its 431
        assert answer.index(b"HTTP/1.1 431 ") > answer.index(b'{"status":'), answer[:400]
    # a chunked body's trailer is not a way around the bound
    body = json.dumps({"model": _tiny_name(live), "input": "a"}).encode()
    chunked = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\nX-Trailer: ")
    start = time.monotonic()
    assert _exchange(live.port, chunked, b"A" * (16 * MAX_HEAD_BYTES)) == b""  # closed: its body cannot complete
    assert time.monotonic() - start < 15
    assert live.request("GET", "/health")[0] == 200


def test_without_httptools_the_server_says_its_heads_are_not_timed(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """uvicorn's h11 fallback bounds a head's size but not its time: that used to go unsaid."""
    assert http_protocol() != "h11"  # embedrt[serve] brings httptools
    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)  # its import fails
    with caplog.at_level(logging.WARNING, logger="embedrt.serve"):
        assert http_protocol() == "h11"
    assert "httptools is not installed" in caplog.text and "embedrt[serve]" in caplog.text


def test_a_head_that_trickles_in_is_408_and_an_idle_connection_is_closed(live: LiveServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Slow-loris: a head sent a byte every few seconds held its connection (and file descriptor) for as long
    as the client liked, and 90 such connections locked every client out of a server with 100 descriptors."""
    from embedrt.serve import run

    monkeypatch.setattr(run, "HEAD_TIMEOUT_S", 0.5)

    def trickle(sock: socket.socket, data: bytes, seconds: float) -> bytes:
        """Send ``data`` a byte every 50 ms for at most ``seconds``; what the server answered until it closed."""
        end = time.monotonic() + seconds
        with contextlib.suppress(OSError):
            for byte in data:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() > end:
                    break
        return _read_to_close(sock)

    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"A" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        start = time.monotonic()
        answer = trickle(sock, head, 5)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in answer, answer[:200]
        assert time.monotonic() - start < 4
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:  # the deadline runs from the
        time.sleep(0.35)  # head's first byte, not from the connection's opening (a 408 here before)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.35)
        sock.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:  # sends nothing: closed
        start = time.monotonic()
        assert sock.recv(100) == b"" and time.monotonic() - start < 4
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:  # after a response: the same
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        answer = trickle(sock, b"\r\n" * 100, 5)
        # one response, the 200 (not "408" anywhere: the random X-Request-Id can hold those digits)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
        assert time.monotonic() - start < 4
    # a head sent at once, then a body sent slowly (over the head timeout, within the request's deadline): 200
    body = json.dumps({"model": _tiny_name(live), "input": "a"}).encode()
    with socket.create_connection(("127.0.0.1", live.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.3)
            sock.sendall(body[i : i + len(body) // 4 + 1])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def _exchange(port: int, data: bytes, more: bytes = b"") -> bytes:
    """Send ``data`` (then ``more`` in 4 KiB writes, stopping if the server closes) and read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(data)
            for i in range(0, len(more), 4096):
                sock.sendall(more[i : i + 4096])
        except OSError:
            pass
        return _read_to_close(sock)


def _read_to_close(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or resets) the connection."""
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_body_that_does_not_arrive_by_the_deadline_is_408_and_closed(tiny: Any) -> None:
    """The deadline did not cover the upload: a stalled body held its connection forever (slowloris)."""
    with LiveServer(create_app([tiny], ServeConfig(request_timeout=1.0))) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b'Content-Length: 1000\r\n\r\n{"model": ')
            start = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert time.monotonic() - start < 10
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer[:300]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_a_handler_cancelled_by_its_host_server_drops_its_rows_as_cancelled(tiny: Any) -> None:
    """Hosts such as hypercorn cancel a handler on a disconnect or at shutdown: its rows are dropped and
    counted as ``cancelled``, not as a drain (which this server alone starts)."""
    import asyncio

    with _gated_server(tiny) as (server, gated):
        name = next(iter(server.service.models))
        scheduler = server.service.models[name].scheduler
        client = server.client()
        a_thread, a = _in_thread(client.embeddings.create, model=name, input="stuck in inference")
        _wait(gated.entered.is_set, "the first call")
        body = json.dumps({"model": name, "input": ["queued", "then cancelled"]}).encode()
        sent: list[dict[str, Any]] = []

        async def call_app() -> None:  # the ASGI call a host server makes, on the server's own loop
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop()
                await asyncio.Event().wait()  # no disconnect: the host cancels instead
                raise AssertionError("unreachable")

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "root_path": "",
                     "headers": [(b"content-type", b"application/json")], "query_string": b"",
                     "server": ("127.0.0.1", server.port), "client": ("127.0.0.1", 1), "scheme": "http",
                     "http_version": "1.1", "asgi": {"version": "3.0"}}
            await server.app(scope, receive, send)

        assert server.service.loop is not None
        future = asyncio.run_coroutine_threadsafe(call_app(), server.service.loop)
        _wait(lambda: sum(n for n, _ in scheduler.depth().values()) == 1, "B queued")
        future.cancel()
        _wait(lambda: server.metric("embedrt_dropped_inputs_total", reason="cancelled") == 2, "B's rows dropped")
        gated.gate.set()
        a_thread.join(30)
        assert "result" in a, a
        assert gated.rows == 1 and not sent  # B never reached inference, nor was answered
        assert server.metric("embedrt_dropped_inputs_total", reason="draining") == 0
        assert scheduler.depth() == {lane: (0, 0) for lane in scheduler.depth()}


class SlowTokenizer(Gated):
    """A model whose tokenizing waits for ``gate`` (a 16 MB word without a cut point takes ~20 s)."""

    def tokenize_batch(self, texts: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self._model.tokenize_batch(texts, **kwargs)


def test_the_deadline_holds_while_a_request_is_tokenizing(tiny: Any) -> None:
    slow = SlowTokenizer(tiny)
    with LiveServer(create_app([slow], ServeConfig())) as server:
        name = next(iter(server.service.models))
        start = time.monotonic()
        try:
            with pytest.raises(openai.APIStatusError) as info:
                server.client(timeout=5).embeddings.create(model=name, input=["still", "tokenizing"],
                                                  extra_headers={"X-Request-Timeout": "0.5"})
            waited = time.monotonic() - start
        finally:
            slow.gate.set()
        assert info.value.status_code == 504 and _error(info.value)["code"] == "deadline_exceeded"
        assert "(0.5 s)" in _error(info.value)["message"]
        assert slow.entered.is_set() and waited < 5, waited  # answered at its deadline, not after tokenizing
        assert server.metric("embedrt_dropped_inputs_total", reason="deadline") == 2
        # the server goes on: the next request is tokenized and answered
        result = server.client().embeddings.create(model=name, input=["after", "it"])
        assert np.abs(_vectors(result) - tiny.encode(["after", "it"])).max() <= 1e-6


def test_a_client_that_hangs_up_while_its_request_is_tokenizing_is_dropped_at_once(tiny: Any) -> None:
    """A disconnect was noticed only after tokenizing ended: the server went on tokenizing for nobody."""
    slow = SlowTokenizer(tiny)
    with LiveServer(create_app([slow], ServeConfig())) as server:
        name = next(iter(server.service.models))
        try:
            body = json.dumps({"model": name, "input": ["still", "tokenizing"]}).encode()
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                assert slow.entered.wait(10)
            # dropped while the tokenizer is still held: not after it returns
            _wait(lambda: server.metric("embedrt_dropped_inputs_total", reason="disconnected") == 2, "the drop")
            assert server.metric("embedrt_requests_total", status="499") == 1
        finally:
            slow.gate.set()
        result = server.client().embeddings.create(model=name, input=["after", "it"])
        assert np.abs(_vectors(result) - tiny.encode(["after", "it"])).max() <= 1e-6


def test_a_drain_that_runs_out_of_time_answers_503(tiny: Any) -> None:
    """Requests still waiting at the drain timeout get OpenAI's shape, not a bare 500 from the host server."""
    with _gated_server(tiny, drain_timeout=1.0) as (server, gated):
        name = next(iter(server.service.models))
        client = server.client()
        a_thread, a = _in_thread(client.embeddings.create, model=name, input="stuck in inference")
        _wait(gated.entered.is_set, "the first call")
        b_thread, b = _in_thread(client.embeddings.create, model=name, input=["queued", "behind it"])
        scheduler = server.service.models[name].scheduler
        _wait(lambda: sum(n for n, _ in scheduler.depth().values()) == 1, "B queued")
        start = time.monotonic()
        server.service.begin_drain()
        for thread in (a_thread, b_thread):
            thread.join(10)
        assert time.monotonic() - start < 1.0, "answered within the drain timeout"
        for out in (a, b):
            error = out["error"]
            assert isinstance(error, openai.APIStatusError) and error.status_code == 503, out
            assert _error(error)["code"] == "draining" and "drain timeout" in _error(error)["message"]
        assert server.metric("embedrt_dropped_inputs_total", reason="draining") == 2  # B's rows never ran
        # the host server's shutdown: A's call is still running (the gate is shut), and the stop does not wait
        # for it past the drain timeout, less the margin kept for exiting (it waited 1 s more for each worker)
        server.service.stop()
        assert time.monotonic() - start < 1.4, "stopped near the drain timeout"  # was 2.0 s


def test_the_queue_holds_any_request_within_max_inputs(tiny: Any) -> None:
    """A request of --max-inputs max-length texts (LangChain sends 1,000 a time) is queued, not refused with 413."""
    import asyncio

    from embedrt.serve.scheduler import Lane, Scheduler

    length = tiny.manifest.max_seq_length
    assert Scheduler(tiny, ServeConfig(max_inputs=8)).queue_limit == 262_144
    assert Scheduler(tiny, ServeConfig(max_queue_tokens=64)).queue_limit == 64

    async def run() -> None:
        config = ServeConfig(max_inputs=2 * 262_144 // length)
        scheduler = Scheduler(tiny, config)
        try:
            assert scheduler.queue_limit == config.max_inputs * length
            ids = [np.full(length, 5, dtype=np.int32)] * config.max_inputs
            job = scheduler.submit(ids, Lane.BULK, time.monotonic() + 60)
            scheduler.cancel(job, DropReason.DEADLINE)
        finally:
            scheduler.close(1.0)

    from embedrt.serve.scheduler import DropReason

    asyncio.run(run())


def test_a_request_still_tokenizing_at_the_drain_cut_off_gets_503(tiny: Any) -> None:
    class SlowTokenizer(Gated):
        def tokenize_batch(self, texts: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
            return self._model.tokenize_batch(texts, **kwargs)

    slow = SlowTokenizer(tiny)
    with LiveServer(create_app([slow], ServeConfig(drain_timeout=1.0))) as server:
        try:
            name = next(iter(server.service.models))
            thread, out = _in_thread(server.client().embeddings.create, model=name, input=["two", "inputs"])
            _wait(slow.entered.is_set, "tokenizing")
            start = time.monotonic()
            server.service.begin_drain()
            thread.join(10)
            assert time.monotonic() - start < 1.0
            error = out["error"]
            assert isinstance(error, openai.APIStatusError) and error.status_code == 503, out
            assert _error(error)["code"] == "draining"
        finally:
            slow.gate.set()


def test_a_request_still_uploading_at_the_drain_cut_off_gets_503(tiny: Any) -> None:
    """The upload was not covered by the cut-off: uvicorn cancelled it at its own timeout instead, the client got
    a reset, the log an ERROR traceback, and the process overran --drain-timeout."""
    with LiveServer(create_app([tiny], ServeConfig(drain_timeout=1.0))) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b'Content-Length: 1000\r\n\r\n{"input": ')
            time.sleep(0.2)
            start = time.monotonic()
            server.service.begin_drain()
            answer = sock.recv(65536)
            assert time.monotonic() - start < 1.0, "answered within the drain timeout"
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"draining"' in answer, answer


def test_no_request_is_queued_after_the_drain_cut_off(tiny: Any) -> None:
    """A request still uploading or tokenizing at the cut-off gets its 503 at submit, not silence later."""
    import asyncio

    from embedrt.serve import protocol
    from embedrt.serve.scheduler import Lane, Scheduler

    async def run() -> None:
        scheduler = Scheduler(tiny, ServeConfig())
        try:
            assert scheduler.abandon(protocol.unavailable("gone", "draining")) == 0
            with pytest.raises(protocol.ApiError) as info:
                scheduler.submit(tiny.tokenize_batch(["late"]).ids, Lane.INTERACTIVE, time.monotonic() + 5)
            assert info.value.status == 503 and info.value.code == "draining"
        finally:
            scheduler.close(1.0)

    asyncio.run(run())


def test_two_exports_of_one_checkpoint_are_served_under_their_folder_names(tiny_bert: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    """An fp32 and an int8 export of one model share its catalogue name and hub id: serving both was refused
    ("two served models answer to ..."). Now a shared name goes to the folder that bears it, else to none."""
    import shutil

    from embedrt.serve.app import served_names

    folders = []
    for name in ("tiny", "tiny-int8"):  # as `embedrt export` names them, from a catalogue model
        folder = shutil.copytree(tiny_bert[1], tmp_path / name)
        manifest = json.loads((folder / "embedrt.json").read_text())
        manifest["source"] = {**manifest["source"], "id": "org/tiny", "catalogue": "tiny"}
        (folder / "embedrt.json").write_text(json.dumps(manifest))
        folders.append(folder)
    with LiveServer(create_app(folders, ServeConfig(), threads=1)) as server:
        assert sorted(server.service.models) == ["tiny", "tiny-int8"]
        models = {m["id"]: m for m in json.loads(server.request("GET", "/v1/models")[2])["data"]}
        assert models["tiny"]["aliases"] == ["tiny"] and models["tiny-int8"]["aliases"] == ["tiny-int8"]
        for name in ("tiny", "tiny-int8"):
            assert server.client().embeddings.create(model=name, input="a").model == name
        status, _, _ = server.request("POST", "/v1/embeddings", {"model": "org/tiny", "input": "a"})
        assert status == 404  # which of the two it meant is not known

    def model(folder: str, catalogue: str | None, hub_id: str) -> Any:
        return SimpleNamespace(path=f"/m/{folder}", manifest=SimpleNamespace(source={"id": hub_id,
                                                                                      "catalogue": catalogue}))

    # one model: its catalogue name is its name, and it answers to all three
    assert served_names([model("x", "cat", "org/cat")]) == [("cat", {"cat", "x", "org/cat"})]
    # a catalogue name that is another folder's name stays that folder's; a local path is no name
    got = served_names([model("cat", None, "/home/u/ckpt"), model("y", "cat", "org/cat")])
    assert got == [("cat", {"cat"}), ("y", {"y", "org/cat"})]
    here = SimpleNamespace(path=".", manifest=SimpleNamespace(source={}))  # `embedrt serve .`: was named ""
    assert served_names([here]) == [(Path.cwd().name, {Path.cwd().name})]
    with pytest.raises(ValueError, match="two served model folders are named m; a folder's name is how"):
        served_names([model("m", "a", "org/a"), SimpleNamespace(path="/other/m", manifest=SimpleNamespace(source={}))])


def test_api_keys_and_open_probes(tiny: Any) -> None:
    with LiveServer(create_app([tiny], ServeConfig(api_keys=("key-one", "key-two")))) as server:
        name = next(iter(server.service.models))
        for key in ("key-one", "key-two"):
            assert server.client(key).embeddings.create(model=name, input="a").data
        with pytest.raises(openai.AuthenticationError) as info:
            server.client("key-three").embeddings.create(model=name, input="a")
        assert _error(info.value)["code"] == "invalid_api_key"
        status, headers, _ = server.request("POST", "/v1/embeddings", {"model": name, "input": "a"})
        assert status == 401 and headers.get("www-authenticate") == "Bearer", headers  # RFC 9110 requires it
        assert server.request("GET", "/metrics")[0] == 401
        assert server.request("GET", "/metrics", headers={"Authorization": "Bearer key-two"})[0] == 200
        assert server.request("GET", "/health")[0] == 200
        assert server.request("GET", "/ready")[0] == 200
        # draining: /ready false, new work refused with 503
        server.service.begin_drain()
        status, _, body = server.request("GET", "/ready")
        assert status == 503 and json.loads(body)["status"] == "draining"
        with pytest.raises(openai.APIStatusError) as info:
            server.client("key-one").embeddings.create(model=name, input="a")
        assert info.value.status_code == 503 and _error(info.value)["code"] == "draining"


def test_sigterm_drain_answers_every_accepted_request(tiny_bert: tuple[Path, Path]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedrt.cli", "serve", str(tiny_bert[1]), "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.1)
        name = json.loads(_get(base + "/v1/models"))["data"][0]["id"]
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        texts = [f"passage {i}: " + "some words of text " * 20 for i in range(400)]
        threads = [_in_thread(client.embeddings.create, model=name, input=texts) for _ in range(6)]
        end = time.monotonic() + 10
        while time.monotonic() < end:  # SIGTERM once work is queued
            queued = [line for line in _get(base + "/metrics").splitlines()
                      if line.startswith("embedrt_queue_tokens") and not line.endswith(" 0.0")]
            if queued:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        results = []
        for thread, out in threads:
            thread.join(60)
            results.append(out)
        # uvicorn re-raises the signal it caught once the drain is over, so the exit is "killed by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "draining" in err and "Application shutdown complete" in err, err
        for out in results:
            # every request the server accepted is answered in full; one that raced the signal was refused:
            # never reached it (a connection error), or reached it draining (503 "shutting down", before it
            # was queued); never another 5xx, a cut-off answer or a lost one
            if "result" in out:
                assert len(out["result"].data) == len(texts)
            elif isinstance(out["error"], openai.APIStatusError):
                assert out["error"].status_code == 503, out
                assert _error(out["error"])["message"] == "The server is shutting down.", out
            else:
                assert isinstance(out["error"], openai.APIConnectionError), out
        assert queued, "the signal came before any work was queued: the drain was not exercised"
        assert sum("result" in out for out in results) >= 1
        # the access log (buffered, on stdout) has a line for every answered request, the last ones
        # written at exit: uvicorn's logging set-up must not have closed its handler
        lines = [json.loads(x) for x in (proc.stdout.read().decode() if proc.stdout else "").splitlines()
                 if x.startswith("{")]
        posts = [x for x in lines if x["path"] == "/v1/embeddings" and x["status"] == 200]
        assert len(posts) == sum("result" in out for out in results), lines
        assert all(x["inputs"] == len(texts) for x in posts)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_import_embedrt_stays_light() -> None:
    code = ("import sys, embedrt, embedrt.serve; "
            "bad = [m for m in ('starlette', 'uvicorn', 'prometheus_client', 'openai') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_tokenize_ids_adds_special_tokens_like_the_tokenizer(tiny: Any) -> None:
    text = "the quick brown fox " * 200  # 800 tokens: over any max_seq_length
    content = tiny.tokenize(["the quick brown fox"])[0][1:-1] * 200
    from_ids = tiny.tokenize_ids([content])
    from_text = tiny.tokenize_batch([text])
    assert np.array_equal(from_ids.ids[0], from_text.ids[0])
    assert bool(from_ids.truncated[0]) and bool(from_text.truncated[0])
    assert np.array_equal(tiny.tokenize_ids([[]]).ids[0], tiny.tokenize_batch([""]).ids[0])
    with pytest.raises(ValueError, match=r"token ids \[0\] is empty"):  # ids as the model runs them: never empty
        tiny.encode_tokens([[]])


def test_access_log_one_line_per_request_with_its_id(live: LiveServer) -> None:
    import io
    import logging

    from embedrt.serve.accesslog import buffered_handler

    stream = io.StringIO()
    handler = buffered_handler(stream, interval=0.05)
    access = logging.getLogger("embedrt.serve.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        ids = []
        for i, body in enumerate([{"model": _tiny_name(live), "input": "one"},
                                  {"model": _tiny_name(live), "input": ["two", "three"]},
                                  {"model": "no-such-model", "input": "x"}]):
            _, headers, _ = live.request("POST", "/v1/embeddings", body,
                                              headers={"X-Request-Id": f"req-{i}"} if i == 1 else None)
            ids.append({k.lower(): v for k, v in headers.items()}["x-request-id"])
        _, headers, _ = live.request("GET", "/v1/models")
        ids.append({k.lower(): v for k, v in headers.items()}["x-request-id"])
        end = time.monotonic() + 5
        while stream.getvalue().count("\n") < 4 and time.monotonic() < end:
            time.sleep(0.02)  # the handler writes what gathered every 0.05 s
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
        handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["id"] for line in lines] == ids  # one line per request, in order
    assert ids[1] == "req-1" and len(set(ids)) == 4
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/v1/embeddings", 200), ("/v1/embeddings", 200), ("/v1/embeddings", 404), ("/v1/models", 200)]
    assert lines[1]["inputs"] == 2 and lines[1]["tokens"] > 0 and lines[2]["error"] == "model_not_found"


def test_buffered_access_log_flushes_on_close() -> None:
    import io
    import logging

    from embedrt.serve.accesslog import buffered_handler

    stream = io.StringIO()
    handler = buffered_handler(stream, interval=3600)
    logger = logging.getLogger("embedrt.test.buffered")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.info('{"n": %d}', i)
        assert stream.getvalue() == ""  # buffered, not one write per line
        logger.warning("urgent")  # a warning flushes at once
        assert stream.getvalue().splitlines() == [f'{{"n": {i}}}' for i in range(5)] + ["urgent"]
        logger.info("last")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert stream.getvalue().splitlines()[-1] == "last"


def test_embeddings_route_below_a_mount_point() -> None:
    from embedrt.serve.app import _route_path

    assert _route_path({"path": "/v1/embeddings"}) == "/v1/embeddings"
    assert _route_path({"path": "/api/v1/embeddings", "root_path": "/api"}) == "/v1/embeddings"
    assert _route_path({"path": "/apiv1/embeddings", "root_path": "/api"}) == "/apiv1/embeddings"
    assert _route_path({"path": "/v1/embeddings", "root_path": "/v1/embeddings"}) == "/v1/embeddings"


def test_bulk_lane_on_a_second_instance(tiny_bert: tuple[Path, Path]) -> None:
    from embedrt.serve.scheduler import Lane

    with pytest.raises(ValueError, match="bulk_instance"):
        ServeConfig(bulk_instance="both")
    folder = tiny_bert[1]
    config = ServeConfig(bulk_instance="separate", interactive_max_inputs=2)
    with LiveServer(create_app([folder], config, device="openvino", threads=1)) as server:
        served = next(iter(server.service.models.values()))
        models = served.scheduler._models
        assert models[Lane.BULK] is not models[Lane.INTERACTIVE]
        assert models[Lane.BULK].device == models[Lane.INTERACTIVE].device == served.model.device
        texts = [f"passage number {i} " * (1 + i % 7) for i in range(12)]
        bulk = server.client().embeddings.create(model=served.name, input=texts, encoding_format="float")
        one = server.client().embeddings.create(model=served.name, input=texts[:1], encoding_format="float")
        expected = served.model.encode(texts)
        assert np.abs(_vectors(bulk) - expected).max() <= 1e-6
        assert np.abs(_vectors(one) - expected[:1]).max() <= 1e-6
        assert server.metric("embedrt_batch_inputs_count", lane="bulk") >= 1
        assert server.metric("embedrt_batch_inputs_count", lane="interactive") >= 1
    # auto: a second instance on OpenVINO only
    cpu = create_app([folder], ServeConfig(), device="cpu", threads=1).state.service
    assert cpu._bulk_instance(embedrt.load(folder, device="cpu", threads=1)) is None


def test_the_bulk_instance_is_loaded_as_the_model_was(tiny_bert: tuple[Path, Path]) -> None:
    """``--no-spin`` (``spinning=False``) reaches both lanes' sessions; ONNX Runtime's default spins. The CLI
    loads the models itself and hands them over, as here."""
    from embedrt.serve.scheduler import Lane

    config = ServeConfig(bulk_instance="separate")
    for options, expected in (({}, True), ({"spinning": False}, False)):
        model = embedrt.load(tiny_bert[1], device="cpu", threads=1, **options)
        with LiveServer(create_app([model], config)) as server:
            models = next(iter(server.service.models.values())).scheduler._models
            assert models[Lane.BULK] is not models[Lane.INTERACTIVE]
            assert models[Lane.INTERACTIVE].plan.spinning is expected and models[Lane.BULK].plan.spinning is expected
    # OpenVINO's settings too: the CLI hands over loaded models, and the bulk instance took the latency hint
    # and no cache whatever the first was loaded with
    cache = tiny_bert[1].parent / "ov-cache-bulk"
    model = embedrt.load(tiny_bert[1], device="openvino", threads=1, performance_hint="throughput",
                         openvino_cache_dir=str(cache))
    with LiveServer(create_app([model], config)) as server:
        bulk = next(iter(server.service.models.values())).scheduler._models[Lane.BULK]
        assert bulk is not model and bulk.plan.openvino_config == model.plan.openvino_config
        assert bulk.plan.openvino_config["PERFORMANCE_HINT"] == "THROUGHPUT"
        assert bulk.plan.openvino_cache_dir == str(cache)
    # device="auto" with both backends' settings: the first load uses its backend's and reports the others
    # unused; the second instance, on that device explicitly, must not be refused for them
    for device in ("cpu", "openvino"):
        with mock.patch("embedrt.plan._cpu_side_lead", return_value=device), LiveServer(create_app(
                [tiny_bert[1]], config, device="auto:cpu", threads=1, spinning=False,
                performance_hint="throughput")) as server:
            models = next(iter(server.service.models.values())).scheduler._models
            assert models[Lane.BULK].device == models[Lane.INTERACTIVE].device
            assert models[Lane.BULK].device.startswith(device)


def test_a_large_float_response_does_not_hold_the_gil_for_long() -> None:
    """One json.dumps of 2,048 x 384 floats held the GIL ~1 s: the event loop (every client) stalled behind it,
    though it ran in an edge thread. Row by row, the loop gets the GIL back within the switch interval."""
    from benchmarks.parse_stall import measure
    from embedrt.serve.protocol import embeddings_body

    emb = np.random.default_rng(0).standard_normal((2048, 384)).astype(np.float32)
    worst = measure(lambda _: embeddings_body(emb, "m", "float", 1), b"")["longest_hold_ms"] / 1000
    assert worst < 0.4, f"the serializing thread held the GIL for {worst:.2f} s at once"  # old: 0.85-1.2 s


def test_a_large_token_id_request_does_not_hold_the_gil_for_long() -> None:
    """One json.loads of 2,048 x 1,024 token ids held the GIL ~0.45 s (one C call), so the event loop waited
    behind an edge thread's parse. Now it is decoded a piece at a time, to json.loads' own result."""
    from benchmarks.parse_stall import measure
    from embedrt.serve.protocol import parse_embedding_request

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 30000, (2048, 1024)).tolist()  # 13 MiB: rows past max_seq_length are cut, not refused
    for ids in (rows, rows[0] * 2048):  # 2,048 inputs; one input of 2M ids
        body = json.dumps({"model": "m", "input": ids}).encode()
        got: list[Any] = []
        held = measure(lambda body, got=got: got.append(parse_embedding_request(body, 2048)), body)
        assert got and got[0].token_ids == (ids if isinstance(ids[0], list) else [ids])
        worst = held["longest_hold_ms"] / 1000
        assert worst < 0.15, f"the parsing thread held the GIL for {worst:.2f} s at once"  # old: 0.45-0.6 s


def test_a_large_body_of_short_strings_ending_in_a_backslash_is_not_refused() -> None:
    """A short string ending in an escaped backslash ("C:\\\\") was taken for an unclosed one where its
    next quote was far off, decoded alone and counted as a long string: a body json.loads takes, and a
    valid request, got a 413 "more than 5120 nested lists, objects and long strings"."""
    from embedrt.serve.protocol import parse_embedding_request

    tags = "[" + ",".join(['"C:\\\\"' + " " * 260] * 5200) + "]"  # 1.4 MB
    body = ('{"model":"m","input":"hello","tags":' + tags + "}").encode()
    assert len(json.loads(body)["tags"]) == 5200
    assert parse_embedding_request(body, 2048).texts == ["hello"]


def test_a_run_of_numbers_never_ends_after_a_comma() -> None:
    """A run of scalars that ended in a comma (",," in a broken body) was decoded as "[1,]": json on Python
    3.13 calls that a trailing comma, where json.loads of the whole body names the missing value after it."""
    from embedrt.serve import protocol

    assert protocol._scalars_end('1,,"a"]', 0) == 1  # "1", not "1,"
    assert protocol._scalars_end('1, ,\n,"a"]', 0) == 1
    assert protocol._scalars_end('1,2,"a"]', 0) == 3
    body = ('[1,,"a"]' + " " * protocol.PIECEWISE_FROM).encode()
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(body)
    with pytest.raises(json.JSONDecodeError) as got:
        protocol.loads(body)
    assert (got.value.msg, got.value.pos) == (want.value.msg, want.value.pos)


def test_a_hostile_large_body_does_not_hold_the_gil_for_long() -> None:
    """A large body the pieces could not take (many keys, objects, malformed) went to one json.loads of the
    whole body: 16 MiB of keys held the GIL for ~3 s. Now any body is decoded in pieces, its error still
    json.loads' own, and a list of millions of tiny inputs is refused (413) once past the limit."""
    from benchmarks.parse_stall import measure
    from embedrt.serve.protocol import ApiError, parse_embedding_request

    keys = "{" + ",".join(f'"k{i}":{i}' for i in range(900_000)) + ',"model":"m","input":"a"}'  # 14 MiB
    cases = {"keys": keys.encode(), "keys, malformed": keys[:-1].encode() + b"]",
             "objects in a list": ('{"model":"m","input":"a","x":[' + ",".join(['{"a":1}'] * 1_500_000)
                                   + "]}").encode(),
             "tiny inputs, then junk": ('{"model":"m","input":[' + ",".join(['""'] * 3_000_000) + "]] junk").encode(),
             # decoded an item at a time, 10x json.loads' time: refused once past what a request can hold
             "nested items": ('{"model":"m","input":"a","x":[' + ",".join(['[["a"]]'] * 1_500_000) + "]}").encode(),
             # raw lone surrogates, which json decodes through "surrogatepass" (~120 ns a character): one decode
             # of the whole body held the GIL for ~0.7 s at 4 MiB
             "raw lone surrogates": b'{"model":"m","input":"' + b"\xed\xa0\x80" * 1_400_000 + b'"}'}
    for name, body in cases.items():
        outcome: list[Any] = []

        def parse(body: bytes, outcome: list[Any] = outcome) -> None:
            try:
                outcome.append(parse_embedding_request(body, 2048))
            except ApiError as exc:
                outcome.append(exc)

        worst = measure(parse, body)["longest_hold_ms"] / 1000
        assert worst < 0.3, f"{name}: the parsing thread held the GIL for {worst:.2f} s at once"  # old: 1.3-2.8 s
        got = outcome[0]
        if name == "keys, malformed":
            with pytest.raises(json.JSONDecodeError) as want:
                json.loads(body)
            assert isinstance(got, ApiError) and got.status == 400 and got.message.endswith(str(want.value))
        elif name == "tiny inputs, then junk":  # refused before the junk is reached
            assert isinstance(got, ApiError) and got.status == 413 and "more than 2048 inputs" in got.message
        elif name == "nested items":
            assert isinstance(got, ApiError) and got.status == 413 and "nested lists, objects" in got.message
        elif name == "raw lone surrogates":
            assert got.texts == [json.loads(body)["input"]]
        else:
            assert got.texts == ["a"], name


def test_a_wrong_method_is_405_with_allow(live: LiveServer) -> None:
    status, headers, body = live.request("GET", "/v1/embeddings")
    assert status == 405 and headers.get("allow") == "POST", headers  # RFC 9110: a 405 names what is allowed
    error = json.loads(body)["error"]
    assert error["code"] == "method_not_allowed" and "/v1/embeddings does not take GET" in error["message"]
    status, headers, body = live.request("GET", "/v1/no-such-route")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    # a slash added: a 404 in OpenAI's shape (was a 307 with no body, which clients do not follow for a POST)
    status, headers, body = live.request("POST", "/v1/embeddings/", {"model": "m", "input": "a"},
                                         headers={"X-Request-Id": "mine-1"})
    assert status == 404 and json.loads(body)["error"]["message"] == "No route POST /v1/embeddings/."
    assert headers.get("x-request-id") == "mine-1", headers  # echoed by the router's answers too
    status, headers, _ = live.request("PUT", "/health")
    assert status == 405 and len(headers.get("x-request-id", "")) == 16, headers  # one made up: 8 + 8 hex digits
