"""Bulk embedding: local vs Ray throughput, peak RSS vs corpus size, kill-and-resume.

``python -m benchmarks.bulk MODEL_DIR [--sections throughput,resume,rss] [--smoke]``

- throughput: the first ``--throughput-docs`` SciFact documents through ``embedrt embed`` locally with 2
  threads, and through ``embedrt embed --ray`` (a local Ray started for the job) with 1 and 2 single-thread
  actors; steady texts/s of each (net of the job's fixed start-up, from a run on 1/4 of the docs), Ray 2
  actors / local (the issue asks >= 0.85 on a 2-core machine) and the scaling efficiency 2 actors /
  (2 x 1 actor). While Ray runs, every actor process is sampled every 2 s (CPU %, OS threads including
  Ray's own, and its peak RSS from /proc: ``VmHWM``): the measured actor/thread layout and an actor's memory
  (the run's own ``peak_rss_mb`` is the driver's).
- resume: all of SciFact locally, SIGKILLed once half the parts are recorded, then resumed; the output must
  hold every id once and equal ``model.encode`` (max abs diff); the same job through Ray (2 x 1) must give
  the same ids and embeddings.
- rss: peak RSS (ru_maxrss) of the local job on ``--small`` and ``--large`` generated passages (SciFact
  sentences, 1-2 a passage, shuffled and repeated); the issue asks them within 15% of each other.

Every job runs in its own process. A JSON record goes to ``benchmarks/results/bulk-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
STATE = "_embedrt_bulk.json"


def generate_passages(scifact: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``n`` passages of 1-2 SciFact sentences (ids g0..), written as JSONL; reused if already there."""
    if out.is_file():
        return out
    from embedrt.textio import read_records

    sentences = [s.strip() for text in read_records(scifact / "corpus.jsonl")[1]
                 for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    rng = random.Random(seed)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"_id": f"g{i}", "text": " ".join(rng.sample(sentences, rng.randint(1, 2)))}) + "\n")
    tmp.replace(out)
    return out


def head(src: Path, n: int, out: Path) -> Path:
    """The first ``n`` lines of ``src``."""
    with src.open() as fh, out.open("w") as dst:
        for i, line in enumerate(fh):
            if i >= n:
                break
            dst.write(line)
    return out


