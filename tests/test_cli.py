"""The CLI end to end on a tiny model: encode, search, info, eval, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embedrt
from embedrt.cli import main


def test_encode_txt_and_jsonl(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_bert[1]
    txt = tmp_path / "in.txt"
    txt.write_text("first line\n\nthird line\n")
    assert main(["encode", str(folder), "--input", str(txt), "-o", str(tmp_path / "a.npy")]) == 0
    emb = np.load(tmp_path / "a.npy")
    assert emb.shape == (3, 32)  # the blank line is a text too
    want = embedrt.load(folder).encode(["first line", "", "third line"])
    np.testing.assert_allclose(emb, want, atol=1e-6)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"id": 1, "text": "first line"}) + "\n")
    assert main(["encode", str(folder), "--input", str(jsonl), "-o", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b.npy")[0], want[0], atol=1e-6)


def test_bad_jsonl_line_is_named(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": 5}\n')
    assert main(["encode", str(tiny_bert[1]), "--input", str(bad), "-o", str(tmp_path / "x.npy")]) == 2
    assert "bad.jsonl:2: expected an object with a string field 'text'" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_search_prints_ranked_hits(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "c.txt"
    corpus.write_text("alpha beta\ngamma delta\nalpha beta gamma\n")
    assert main(["search", str(tiny_bert[1]), "--corpus", str(corpus), "--query", "alpha beta", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "query: alpha beta" in out and "1. [1.0000] 0: alpha beta" in out and "  3. [" not in out


def test_info_and_verify(tiny_bert, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", str(tiny_bert[1]), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "embedrt-model" and info["pooling"] == "mean"


def test_eval_on_a_small_beir_folder(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {"d1": "cats purr", "d2": "dogs bark", "d3": "fish swim"}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{k}", "text": v}) + "\n"
                                                for k, v in docs.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nqd1\td1\t1\nqd2\td2\t1\n")
    out_json = tmp_path / "r.json"
    assert main(["eval", str(tiny_bert[1]), str(beir), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["queries"] == 2 and result["corpus"] == 3
    assert result["ndcg@10"] == pytest.approx(100.0)  # each query is its document's exact text
    assert "NDCG@10 100.00" in capsys.readouterr().out


def test_errors_exit_2_with_message(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no" / "such"), "-o", str(tmp_path / "o")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_max_tokens_is_passed_through_and_checked(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_bert[1]
    args = ["encode", str(folder), "--text", "one two three", "--text", "four", "-o"]
    assert main([*args, str(tmp_path / "a.npy"), "--max-tokens", "3"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), embedrt.load(folder).encode(["one two three", "four"]),
                               atol=2e-6)
    assert main([*args, str(tmp_path / "b.npy"), "--max-tokens", "0"]) == 2
    assert "max_tokens must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "b.npy").exists()


@pytest.mark.parametrize(("flag", "want"), [([], True), (["--no-huge-pages"], False)])
def test_huge_pages_flag_reaches_load(tiny_bert, tmp_path, monkeypatch, flag, want) -> None:  # type: ignore[no-untyped-def]
    import embedrt.model

    seen = {}
    real = embedrt.model.load

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedrt.model, "load", spy)
    assert main(["encode", str(tiny_bert[1]), "--text", "x", "-o", str(tmp_path / "x.npy"), *flag]) == 0
    assert seen["huge_pages"] is want
