"""Run the benchmark suite: ``python -m benchmarks.run`` (or ``make bench``).

Protocol: fixed workloads, one warm-up pass per system, then ``--reps`` repetitions with the systems
alternating, the same thread budget everywhere; median and p95; quality (cosine to sentence-transformers)
next to every speed figure; this machine's matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peak, systems, workloads

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES: dict[str, dict[str, Any]] = {
    # the product's defaults (FFN down-projections fp32 since 2026-11-23c; results before that date used the
    # all-int8 recipes, now "dynamic-allint8" and "static-allint8")
    "dynamic": {"quantize": "dynamic"},
    "dynamic-allint8": {"quantize": "dynamic", "keep_ffn_output_fp32": False},
    "static": {"quantize": "static"},
    "static-allint8": {"quantize": "static", "keep_ffn_output_fp32": False},
}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def flops_per_text(config: dict[str, Any], tokens: int) -> float:
    """Useful FLOPs of one encoder pass over ``tokens`` real tokens (linear layers + attention matmuls)."""
    hidden = config.get("hidden_size") or config["dim"]
    ffn = config.get("intermediate_size") or config["hidden_dim"]
    layers = config.get("num_hidden_layers") or config["n_layers"]
    linear = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 4 * tokens * tokens * hidden
    return float(layers * (linear + attention))


def _machine(threads: int) -> dict[str, Any]:
    from embedrt.cpu import cpu_flags, cpu_name, detect_target

    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores_visible": os.cpu_count(), "threads": threads, "int8_target": detect_target(),
            "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "asimd"))),
            "python": platform.python_version(), "platform": platform.platform()}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("embedrt", "torch", "sentence-transformers", "transformers", "onnxruntime", "openvino", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _build_systems(model: str, args: argparse.Namespace) -> tuple[list[systems.System], dict[str, Path]]:
    folders = systems.prepare(model, RECIPES[args.int8_recipe])
    threads = args.threads
    built = [systems.st_torch(folders["checkpoint"], threads)]
    if "st-onnx" in args.systems:
        onnx_system = systems.st_onnx(folders["checkpoint"], threads)
        if onnx_system:
            built.append(onnx_system)
    plan = [("embedrt-fp32", "fp32", "cpu"), ("embedrt-fp32-fixed32", "fp32", "cpu"),
            (f"embedrt-int8-{args.int8_recipe}", "int8", "cpu"),
            ("embedrt-openvino-fp32", "fp32", "openvino"), ("embedrt-openvino-int8", "ov-int8", "openvino")]
    for name, key, device in plan:
        if name in args.systems or (name.startswith("embedrt-int8-") and "embedrt-int8" in args.systems):
            built.append(systems.embedrt_system(name, folders[key], device, threads, name.endswith("fixed32")))
    return built, folders


def run_model(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every workload x system for one model; returns result rows."""
    import embedrt
    from embedrt.ops import row_cosine

    built, folders = _build_systems(model, args)
    config = json.loads((folders["checkpoint"] / "config.json").read_text())
    tokenizer = embedrt.load(folders["fp32"])
    rows = []
    ndcg = scifact_quality(model, built) if args.ndcg else {}
    for wl in workloads.build(n_passages=args.passages):
        texts = list(wl.texts)
        lengths = [len(t) for t in tokenizer.tokenize(texts)]
        useful = sum(flops_per_text(config, n) for n in lengths)
        reference = built[0].encode(texts, wl.batch_size)
        times: dict[str, list[float]] = {s.name: [] for s in built}
        quality: dict[str, dict[str, float]] = {}
        for system in built:  # warm-up, and the quality figure
            got = system.encode(texts, wl.batch_size)
            cos = row_cosine(got, reference)
            quality[system.name] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        for _ in range(args.reps):
            for system in built:  # alternate systems within each repetition
                if wl.single:
                    for text in texts:
                        start = time.perf_counter()
                        system.encode([text], 1)
                        times[system.name].append(time.perf_counter() - start)
                else:
                    start = time.perf_counter()
                    system.encode(texts, wl.batch_size)
                    times[system.name].append(time.perf_counter() - start)
        base = statistics.median(times[built[0].name])
        for system in built:
            t = times[system.name]
            med = statistics.median(t)
            row = {"model": model, "workload": wl.name, "system": system.name, "provider": system.provider,
                   "precision": system.precision, "texts": len(texts), "batch_size": wl.batch_size,
                   "tokens_mean": float(np.mean(lengths)), "tokens_max": int(max(lengths)),
                   "median_s": med, "p95_s": _percentile(t, 95), "speedup_vs_torch": base / med,
                   "size_bytes": system.size_bytes, **quality[system.name]}
            if wl.single:
                row.update(latency_p50_ms=1000 * med, latency_p95_ms=1000 * _percentile(t, 95))
            else:
                row.update(texts_per_s=len(texts) / med, gflops=useful / med / 1e9)
            if system.name in ndcg:
                row["scifact_ndcg10"] = ndcg[system.name]
            rows.append(row)
            logging.info("%s %s %s: %.3fs (x%.2f) cos %.5f", model, wl.name, system.name, med, base / med,
                         quality[system.name]["cos_mean"])
    return rows