def run_embed(args: list[str], sample_actors: bool = False) -> dict[str, Any]:
    """``embedrt embed ARGS`` in a child process: wall time, its peak RSS (``peak_rss_mb``: the driver's, which
    on Ray does not include the actors), and (Ray) actor samples, each with its own ``peak_rss_mb``."""
    code = ("import resource, sys; from embedrt.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_actors, args=(samples, stop)) if sample_actors else None
    start = time.perf_counter()
    if sampler:
        sampler.start()
    proc = subprocess.run([sys.executable, "-c", code, "embed", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    if sampler:
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"embedrt embed {' '.join(args)} failed: {proc.stderr[-3000:]}")
    maxrss = int(re.findall(r"MAXRSS_KB (\d+)", proc.stderr)[-1])
    out = Path(args[args.index("-o") + 1])
    progress = json.loads((out / STATE).read_text())["progress"]
    return {"wall_s": round(wall, 2), "job_s": round(progress["seconds"], 2), "texts": progress["texts"],
            "texts_per_s": round(progress["texts"] / progress["seconds"], 2), "tokens": progress["tokens"],
            "peak_rss_mb": round(maxrss / 1024, 1), "actors": _summarise_samples(samples) if sample_actors else None}


def _sample_actors(samples: list[dict[str, Any]], stop: threading.Event) -> None:
    import psutil

    procs: dict[int, Any] = {}
    while not stop.wait(2.0):
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "EmbedBatch" in " ".join(proc.info["cmdline"] or []) and proc.pid not in procs:
                procs[proc.pid] = proc
                proc.cpu_percent(None)  # the first call starts the interval
        for pid, proc in list(procs.items()):
            try:
                samples.append({"pid": pid, "cpu_percent": proc.cpu_percent(None), "threads": proc.num_threads(),
                                "affinity": len(proc.cpu_affinity()), "peak_rss_kb": _peak_rss_kb(pid)})
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                del procs[pid]


def _peak_rss_kb(pid: int) -> int:
    """The process's RSS high-water mark (``VmHWM``): its true peak, whenever between two samples it came."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _summarise_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    # drop start-up / wind-down samples: the median of each actor's busy samples is its steady state
    return [{"pid": pid, "samples": len(rows), "median_cpu_percent": float(np.median([r["cpu_percent"] for r in rows])),
             "os_threads_incl_ray": max(r["threads"] for r in rows),
             "peak_rss_mb": round(max(r.get("peak_rss_kb", 0) for r in rows) / 1024, 1)}
            for pid, rows in by_pid.items()]


SYSTEMS = {
    "local_2threads": ["--threads", "2"],
    "ray_1actor_1thread": ["--ray", "--actors", "1", "--threads", "1"],
    "ray_2actors_1thread": ["--ray", "--actors", "2", "--threads", "1"],
}


def throughput(model: str, corpus: Path, small: Path, work: Path) -> dict[str, Any]:
    """Local 2 threads vs Ray 1 and 2 single-thread actors; steady-state rates net of each job's fixed cost.

    Each system embeds ``small`` and then ``corpus``; the steady rate is the difference in texts over the
    difference in job time, so Ray's start-up (pipeline planning, actors loading the model) and the local
    job's first window cancel out. Both the end-to-end and the steady rates are recorded.
    """
    runs: dict[str, Any] = {}
    for name, flags in SYSTEMS.items():
        ray = "--ray" in flags
        first = run_embed([model, str(small), "-o", str(work / f"tp-{name}-small"), *flags])
        full = run_embed([model, str(corpus), "-o", str(work / f"tp-{name}"), *flags], sample_actors=ray)
        steady = (full["texts"] - first["texts"]) / max(full["job_s"] - first["job_s"], 1e-9)
        runs[name] = {**full, "small_run": first, "steady_texts_per_s": round(steady, 2)}
    local, r1, r2 = (runs[k]["steady_texts_per_s"] for k in SYSTEMS)
    return {"runs": runs, "ray2_over_local": round(r2 / local, 3),
            "scaling_efficiency_2_actors": round(r2 / (2 * r1), 3),
            "end_to_end_ray2_over_local": round(runs["ray_2actors_1thread"]["texts_per_s"]
                                                / runs["local_2threads"]["texts_per_s"], 3)}


def resume(model: str, corpus: Path, work: Path, part_rows: int = 500) -> dict[str, Any]:
    """Kill the local job halfway, resume it, check ids and embeddings; then the same job on Ray."""
    out = work / "resume-local"
    cmd = [sys.executable, "-m", "embedrt.cli", "embed", model, str(corpus), "-o", str(out),
           "--part-rows", str(part_rows)]
    with corpus.open() as fh:
        rows = sum(1 for line in fh if line.strip())
    total_parts = -(-rows // part_rows)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    while proc.poll() is None:
        state = out / STATE
        if state.is_file():
            parts = json.loads(state.read_text())["progress"]["parts"]
            if parts >= total_parts // 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = parts
                break
        time.sleep(0.05)
    proc.wait()
    resumed = run_embed([model, str(corpus), "-o", str(out), "--part-rows", str(part_rows)])
    ray_run = run_embed([model, str(corpus), "-o", str(work / "resume-ray"), "--ray", "--actors", "2",
                         "--threads", "1"], sample_actors=True)
    import embedrt
    from embedrt.textio import read_records

    ids, texts = read_records(corpus)
    want = dict(zip(ids, embedrt.load(model, threads=2).encode(texts)))
    local = _read(out)
    ray = _read(work / "resume-ray")
    return {
        "killed_after_parts": killed_at, "parts": total_parts, "resumed_run": resumed,
        "local_unique_ids": len(set(local)), "local_rows": len(local), "corpus_ids": len(ids),
        "local_max_abs_diff_vs_encode": float(max(np.abs(v - want[k]).max() for k, v in local.items())),
        "ray_run": ray_run, "ray_ids_equal_local": sorted(ray) == sorted(local),
        "ray_max_abs_diff_vs_local": float(max(np.abs(v - local[k]).max() for k, v in ray.items())),
    }


def _read(folder: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    emb = table.column("embedding").combine_chunks().values.to_numpy().reshape(len(table), -1)
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{folder}: duplicate ids")
    return dict(zip(ids, emb))


def rss(model: str, scifact: Path, work: Path, small: int, large: int) -> dict[str, Any]:
    """Peak RSS of the local job on ``small`` vs ``large`` generated passages."""
    big = generate_passages(scifact, large, work / f"generated-{large}.jsonl")
    little = head(big, small, work / f"generated-{small}.jsonl")
    runs = {n: run_embed([model, str(path), "-o", str(work / f"rss-{n}"), "--threads", "2"])
            for n, path in ((small, little), (large, big))}
    return {"runs": {str(k): v for k, v in runs.items()},
            "large_over_small_rss": round(runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"], 3)}


def main(argv: list[str] | None = None) -> int:
    """Run the sections asked for; print and save a JSON record."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (e.g. embedrt export all-MiniLM-L6-v2 -o models/all-MiniLM-L6-v2)")
    p.add_argument("--scifact", type=Path, default=SCIFACT)
    p.add_argument("--sections", default="throughput,resume,rss")
    p.add_argument("--throughput-docs", type=int, default=2000, help="SciFact documents for the throughput runs")
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=200_000)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "results" / "_bulk-work")
    p.add_argument("--smoke", action="store_true", help="tiny counts (checks the script, measures nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        args.throughput_docs, args.small, args.large = 100, 200, 400
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    work = args.work / run_id
    work.mkdir(parents=True)
    model = str(Path(args.model).resolve())
    import embedrt
    from embedrt.cpu import cpu_name

    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": model,
        "cpu": cpu_name(), "cores": os.cpu_count(), "smoke": args.smoke,
        "versions": _versions(), "embedrt": embedrt.__version__,
    }
    sections = set(args.sections.split(","))
    if "throughput" in sections:
        corpus = head(args.scifact / "corpus.jsonl", args.throughput_docs, work / "scifact-head.jsonl")
        # a quarter: 500 of 2,000 docs, two Ray batches of 256, one per actor
        small = head(corpus, max(1, args.throughput_docs // 4), work / "scifact-head-small.jsonl")
        record["throughput"] = throughput(model, corpus, small, work)
    if "resume" in sections:
        corpus = args.scifact / "corpus.jsonl"
        if args.smoke:
            corpus = head(corpus, 150, work / "scifact-150.jsonl")
        record["resume"] = resume(model, corpus, work, 25 if args.smoke else 500)
    if "rss" in sections:
        record["rss"] = rss(model, args.scifact, work, args.small, args.large)
    text = json.dumps(record, indent=2)
    print(text)
    if not args.smoke:
        out = REPO / "benchmarks" / "results" / f"bulk-{record['date'][:10]}.json"
        out.write_text(text + "\n")
        print(f"written {out}", file=sys.stderr)
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnxruntime", "pyarrow", "ray", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


if __name__ == "__main__":
    sys.exit(main())
