"""RSS over many encode calls of random lengths: ``python -m benchmarks.rss_soak MODEL_DIR``.

After a warm-up, memory must stay flat (the issue's bar: within 10%) while shapes keep changing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    """Warm up, then sample RSS every 1000 calls; prints a JSON record and exits 1 if growth > 10%."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import embedrt
    from embedrt.export.quantize import default_calibration_texts

    words = " ".join(default_calibration_texts()).split()
    rng = random.Random(0)
    model = embedrt.load(args.model, device=args.device, threads=args.threads)

    def call() -> None:
        batch = [" ".join(rng.choices(words, k=rng.randint(1, 120))) for _ in range(rng.randint(1, 4))]
        model.encode(batch)

    for _ in range(args.warmup):
        call()
    start_rss, samples, t0 = rss_mb(), [], time.perf_counter()
    for i in range(1, args.calls + 1):
        call()
        if i % 1000 == 0:
            samples.append(round(rss_mb(), 1))
    growth = max(samples) / start_rss - 1.0
    print(json.dumps({"model": args.model, "device": args.device, "calls": args.calls, "rss_after_warmup_mb":
                      round(start_rss, 1), "rss_samples_mb": samples, "max_growth_percent": round(100 * growth, 2),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0 if growth <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