def scifact_quality(model: str, built: list[systems.System]) -> dict[str, float]:
    """SciFact NDCG@10 of each system, where the data is present.

    all-MiniLM-L6-v2 only: the DistilBERT-base stand-in has random weights and ranks nothing. The fixed-batch
    control row is the same model on the same device, so it is not re-scored.
    """
    if model != "all-MiniLM-L6-v2" or not (workloads.SCIFACT / "corpus.jsonl").is_file():
        return {}
    from embedrt.beir import load_beir, score_embeddings

    data = load_beir(workloads.SCIFACT)
    out = {}
    for system in built:
        if system.name.endswith("fixed32"):
            continue
        corpus, queries = system.encode(data.corpus_texts, 32), system.encode(data.query_texts, 32)
        # cosine: all-MiniLM-L6-v2's similarity function
        out[system.name] = score_embeddings(data, queries, corpus, "cosine")["ndcg@10"]
        logging.info("%s %s: SciFact NDCG@10 %.2f", model, system.name, out[system.name])
    return out


COLD = """
import json, sys, time
t0 = time.perf_counter()
kind, path, device, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "embedrt":
    import embedrt
    m = embedrt.load(path, device=device, threads=threads)
    enc = lambda t: m.encode(t)
else:
    import torch
    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer(path, device="cpu")
    enc = lambda t: m.encode(t)
enc(["hello world"])
t1 = time.perf_counter()
enc([line for line in sys.stdin.read().splitlines()])
# VmHWM, not ru_maxrss: ru_maxrss carries the parent's peak across fork + exec
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({"cold_start_s": t1 - t0, "peak_rss_mb": int(hwm) / 1024}))
"""


