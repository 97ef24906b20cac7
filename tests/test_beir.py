"""Retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from embedrt.beir import ndcg_at_k, recall_at_k, score_rankings


def test_ndcg_by_hand() -> None:
    relevant = {"a": 1, "b": 1}
    # hits at ranks 1 and 3: (1 + 1/log2(4)) / (1 + 1/log2(3))
    want = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["a", "x", "b"], relevant, 10) == pytest.approx(want)
    assert ndcg_at_k(["x"] * 10 + ["a"], relevant, 10) == 0.0


def test_recall_and_identical_ids() -> None:
    assert recall_at_k(["a", "x"], {"a": 1, "b": 1}, 100) == 0.5
    # the query's own id is dropped from its ranking, as BEIR and MTEB do
    scores = score_rankings({"q1": ["q1", "a"]}, {"q1": {"a": 1}})
    assert scores["ndcg@10"] == pytest.approx(100.0)


def _beir(tmp_path, qrels: str, corpus: str | None = None):  # type: ignore[no-untyped-def]
    import json

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "text": f"document {i}"} for i in range(3)]
    (root / "corpus.jsonl").write_text(corpus if corpus is not None else "".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "one"}\n{"_id": "q2", "text": "two"}\n')
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def test_qrels_are_read_by_line_and_column_count(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each of these scored silently wrong (exit 0): a TREC row's iteration column taken as the document, a
    quote joining lines into one field, a first judgement dropped as the header, 1_0 read as 10."""
    from embedrt.beir import load_beir
    from embedrt.textio import InputFileError

    cases = [
        ("q1\t0\td0\t1\n", r"test\.tsv:1: 4 columns; expected 3 tab-separated ones.*TREC qrels have 4"),
        ("query-id\tcorpus-id\tscore\nq1 d0 1\n", r"test\.tsv:2: 1 columns.*separated by tabs"),
        ("query-id\tcorpus-id\tscore\nq1\td0\t1_0\n", r"test\.tsv:2: score '1_0' is not an integer"),
        ("query-id\tcorpus-id\tscore\nq1\t\"d0\t1\nq2\td1\"\t1\nq2\td2\t1.5\n",
         r"test\.tsv:4: score '1\.5' is not an integer"),  # named by its line; an unclosed quote is text
        ("query-id\tcorpus-id\tscore\nq1\t\t1\n", r"test\.tsv:2: empty corpus-id"),
    ]
    for text, error in cases:
        with pytest.raises(InputFileError, match=error):
            load_beir(_beir(tmp_path, text))
    # no header: the first row is a judgement; a quoted cell is unquoted (BEIR's csv reader does it); a
    # trailing tab is no column
    data = load_beir(_beir(tmp_path, 'q1\td0\t1\nq2\t"d1"\t0\nq2\td2\t2\t\n'))
    assert data.qrels == {"q1": {"d0": 1}, "q2": {"d1": 0, "d2": 2}} and data.query_ids == ["q1", "q2"]
    data = load_beir(_beir(tmp_path, "query-id\tcorpus-id\tscore\r\nq1\td0\t1\r\n\r\n"))
    assert data.qrels == {"q1": {"d0": 1}} and data.query_ids == ["q1"]


def test_a_corpus_the_qrels_do_not_match_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An empty corpus, or ids of another form (1.0 for "1"), scored NDCG@10 0.00 with exit 0."""
    from embedrt.beir import load_beir
    from embedrt.textio import InputFileError

    with pytest.raises(InputFileError, match=r"corpus\.jsonl: no documents"):
        load_beir(_beir(tmp_path, "q1\td0\t1\n", corpus=""))
    with pytest.raises(InputFileError, match=r"corpus\.jsonl: none of the 2 documents the qrels judge relevant is in "
                                             r"the corpus \('x0', 'x1', \.\.\.\)"):
        load_beir(_beir(tmp_path, "q1\tx0\t1\nq2\tx1\t1\nq2\td0\t0\n"))
    with pytest.raises(InputFileError, match=r"corpus\.jsonl:2: id is float, not a string"):
        load_beir(_beir(tmp_path, "q1\td0\t1\n", corpus='{"_id": "d0", "text": "a"}\n{"_id": 1.0, "text": "b"}\n'))
    with pytest.raises(InputFileError, match=r"corpus\.jsonl:1: id field '_id' is null"):
        load_beir(_beir(tmp_path, "q1\td0\t1\n", corpus='{"_id": null, "text": "a"}\n'))
    from embedrt.textio import read_records

    (tmp_path / "enc.jsonl").write_text('{"id": 1.0, "text": "hello"}\n')  # pandas writes int ids so, beside NaN
    assert read_records(tmp_path / "enc.jsonl") == (["1.0"], ["hello"])  # encode uses no id: not refused there
    # a judged document missing from a corpus that holds others is fine (BEIR subsets do this)
    assert load_beir(_beir(tmp_path, "q1\td0\t1\nq1\tx9\t1\n")).qrels == {"q1": {"d0": 1, "x9": 1}}
