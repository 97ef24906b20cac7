"""How far ``--precision auto``'s timing can be trusted: its own texts next to real passages, side by side.

``python -m benchmarks.auto_noise [--model all-MiniLM-L6-v2] [--corpus ../shared/data/scifact]``: the fp32
folder on ONNX Runtime and OpenVINO and ONNX Runtime's static and dynamic int8, all loaded in one process; a
warm-up, then ``--rounds`` rounds with the order of the systems rotated, each timing auto's 32 timing passages
(``embedrt.export.auto.timing_texts``) and the first ``--n`` passages of a BEIR corpus (title + text, as
``embedrt eval`` embeds them) at batch 32. Records passages/s per round, the median, each system's ratio to
fp32 on ONNX Runtime per text set, and the spread between rounds: what :func:`embedrt.export.auto.choose`'s
10% allowances are set against. Without ``--corpus`` (the evaluation data is not shipped), only auto's texts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Export (once, cached) and time every system on both text sets; print and write the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="all-MiniLM-L6-v2", choices=["all-MiniLM-L6-v2", "distilbert-base"])
    p.add_argument("--corpus", type=Path, help="a BEIR folder (e.g. ../shared/data/scifact)")
    p.add_argument("--n", type=int, default=256, help="corpus passages to time (default: 256)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the record here (default: results/auto-noise-<model>-<date>.json)")
    args = p.parse_args(argv)
    from benchmarks import systems
    from benchmarks.run import _machine, _versions
    from embedrt import load
    from embedrt.export.auto import timing_texts
    from embedrt.textio import read_records

    folders = systems.prepare(args.model, {"quantize": "dynamic"}, ort_static=True)
    systems_ = {"fp32 onnxruntime": (folders["fp32"], "cpu"), "fp32 openvino": (folders["fp32"], "openvino"),
                "int8-ort-static": (folders["ort-int8-static"], "cpu"),
                "int8-ort-dynamic": (folders["int8"], "cpu")}
    models = {name: load(folder, device=device, threads=args.threads) for name, (folder, device) in systems_.items()}
    passages, _ = timing_texts()
    sets = {"auto timing texts": passages}
    if args.corpus:
        # the passages as embedrt eval embeds them (title joined in front)
        sets[f"{args.corpus.name} first {args.n}"] = read_records(args.corpus / "corpus.jsonl")[1][: args.n]
    tokens = next(iter(models.values()))
    lengths = {name: [int(x) for x in tokens.tokenize_batch(texts).lengths] for name, texts in sets.items()}
    for model in models.values():  # warm-up: shapes, thread pools
        model.encode(passages[:8], batch_size=8)
    rounds: dict[str, dict[str, list[float]]] = {name: {s: [] for s in sets} for name in models}
    names = list(models)
    for turn in range(args.rounds):
        for name in names[turn % len(names):] + names[: turn % len(names)]:
            for set_name, texts in sets.items():
                start = time.perf_counter()
                models[name].encode(texts, batch_size=32)
                rounds[name][set_name].append(len(texts) / (time.perf_counter() - start))
    median = {name: {s: round(statistics.median(v), 2) for s, v in per.items()} for name, per in rounds.items()}
    ratio = {s: {name: round(median[name][s] / median["fp32 onnxruntime"][s], 3) for name in names} for s in sets}
    spread = {name: {s: round(max(v) / min(v) - 1, 3) for s, v in per.items()} for name, per in rounds.items()}
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.auto_noise " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(args.threads), "versions": _versions(), "model": args.model,
        "devices": {name: models[name].device for name in names},
        "text_sets": {s: {"texts": len(v), "mean_tokens": round(statistics.mean(v), 1), "max_tokens": max(v)}
                      for s, v in lengths.items()},
        "median_passages_per_s": median, "vs_fp32_onnxruntime": ratio, "round_spread": spread, "rounds": rounds,
    }
    print(json.dumps({"vs_fp32_onnxruntime": ratio, "round_spread": spread}, indent=1))
    out = Path(args.json) if args.json else RESULTS / f"auto-noise-{args.model}-{record['date']}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
