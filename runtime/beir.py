"""BEIR-format retrieval evaluation in numpy: NDCG@k and recall@k, as MTEB computes them."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from embedrt.ops import Similarity, top_k
from embedrt.textio import InputFileError, read_lines, read_records


@dataclasses.dataclass(frozen=True)
class BeirData:
    """A BEIR split: corpus texts, the queries judged in the split, and their relevance judgements."""

    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; keep only judged queries.

    Raises:
        InputFileError: a file is missing or malformed (names it), an id is there twice, a judged query
            has no text, the qrels hold no judgement, or judge one pair twice with different scores.
    """
    root = Path(folder)
    # a document twice would count its relevance twice (NDCG@10 above 100)
    corpus_ids, corpus_texts = read_records(root / "corpus.jsonl", unique=True)
    all_query_ids, all_query_texts = read_records(root / "queries.jsonl", unique=True)
    qrels = _read_qrels(root / "qrels" / f"{split}.tsv")
    by_id = dict(zip(all_query_ids, all_query_texts, strict=False))
    missing = [q for q in qrels if q not in by_id]
    if missing:
        raise InputFileError(f"{root / 'queries.jsonl'}: judged queries missing: {missing[:5]}")
    query_ids = [q for q in all_query_ids if q in qrels]
    return BeirData(corpus_ids, corpus_texts, query_ids, [by_id[q] for q in query_ids], qrels)


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    where: dict[tuple[str, str], int] = {}
    rows = list(csv.reader(read_lines(path), delimiter="\t"))
    for number, row in enumerate(rows[1:], start=2):  # the first row is the header
        if not any(cell.strip() for cell in row):  # a blank line (a trailing one, say) holds no judgement
            continue
        if len(row) < 3:
            raise InputFileError(f"{path}:{number}: expected query-id, corpus-id, score")
        try:
            score = int(row[2])
        except ValueError as exc:
            raise InputFileError(f"{path}:{number}: score {row[2]!r} is not an integer") from exc
        judged = qrels.setdefault(row[0], {})
        if row[1] in judged and judged[row[1]] != score:  # which one counts would be a guess
            raise InputFileError(f"{path}:{number}: query {row[0]!r}, document {row[1]!r} judged {score} here and "
                                 f"{judged[row[1]]} on line {where[row[0], row[1]]}")
        judged[row[1]] = score
        where.setdefault((row[0], row[1]), number)
    if not qrels:  # nothing to score: NDCG@10 would be the mean of nothing (NaN)
        raise InputFileError(f"{path}: no judgements (only a header, or empty)")
    return qrels


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """NDCG@k with linear gains (trec_eval / pytrec_eval ``ndcg_cut``)."""
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """Share of the relevant documents found in the first k."""
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def score_rankings(
    rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]], ignore_identical_ids: bool = True
) -> dict[str, float]:
    """Mean NDCG@10 and recall@100 (in percent) over the judged queries.

    ``ignore_identical_ids`` drops a hit whose id equals the query's, as BEIR and MTEB do by default.
    """
    ndcg, recall = [], []
    for qid, relevant in qrels.items():
        ranked = [d for d in rankings.get(qid, []) if not (ignore_identical_ids and d == qid)]
        ndcg.append(ndcg_at_k(ranked, relevant, 10))
        recall.append(recall_at_k(ranked, relevant, 100))
    return {"ndcg@10": 100.0 * float(np.mean(ndcg)), "recall@100": 100.0 * float(np.mean(recall)),
            "queries": len(qrels)}


def evaluate(model: Any, data: BeirData, batch_size: int = 32, show_progress: bool = False,
             corpus_embeddings: np.ndarray | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    """Embed the corpus and queries with ``model`` and score retrieval with its similarity function.

    Queries and documents get the model's ``query`` / ``document`` prompts where it has them (its
    ``encode_query`` and ``encode_document``, as MTEB runs sentence-transformers); a model object without
    those methods is asked for ``encode``.
    """
    encode_document = getattr(model, "encode_document", model.encode)
    encode_query = getattr(model, "encode_query", model.encode)
    corpus = corpus_embeddings
    if corpus is None:
        corpus = encode_document(data.corpus_texts, batch_size=batch_size, show_progress=show_progress,
                                 max_tokens=max_tokens)
    queries = encode_query(data.query_texts, batch_size=batch_size, max_tokens=max_tokens)
    metric: Similarity = model.similarity_metric
    return {**score_embeddings(data, queries, corpus, metric), "corpus": len(data.corpus_ids),
            "similarity": metric.value}


def score_embeddings(
    data: BeirData, queries: np.ndarray, corpus: np.ndarray, metric: Similarity | str
) -> dict[str, float]:
    """NDCG@10 and recall@100 of ranking ``corpus`` rows for each query row with ``metric``."""
    idx, _ = top_k(queries, corpus, k=101, metric=metric)
    rankings = {qid: [data.corpus_ids[i] for i in row] for qid, row in zip(data.query_ids, idx, strict=True)}
    return score_rankings(rankings, data.qrels)