def cold_starts(model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """import + load + one text in a fresh process, then peak RSS after the passages workload."""
    folders = systems.prepare(model, RECIPES[args.int8_recipe])
    passages = "\n".join(next(w for w in workloads.build(n_passages=args.passages) if w.name == "passages").texts)
    plan = [("st-torch-fp32", "torch", folders["checkpoint"], "cpu"),
            ("embedrt-fp32", "embedrt", folders["fp32"], "cpu"),
            (f"embedrt-int8-{args.int8_recipe}", "embedrt", folders["int8"], "cpu"),
            ("embedrt-openvino-fp32", "embedrt", folders["fp32"], "openvino")]
    rows = []
    for name, kind, path, device in plan:
        runs = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", COLD, kind, str(path), device, str(args.threads)],
                                 input=passages, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append({"model": model, "system": name,
                     "cold_start_s": statistics.median(r["cold_start_s"] for r in runs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)})
    return rows


def markdown(record: dict[str, Any]) -> str:
    """The README table."""
    m = record["machine"]
    lines = [f"Measured {record['date']} on {m['cpu']}, {m['threads']} threads (int8 target {m['int8_target']}); "
             f"texts: {record['data_source']}. {peak.describe(record['peak'])}",
             "",
             "| model | workload | system | texts/s or p50 | p95 | x PyTorch | % of peak | cos to ST (mean / min) "
             "| SciFact NDCG@10 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        speed = f"{r['texts_per_s']:.1f}/s" if "texts_per_s" in r else f"{r['latency_p50_ms']:.1f} ms"
        p95 = f"{r['p95_s']:.2f} s" if "texts_per_s" in r else f"{r['latency_p95_ms']:.1f} ms"
        frac = peak.fraction(record["peak"], r["gflops"], r["precision"]) if "gflops" in r else ""
        ndcg = f"{r['scifact_ndcg10']:.2f}" if "scifact_ndcg10" in r else ""
        lines.append(f"| {r['model']} | {r['workload']} | {r['system']} | {speed} | {p95} | "
                     f"{r['speedup_vs_torch']:.2f} | {frac} | {r['cos_mean']:.5f} / {r['cos_min']:.5f} | {ndcg} |")
    sizes = {(r["model"], r["system"]): r["size_bytes"] for r in record["results"] if r.get("size_bytes")}
    if record.get("cold_start"):
        lines += ["", "| model | system | size on disk | cold start (import + load + 1 text) | peak RSS |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['system']} | {sizes.get((c['model'], c['system']), 0) / 1e6:.1f} MB | "
                  f"{c['cold_start_s']:.2f} s | {c['peak_rss_mb']:.0f} MB |" for c in record["cold_start"]]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    """Speed-up over PyTorch per workload and system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in record["results"] if r["system"] != "st-torch-fp32"]
    labels = sorted({(r["model"], r["workload"]) for r in rows})
    names = sorted({r["system"] for r in rows})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [next((r["speedup_vs_torch"] for r in rows if (r["model"], r["workload"]) == lab
                      and r["system"] == name), 0.0) for lab in labels]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, [f"{m}\n{w}" for m, w in labels], fontsize=8)
    ax.set_ylabel("speed-up over sentence-transformers PyTorch fp32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run, then write JSON, markdown and a PNG under benchmarks/results/."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="all-MiniLM-L6-v2,distilbert-base")
    p.add_argument("--systems", default="st-onnx,embedrt-fp32,embedrt-fp32-fixed32,embedrt-int8,"
                   "embedrt-openvino-fp32,embedrt-openvino-int8")
    p.add_argument("--int8-recipe", default="dynamic", choices=sorted(RECIPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--no-cold-start", action="store_true")
    p.add_argument("--no-ndcg", dest="ndcg", action="store_false",
                   help="skip SciFact NDCG@10 per system (all-MiniLM-L6-v2, when ../shared/data is present)")
    p.add_argument("--tag", default="")
    p.add_argument("--cold-start-only", action="store_true",
                   help="re-measure cold start and RSS into the latest record of the same --tag")
    args = p.parse_args(argv)
    args.systems = args.systems.split(",")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("embedrt", "embedrt.export", "sentence_transformers", "transformers", "nncf"):
        logging.getLogger(name).setLevel(logging.WARNING)
    record: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(args.threads), "versions": _versions(), "data_source": workloads.source_name(),
        "int8_recipe": RECIPES[args.int8_recipe], "reps": args.reps,
        "peak": peak.measure(args.threads),
        "results": [], "cold_start": [],
    }
    stem = f"bench-{record['date'][:10]}{'-' + args.tag if args.tag else ''}"
    if args.cold_start_only:
        record = json.loads((RESULTS / f"{stem}.json").read_text())
        record["cold_start"] = [row for m in args.models.split(",") for row in cold_starts(m, args)]
        record["cold_start_measured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        args.no_cold_start = True
    for model in args.models.split(",") if not args.cold_start_only else []:
        record["results"] += run_model(model, args)
        if not args.no_cold_start:
            record["cold_start"] += cold_starts(model, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(record))
    plot(record, RESULTS / f"{stem}.png")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
