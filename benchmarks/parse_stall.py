"""How long parsing a request body holds the GIL: ``python -m benchmarks.parse_stall``.

The server parses a large body in an edge thread, but the event loop (every other client) needs the GIL
meanwhile. For each body, ``json.loads``, the server's ``embedrt.serve.protocol.loads`` and the server's whole parse
(``parse_embedding_request`` at the default 2,048 inputs, which refuses a list past that as soon as it is
seen) side by side: the time to parse, and the longest gap a thread that wakes every millisecond saw while
the parse ran (the GIL held at once). Bodies up to 16 MiB, the server's default limit: typical ones (token
ids, passages, one long text) and hostile ones (millions of tiny items, objects, keys). Printed as JSON,
milliseconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedrt.serve.protocol import ApiError, loads, parse_embedding_request

LIMIT = 16 * 2**20


def _filled(item: str) -> bytes:
    head, tail = '{"model":"m","input":[', "]}"
    count = (LIMIT - len(head) - len(tail)) // (len(item) + 1)
    return (head + ",".join([item] * count) + tail).encode()


def bodies() -> dict[str, bytes]:
    """The bodies, by name."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(2048, 1024))
    passages = ["some words, here and there " * 240] * 2048  # 6.5 KB each, commas inside
    return {
        "token ids 2048 x 1024": json.dumps({"model": "m", "input": ids.tolist()}).encode(),
        "token ids 1 x 2M": json.dumps({"model": "m", "input": ids.reshape(-1).tolist()}).encode(),
        "passages 2048 x 6 KB": json.dumps({"model": "m", "input": passages}).encode(),
        "one 14 MiB text": json.dumps({"model": "m", "input": "word " * 3_000_000}).encode(),
        "hostile: empty strings": _filled('""'),
        "hostile: rows of one id": _filled("[1]"),
        "hostile: empty objects": _filled("{}"),
        "hostile: 1.5M keys": ("{" + ",".join(f'"k{i}":1' for i in range(1_500_000)) + "}").encode(),
        # numbers longer than the pieces' window (json takes any length of float)
        "hostile: 70k-digit numbers": _filled("1." + "0" * 70_000),
        # raw lone surrogates (bytes ED A0 80), which json.loads(bytes) decodes through "surrogatepass"
        "hostile: raw lone surrogates": b'{"model":"m","input":"' + b"\xed\xa0\x80" * (LIMIT // 3 - 10) + b'"}',
    }


def measure(parse: Callable[[bytes], Any], body: bytes) -> dict[str, float]:
    """Parse time and the longest GIL hold seen by a thread ticking every millisecond, in ms (the server's
    tests measure their other edge-thread work, e.g. writing a response, with it too)."""
    done = threading.Event()
    worst = 0.0
    took: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        parse(body)
        took.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=run)
    last = time.perf_counter()
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    worker.join()
    return {"parse_ms": round(1000 * took[0], 1), "longest_hold_ms": round(1000 * worst, 1)}


def _request(body: bytes) -> str:
    """The server's parse of a body: what it answers (the parsed request, or the error's status)."""
    try:
        parse_embedding_request(body, 2048)
        return "parsed"
    except ApiError as exc:
        return str(exc.status)


def main() -> None:
    results = {}
    for name, body in bodies().items():
        assert loads(body) == json.loads(body), name
        results[name] = {"MiB": round(len(body) / 2**20, 1), "json.loads": measure(json.loads, body),
                         "protocol.loads": measure(loads, body),
                         f"server ({_request(body)})": measure(_request, body)}
        print(json.dumps({name: results[name]}), flush=True)


if __name__ == "__main__":
    main()
