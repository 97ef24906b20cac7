"""Single-text latency against text length: ``python -m benchmarks.latency_by_length MODEL_DIR``.

One text per ``encode`` call, as a search service embeds a query. The main suite times real queries of
one length mix; this shows how the p50 grows with the token count, for the devices asked for, so a
latency budget can be read off for a deployment's own query lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

LENGTHS = (8, 12, 16, 18, 20, 24, 32, 48, 64)


def text_of(model, tokens: int) -> str:  # type: ignore[no-untyped-def]
    """A text that the model's tokenizer turns into exactly ``tokens`` ids (special tokens included)."""
    for words in range(1, tokens + 1):
        text = " ".join(["the"] * words)
        got = len(model.tokenize([text])[0])
        if got == tokens:
            return text
        if got > tokens:
            break
    raise ValueError(f"cannot build a text of exactly {tokens} tokens with this tokenizer")


def main(argv: list[str] | None = None) -> int:
    """Prints one JSON record per device: p50 and p95 in ms per length."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--device", action="append", help="cpu (default), openvino, cuda; repeatable")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(LENGTHS),
                   help="comma-separated token counts (default %(default)s)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per length")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import embedrt

    for device in args.device or ["cpu"]:
        model = embedrt.load(args.model, device=device, threads=args.threads)
        record: dict[str, object] = {"model": args.model, "device": device, "threads": args.threads,
                                     "providers": model.providers, "calls": args.calls}
        rows = {}
        for tokens in args.lengths:
            text = text_of(model, tokens)
            for _ in range(20):  # warm-up
                model.encode([text])
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                model.encode([text])
                times.append(time.perf_counter() - start)
            times.sort()
            rows[tokens] = {"p50_ms": round(1000 * statistics.median(times), 2),
                            "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 2)}
        record["latency"] = rows
        print(json.dumps(record))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
