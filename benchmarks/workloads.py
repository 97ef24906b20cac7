"""Fixed, deterministic workloads: short queries, 150-250-word passages, 512-token documents."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


@dataclasses.dataclass(frozen=True)
class Workload:
    """Texts encoded together as one timed unit."""

    name: str
    texts: tuple[str, ...]
    batch_size: int
    single: bool = False  # time each text alone (latency), not the whole list


def _scifact() -> tuple[list[str], list[str]] | None:
    if not (SCIFACT / "corpus.jsonl").is_file():
        return None
    from embedrt.textio import read_records

    return read_records(SCIFACT / "corpus.jsonl")[1], read_records(SCIFACT / "queries.jsonl")[1]


def _synthetic() -> tuple[list[str], list[str]]:
    from embedrt.export.quantize import default_calibration_texts

    sentences = [t for t in default_calibration_texts() if len(t.split()) < 30]
    rng = random.Random(0)
    docs = [" ".join(rng.sample(sentences, 14)) for _ in range(600)]
    return docs, [s for s in sentences if len(s.split()) <= 12]


def build(n_queries: int = 256, n_passages: int = 64, n_long: int = 16, n_single: int = 50) -> list[Workload]:
    """The standard workloads (from SciFact when present, else from the shipped calibration texts)."""
    data = _scifact()
    docs, queries = data if data else _synthetic()
    passages = [d for d in docs if 150 <= len(d.split()) <= 250]
    rng = random.Random(42)
    rng.shuffle(passages)
    long_docs = [" ".join(passages[i : i + 4]) for i in range(0, 4 * n_long, 4)]  # > 512 tokens, truncated
    # 5-13 words: 18.4 WordPiece tokens on average (single-query texts 17.6), the "~18 tokens"
    q = [x for x in queries if 5 <= len(x.split()) <= 13]
    return [
        Workload("queries", tuple(q[:n_queries]), 32),
        Workload("passages", tuple(passages[:n_passages]), 32),
        Workload("long", tuple(long_docs[:n_long]), 16),
        Workload("single_query", tuple(q[n_queries : n_queries + n_single]), 1, single=True),
    ]


def source_name() -> str:
    """Where the texts came from."""
    return "SciFact (BEIR test corpus and queries)" if _scifact() else "embedrt calibration texts (synthetic mix)"
