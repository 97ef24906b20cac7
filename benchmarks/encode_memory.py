"""Peak memory of ``encode`` against the number of texts: ``python -m benchmarks.encode_memory MODEL_DIR``.

Each count runs in a fresh process: load, warm up, build the texts, reset the peak (``/proc/self/clear_refs``),
encode, then report the peak RSS above the RSS before ``encode`` and the output's own size (n x dim x 4
bytes, the one part that must grow with n). Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import gc, sys, time
import embedrt

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

def passages(n, tag):
    return [f"{tag} {i} " + "many different words in a long passage " * 60 for i in range(n)]

model = embedrt.load(sys.argv[1], device=sys.argv[3], threads=int(sys.argv[4]), huge_pages=False)
model.encode(passages(int(sys.argv[5]), "warm up"))
texts = passages(int(sys.argv[2]), "text")
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = kib("VmRSS")
start = time.perf_counter()
out = model.encode(texts)
inputs = sum(sys.getsizeof(t) for t in texts) // 1024
print(kib("VmHWM") - base, out.nbytes // 1024, base, round(time.perf_counter() - start, 1), kib("VmHWM"), inputs)
"""


def encode_peak(folder: Path, n: int, device: str = "cpu", threads: int = 2, warmup: int = 64,
                python: str = sys.executable) -> dict[str, float]:
    """Peak RSS above the pre-encode RSS (KiB) for ``n`` texts of ~480 words, in a fresh process.

    ``warmup`` texts of the same kind are embedded first (0 for a cold process).
    """
    run = subprocess.run([python, "-c", PROBE, str(folder), str(n), device, str(threads), str(warmup)],
                         capture_output=True, text=True, timeout=3600, check=True)
    peak, output, base, seconds, total, inputs = run.stdout.split()
    return {"texts": n, "peak_above_base_kib": int(peak), "output_kib": int(output), "base_rss_kib": int(base),
            "seconds": float(seconds), "peak_rss_kib": int(total), "input_texts_kib": int(inputs),
            "peak_rss_less_input_kib": int(total) - int(inputs)}


def main(argv: list[str] | None = None) -> int:
    """Print one JSON record; exit 1 if the process's peak RSS, less the caller's texts, grows by > 10%.

    The input strings are the caller's memory (a streaming caller never holds them all); what encode
    itself may hold is bounded, and its result (n x dim x 4 bytes) is the only part that grows with n.
    """
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--counts", default="2000,20000")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=64, help="texts embedded before the measured call")
    args = p.parse_args(argv)
    rows = [encode_peak(Path(args.model), int(n), args.device, args.threads, args.warmup)
            for n in args.counts.split(",")]
    working = [r["peak_rss_less_input_kib"] for r in rows]
    growth = max(working) / min(working) - 1.0
    above = [r["peak_above_base_kib"] - r["output_kib"] for r in rows]
    print(json.dumps({"model": args.model, "device": args.device, "warmup_texts": args.warmup, "rows": rows,
                      "peak_rss_less_input_growth_percent": round(100 * growth, 1),
                      "encode_working_memory_growth_percent": round(100 * (max(above) / min(above) - 1), 1)},
                     indent=1))
    return 0 if growth <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
