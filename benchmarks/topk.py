"""``top_k`` speed, and the current version next to an earlier one: ``python -m benchmarks.topk [--against REV]``.

A seeded 200,000 x 384 float32 corpus of unit rows and 100 queries, k=10, the default chunk size; each metric,
then dot with one row in 16,384 made 10^4 times longer (a wide rounding bound for its chunk). ``--against``
imports ``runtime/ops.py`` as it was at a git revision and times both side by side, rounds alternating; the
median of ``--rounds`` is printed as JSON, seconds per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _ops_at(rev: str, folder: Path) -> Any:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:runtime/ops.py"], check=True,
                            capture_output=True, text=True).stdout
    path = folder / "ops_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ops_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="a git revision whose top_k is timed next to this one")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from embedrt import ops

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((200_000, 384)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    outliers = corpus.copy()
    outliers[::16384] *= 1e4
    queries = rng.standard_normal((100, 384)).astype(np.float32)
    cases = [(m, corpus) for m in ("cosine", "dot", "euclidean")] + [("dot-outliers", outliers)]
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"current": ops}
        if args.against:
            versions[args.against] = _ops_at(args.against, Path(tmp))
        times: dict[str, dict[str, list[float]]] = {v: {c: [] for c, _ in cases} for v in versions}
        for _ in range(args.rounds):
            for name, module in versions.items():
                for case, data in cases:
                    start = time.perf_counter()
                    module.top_k(queries, data, 10, case.split("-")[0])
                    times[name][case].append(time.perf_counter() - start)
    print(json.dumps({name: {case: round(statistics.median(t), 3) for case, t in by_case.items()}
                      for name, by_case in times.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
