"""Several callers on one model: ``python -m benchmarks.concurrency MODEL_DIR [--device openvino]``.

One model, N threads each encoding single queries (the server's case), texts/s for N = 1, 2, 4, 8, under
OpenVINO's latency and throughput hints. The control row is one raw OpenVINO infer request used by one
thread (what embedrt did before its request pool), so the pool's cost single-threaded is a ratio in the
same run. Every threaded result is compared bit for bit with the single-threaded one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _queries(n: int) -> list[str]:
    from benchmarks import workloads

    queries = next(w for w in workloads.build() if w.name == "queries").texts
    return [queries[i % len(queries)] + ("" if i < len(queries) else f" ({i})") for i in range(n)]


def _threaded(model: Any, texts: list[str], callers: int) -> tuple[float, list[np.ndarray]]:
    out: list[np.ndarray] = [np.empty(0)] * len(texts)
    barrier = threading.Barrier(callers + 1)

    def work(k: int) -> None:
        barrier.wait()
        for i in range(k, len(texts), callers):
            out[i] = model.encode([texts[i]])[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return len(texts) / (time.perf_counter() - start), out


def _raw_request(model: Any, folder: Path, texts: list[str]) -> float:
    """One OpenVINO infer request, no pool: the pre-pool path, re-created here from the model's public plan."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(folder / "openvino_model.xml"), model.plan.request.openvino_device,
                                  dict(model.plan.openvino_config))
    request = compiled.create_infer_request()
    start = time.perf_counter()
    for text in texts:  # tokenized in the loop, as encode does
        row = model.tokenize([text])[0]
        # the same shape buckets as embedrt's OpenVINO backend, so only the pool differs
        pad = int(model.padded_lengths(np.array([len(row)]))[0])
        feeds = {"input_ids": np.full((1, pad), model.manifest.pad_token_id, dtype=np.int64),
                 "attention_mask": np.zeros((1, pad), dtype=np.int64)}
        feeds["input_ids"][0, : len(row)] = row
        feeds["attention_mask"][0, : len(row)] = 1
        if "token_type_ids" in model.manifest.inputs:
            feeds["token_type_ids"] = np.zeros((1, pad), dtype=np.int64)
        request.infer(feeds)
    return len(texts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Print one JSON record; exit 1 if any threaded result differs from the single-threaded one."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--device", default="openvino")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the model")
    p.add_argument("--texts", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    import embedrt

    texts = _queries(args.texts)
    record: dict[str, Any] = {"model": args.model, "device": args.device, "texts": len(texts), "rows": []}
    mismatches = 0
    for hint in ("latency", "throughput"):
        model = embedrt.load(args.model, device=args.device, threads=args.threads, performance_hint=hint)
        want = model.encode(texts, batch_size=1)
        rates: dict[str, list[float]] = {}
        for _ in range(args.reps):  # rotate the rows so that drift hits each alike
            if args.device.startswith("openvino"):
                rates.setdefault("raw request, 1 caller", []).append(
                    _raw_request(model, Path(args.model), texts))
            for callers in (1, 2, 4, 8):
                rate, got = _threaded(model, texts, callers)
                mismatches += sum(not np.array_equal(g, w) for g, w in zip(got, want, strict=True))
                rates.setdefault(f"{callers} caller{'s' * (callers > 1)}", []).append(rate)
        base = statistics.median(rates["1 caller"])
        for name, values in rates.items():
            record["rows"].append({"hint": hint, "row": name, "texts_per_s": round(statistics.median(values), 1),
                                   "vs_1_caller": round(statistics.median(values) / base, 3)})
    record["mismatched_rows"] = mismatches
    print(json.dumps(record, indent=1))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
