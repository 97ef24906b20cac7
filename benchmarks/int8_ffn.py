"""What the default int8 (FFN down-projections in fp32) costs next to all-int8, side by side in one process.

``python -m benchmarks.int8_ffn [--model distilbert-base]``: OpenVINO NNCF static int8 both ways, the same
workloads as ``benchmarks.run`` (64 passages and 256 queries at batch 32, then 64 single queries), a warm-up,
then 3 rounds with the order of the two models rotated; the median round is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Export (once, cached) and time both recipes; print and write the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="distilbert-base", choices=["distilbert-base", "all-MiniLM-L6-v2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the record here (default: results/int8-ffn32-vs-allint8-<model>-<date>.json)")
    args = p.parse_args(argv)
    from benchmarks import systems, workloads
    from embedrt import load
    from embedrt.cpu import cpu_name
    from embedrt.export.artifacts import EXPORTER

    folders = systems.prepare(args.model, {"quantize": "dynamic"})
    all_int8 = systems.ensure_export(folders["checkpoint"], folders["ov-int8"].parent / "ov-int8-static-allint8",
                                     formats="openvino", quantize="static", keep_ffn_output_fp32=False,
                                     min_agreement=0.0)
    loads = {w.name: w for w in workloads.build(n_queries=256, n_passages=64)}
    passages, queries = list(loads["passages"].texts), list(loads["queries"].texts)
    models = {name: load(folder, device="openvino", threads=args.threads)
              for name, folder in (("default (FFN fp32)", folders["ov-int8"]), ("all int8", all_int8))}
    for model in models.values():  # warm-up: shapes, thread pools
        model.encode(passages[:8])
        model.encode(queries[:64])
    rounds: dict[str, list[float]] = {}
    for turn in range(3):
        for name in (list(models) if turn % 2 == 0 else list(models)[::-1]):
            model = models[name]
            for kind, texts in (("passages", passages), ("queries", queries)):
                start = time.perf_counter()
                model.encode(texts, batch_size=32)
                rounds.setdefault(f"{name}: {kind}/s", []).append(len(texts) / (time.perf_counter() - start))
            latencies = []
            for query in queries[:64]:
                start = time.perf_counter()
                model.encode([query])
                latencies.append(1000 * (time.perf_counter() - start))
            rounds.setdefault(f"{name}: single p50 ms", []).append(sorted(latencies)[len(latencies) // 2])
    median = {key: round(sorted(values)[1], 2) for key, values in rounds.items()}
    record: dict[str, Any] = {"cpu": cpu_name(), "threads": args.threads, "model": args.model, "exporter": EXPORTER,
                              "median_of_3_rotated": median, "rounds": rounds}
    print(json.dumps(median, indent=1))
    default = RESULTS / f"int8-ffn32-vs-allint8-{args.model}-{time.strftime('%Y-%m-%d')}.json"
    out = Path(args.json) if args.json else default
    out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
