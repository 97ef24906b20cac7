"""BEIR-format retrieval evaluation in numpy: NDCG@k and recall@k, as MTEB computes them."""

from __future__ import annotations

import dataclasses
import math
import re
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
    corpus_ids, corpus_texts = read_records(root / "corpus.jsonl", unique=True, check_ids=True)
    all_query_ids, all_query_texts = read_records(root / "queries.jsonl", unique=True, check_ids=True)
    if not corpus_ids:  # every judged document missing: NDCG@10 0.00, which reads as a model's score
        raise InputFileError(f"{root / 'corpus.jsonl'}: no documents")
    qrels = _read_qrels(root / "qrels" / f"{split}.tsv")
    relevant = {doc for judged in qrels.values() for doc, score in judged.items() if score > 0}
    if relevant and relevant.isdisjoint(corpus_ids):
        example = ", ".join(map(repr, sorted(relevant)[:3]))
        raise InputFileError(f"{root / 'corpus.jsonl'}: none of the {len(relevant)} documents the qrels judge "
                             f"relevant is in the corpus ({example}, ...); the ids of the two files do not match")
    by_id = dict(zip(all_query_ids, all_query_texts, strict=False))
    missing = [q for q in qrels if q not in by_id]
    if missing:
        raise InputFileError(f"{root / 'queries.jsonl'}: judged queries missing: {missing[:5]}")
    query_ids = [q for q in all_query_ids if q in qrels]
    return BeirData(corpus_ids, corpus_texts, query_ids, [by_id[q] for q in query_ids], qrels)


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR's ``qrels/<split>.tsv``: ``query-id``, ``corpus-id``, ``score`` a line, tab-separated, after an
    optional header (a first row whose score is not an integer). A row is one line: a cell in double quotes
    is unquoted, as BEIR's csv reader does, but an unclosed quote is text, never the start of a field that
    swallows the following lines. Any other column count is an error, not a guess at which is which."""
    qrels: dict[str, dict[str, int]] = {}
    where: dict[tuple[str, str], int] = {}
    first = True
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():  # a blank line (a trailing one, say) holds no judgement
            continue
        row = [_unquote(cell.strip()) for cell in line.split("\t")]
        while len(row) > 3 and not row[-1]:  # a tab at the end of the line
            row.pop()
        if len(row) != 3:
            hint = (" (TREC qrels have 4: query, iteration, document, score; drop the iteration column)"
                    if len(row) == 4 else " (the columns are separated by tabs)" if len(row) == 1 else "")
            raise InputFileError(f"{path}:{number}: {len(row)} columns; expected 3 tab-separated ones, query-id, "
                                 f"corpus-id and score{hint}")
        header, first = first and not _INTEGER.fullmatch(row[2]), False
        if header:  # query-id, corpus-id, score
            continue
        if not _INTEGER.fullmatch(row[2]):
            raise InputFileError(f"{path}:{number}: score {row[2]!r} is not an integer")
        if not row[0] or not row[1]:
            raise InputFileError(f"{path}:{number}: empty {'query-id' if not row[0] else 'corpus-id'}")
        score = int(row[2])
        judged = qrels.setdefault(row[0], {})
        if row[1] in judged and judged[row[1]] != score:  # which one counts would be a guess
            raise InputFileError(f"{path}:{number}: query {row[0]!r}, document {row[1]!r} judged {score} here and "
                                 f"{judged[row[1]]} on line {where[row[0], row[1]]}")
        judged[row[1]] = score
        where.setdefault((row[0], row[1]), number)
    if not qrels:  # nothing to score: NDCG@10 would be the mean of nothing (NaN)
        raise InputFileError(f"{path}: no judgements (only a header, or empty)")
    return qrels


def _unquote(cell: str) -> str:
    """``"d1"`` -> ``d1`` (and ``""`` inside -> ``"``), as the csv module reads a quoted cell."""
    if len(cell) >= 2 and cell[0] == cell[-1] == '"':
        return cell[1:-1].replace('""', '"')
    return cell


_INTEGER = re.compile(r"[+-]?[0-9]+")  # as written, not int()'s reading: "1_0" is no score of 10


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
