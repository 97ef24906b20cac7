"""embedrt embed (local mode): Parquet output equal to encode, resume after a kill, bad rows, formats."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedrt
from embedrt import bulk
from embedrt.bulk import BadRowError, BulkOptions, EmbedDtype, IdSet, InputFormat, ResumeError, embed_corpus
from embedrt.cli import main
from embedrt.errors import OutputPathError
from embedrt.textio import InputFileError, join_title, read_records

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega protein cell gene mutation cancer therapy").split()


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` BEIR-style rows: ids d0..d{n-1}, a title on two rows in three, 1-80 words of text."""
    rng = random.Random(seed)
    return [{"_id": f"d{i}", "title": f"title {i}" if i % 3 else "",
             "text": " ".join(rng.choices(WORDS, k=rng.randint(1, 80)))} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_output(folder: Path) -> tuple[list[str], np.ndarray, pa.Table]:
    table = pq.read_table(folder)
    emb = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)
    return table.column("id").to_pylist(), emb.reshape(len(table), -1), table


def assert_equals_encode(folder: Path, model: embedrt.EmbeddingModel, rows: list[dict]) -> None:  # type: ignore[type-arg]
    """Every id exactly once, and each embedding within 1e-6 of ``model.encode`` of its text."""
    ids, emb, _ = read_output(folder)
    want_ids = [r["_id"] for r in rows]
    assert sorted(ids) == sorted(want_ids) and len(set(ids)) == len(ids)
    want = model.encode([join_title(r.get("title"), r["text"]) for r in rows])
    order = {rid: i for i, rid in enumerate(want_ids)}
    got = np.empty_like(want)
    got[[order[i] for i in ids]] = emb
    assert float(np.abs(got - want).max()) <= 1e-6


@pytest.fixture(scope="module")
def model(tiny_bert) -> embedrt.EmbeddingModel:  # type: ignore[no-untyped-def]
    return embedrt.load(tiny_bert[1])


def test_jsonl_to_parquet_equals_encode(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = make_rows(3000)
    out = tmp_path / "out"
    summary = embed_corpus(model, write_jsonl(tmp_path / "c.jsonl", rows), out, BulkOptions(part_rows=700))
    assert summary.complete and summary.texts == 3000 and summary.parts == 5 and summary.bad == 0
    assert summary.tokens == int(model.tokenize_batch([join_title(r["title"], r["text"]) for r in rows]).lengths.sum())
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-00000{i}.parquet" for i in range(5)]
    assert all(pq.ParquetFile(p).metadata.num_rows <= 700 for p in out.glob("part-*"))
    assert_equals_encode(out, model, rows)
    _, _, table = read_output(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    meta = json.loads(table.schema.metadata[b"embedrt"])
    assert meta["dim"] == 32 and meta["model"] and meta["dtype"] == "float32"
    again = embed_corpus(model, tmp_path / "c.jsonl", out, BulkOptions(part_rows=700))  # complete: nothing to do
    assert again.texts == 3000 and again.parts == 5


def test_parquet_csv_tsv_and_beir_inputs(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = make_rows(300, seed=1)
    rows[5]["text"] = 'a "quoted", comma\nand a newline'
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=64)
    with (tmp_path / "c.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["_id", "title", "text"])
        writer.writeheader()
        writer.writerows(rows)
    # a TSV row is a line, its quotes are text (as BEIR and MS MARCO write them): no newline in a TSV text
    tsv_rows = [dict(r) for r in rows]
    tsv_rows[5]["text"] = '"Hello," he said'
    tsv_rows[6]["text"] = '"an unclosed quote'
    (tmp_path / "c.tsv").write_text("_id\ttitle\ttext\n" + "".join(
        f"{r['_id']}\t{r['title']}\t{r['text']}\n" for r in tsv_rows))
    (tmp_path / "beir").mkdir()
    write_jsonl(tmp_path / "beir" / "corpus.jsonl", rows)
    for source, want in (("c.parquet", rows), ("c.csv", rows), ("c.tsv", tsv_rows), ("beir", rows)):
        out = tmp_path / f"out-{source}"
        assert embed_corpus(model, tmp_path / source, out, BulkOptions(part_rows=128)).texts == 300
        assert_equals_encode(out, model, want)


def test_a_csv_quote_that_never_closes_stops_the_job_and_extra_fields_are_bad_rows(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Python's csv (and pyarrow's) read an unclosed quote to the end of the file: every later row in one text."""
    src = tmp_path / "q.csv"
    src.write_text('_id,text\n1,fine\n2,"unclosed\n3,c\n4,d\n')
    with pytest.raises(InputFileError, match=r"q\.csv:3: not a valid CSV row: unexpected end of data"):
        embed_corpus(model, src, tmp_path / "o1")
    src.write_text('_id,text\n1,"Hello" he said\n2,x\n')  # RFC 4180: a quoted field ends at its quote
    with pytest.raises(BadRowError, match=r"q\.csv:2: not a valid CSV row"):
        embed_corpus(model, src, tmp_path / "o2")
    out = tmp_path / "o3"  # that row alone is bad: with --skip-bad the job goes on after it
    assert embed_corpus(model, src, out, BulkOptions(skip_bad=True)).texts == 1
    assert read_output(out)[0] == ["2"]
    assert json.loads((out / bulk.BAD_ROWS_NAME).read_text())["id"] == "1"  # its id comes before the quote
    # quotes that do not pair up: the field may go on over the next lines, which were embedded as a row of
    # their own (id "left"); where the next row starts cannot be known, so the job stops, with --skip-bad too
    src.write_text('_id,text\n1,"He said "hi, then"\nleft, slowly"\n2,ok\n')
    for options in (BulkOptions(), BulkOptions(skip_bad=True)):
        with pytest.raises(InputFileError, match=r"q\.csv:2: not a valid CSV row: .* quotes do not pair up"):
            embed_corpus(model, src, tmp_path / "o4", options)
        assert not (tmp_path / "o4" / "part-000000.parquet").exists()
    for name, text in (("x.csv", "_id,text\n1,a,b\n2,ok\n"), ("x.tsv", "_id\ttext\n1\ta\tb\n2\tok\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(BadRowError, match=rf"{name}:2: 3 fields, the header has 2"):
            embed_corpus(model, tmp_path / name, tmp_path / f"o-{name}")
        out = tmp_path / f"skip-{name}"
        assert embed_corpus(model, tmp_path / name, out, BulkOptions(skip_bad=True)).texts == 1
        assert read_output(out)[0] == ["2"]  # the row's text is not cut at the extra field and embedded
        # its id comes before the extra separator: the bad-rows file names it (it held null)
        assert json.loads((out / bulk.BAD_ROWS_NAME).read_text())["id"] == "1"
    (tmp_path / "late.csv").write_text("text,_id\na,b,1\n2,ok\n")  # an id after the text: not known
    out = tmp_path / "skip-late"
    assert embed_corpus(model, tmp_path / "late.csv", out, BulkOptions(skip_bad=True)).texts == 1
    assert json.loads((out / bulk.BAD_ROWS_NAME).read_text())["id"] is None


def test_jsonl_ranges_cut_whole_lines_and_count_them_as_local_mode_does(tmp_path) -> None:
    """Ray's JSONL read tasks each take a range: the rows and their line numbers must be the whole file's."""
    rng = np.random.default_rng(4)
    ends = ["\n", "\r\n", "\r", "\n\n", "\r\r\n", "\n\r"]
    for trial in range(4):
        body = "".join(json.dumps({"_id": str(i), "text": "x" * int(rng.integers(0, 40))}) + ends[rng.integers(6)]
                       for i in range(300))
        src = tmp_path / f"r{trial}.jsonl"
        src.write_bytes(("\ufeff" if trial % 2 else "").encode() + body.encode() + b'{"_id": "last"}')
        whole = [(r.where, r.id, r.text) for r in bulk.iter_rows(src, InputFormat.JSONL, "_id", "text")]
        assert len(whole) == 301
        for size, block in ((1, 7), (50, 64), (1000, 333), (1 << 20, 1 << 20)):
            ranges = bulk.jsonl_ranges(src, size, block)
            assert ranges[0][0] == 0 and ranges[-1][1] == src.stat().st_size
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            assert len(ranges) > 1 or size == 1 << 20
            got = [(r.where, r.id, r.text) for start, end, first in ranges
                   for r in bulk.iter_jsonl_range(src, "_id", "text", start, end, first)]
            assert got == whole


def test_a_file_of_just_a_byte_order_mark_has_no_text(tmp_path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf")
    assert read_records(tmp_path / "bom.txt") == ([], [])
    (tmp_path / "bomline.txt").write_bytes(b"\xef\xbb\xbf\n")
    assert read_records(tmp_path / "bomline.txt") == (["0"], [""])  # one blank line: a text, as without the mark


def test_float16_output(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = make_rows(200, seed=2)
    out = tmp_path / "out"
    embed_corpus(model, write_jsonl(tmp_path / "c.jsonl", rows), out, BulkOptions(dtype=EmbedDtype.FLOAT16))
    ids, emb, table = read_output(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32) and emb.dtype == np.float16
    want = model.encode([join_title(r["title"], r["text"]) for r in rows]).astype(np.float16)
    order = [int(i[1:]) for i in ids]
    np.testing.assert_allclose(emb.astype(np.float32), want[order].astype(np.float32), atol=1e-3)


def not_installed(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import package`` fail for the test as where it is not installed (pyarrow's pandas shim takes a
    None in sys.modules for a module, so the import itself must fail)."""
    class Finder:
        @staticmethod
        def find_spec(name: str, *args: Any) -> None:
            if name.partition(".")[0] == package:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [m for m in sys.modules if m.partition(".")[0] == package]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])


def test_bulk_needs_no_pandas(model, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """embedrt[bulk] installs pyarrow, not pandas. Before pyarrow 26, DataType.to_pandas_dtype imports pandas,
    and every job ended in ModuleNotFoundError after embedding all its rows (seen with pyarrow 14-25)."""
    not_installed(monkeypatch, "pandas")
    rows = make_rows(20, seed=4)
    for dtype in EmbedDtype:
        out = tmp_path / dtype.value
        embed_corpus(model, write_jsonl(tmp_path / "c.jsonl", rows), out, BulkOptions(dtype=dtype))
        assert read_output(out)[1].dtype == np.dtype(dtype.value)


def test_without_pyarrow_nothing_is_loaded_or_written(tiny_bert, model, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The model was loaded and OUTPUT_DIR/_embedrt_bulk.json written before the "install embedrt[bulk]" error."""
    not_installed(monkeypatch, "pyarrow")
    monkeypatch.setattr("embedrt.cli._load", lambda args: pytest.fail("the model was loaded"))
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(3))
    assert main(["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "out")]) == 2
    assert "install it with: pip install 'embedrt[bulk]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"embedrt\[bulk\]"):
        embed_corpus(model, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def killed_at_progress_write(n: int, monkeypatch: Any, job: Any) -> None:
    """Run ``job`` until its ``n``-th progress-file write, which is a simulated kill (KeyboardInterrupt)."""
    real, calls = bulk.write_json_atomic, []

    def dying(path: Path, data: dict) -> None:  # type: ignore[type-arg]
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated kill")
        real(path, data)

    monkeypatch.setattr(bulk, "write_json_atomic", dying)
    with pytest.raises(KeyboardInterrupt):
        job()
    monkeypatch.setattr(bulk, "write_json_atomic", real)


def test_resume_after_failure_between_part_and_progress(model, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Killed after a part's rename but before the progress file said so: that part is redone, not doubled."""
    rows = make_rows(2000, seed=3)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    # the fresh-job record, then parts 0 and 1 recorded; part 2 renamed, not recorded
    killed_at_progress_write(4, monkeypatch, lambda: embed_corpus(model, src, out, BulkOptions(part_rows=300)))
    assert len(list(out.glob("part-*.parquet"))) == 3  # the third is an orphan
    summary = embed_corpus(model, src, out, BulkOptions(part_rows=300))
    assert summary.complete and summary.texts == 2000 and summary.resumed_texts == 600 and summary.parts == 7
    assert_equals_encode(out, model, rows)


def _embed_until_parts(model_dir: Path, src: Path, out: Path, parts: int) -> subprocess.Popen[str]:
    """``embedrt embed`` in a child process (250 rows a part), returned once ``parts`` parts are recorded."""
    cmd = [sys.executable, "-m", "embedrt.cli", "embed", str(model_dir), str(src), "-o", str(out),
           "--part-rows", "250", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / bulk.STATE_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["progress"]["parts"] >= parts:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be stopped: {proc.stderr.read()!r}"  # type: ignore[union-attr]
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_resume_after_a_kill(tiny_bert, model, tmp_path, sig: int) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL leaves what a rerun drops; SIGTERM (docker stop, Kubernetes, Slurm) cleans up as Ctrl-C does:
    the unfinished part's temporary file goes, exit 143. Either way the rerun completes the job."""
    rows = make_rows(6000, seed=4)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    proc = _embed_until_parts(tiny_bert[1], src, out, 3)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "embed: terminated (SIGTERM)" in err, (proc.returncode, err)
        assert not list(out.glob(".*")), list(out.glob(".*"))  # no temporary part or progress file left
    state = out / bulk.STATE_NAME
    done = json.loads(state.read_text())["progress"]
    assert not done["complete"] and 3 <= done["parts"] < 24
    assert main(["embed", str(tiny_bert[1]), str(src), "-o", str(out), "--part-rows", "250"]) == 0
    final = json.loads(state.read_text())["progress"]
    assert final["complete"] and final["texts"] == 6000 and final["resumed_texts"] == done["texts"]
    assert not list(out.glob(".*.tmp"))
    assert_equals_encode(out, model, rows)


def test_leftovers_of_a_killed_run_and_strays_in_the_folder(tiny_bert, model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    rows = make_rows(30, seed=6)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    # killed while the first progress file was written: only its temporary file is there, the folder is new
    out = tmp_path / "first"
    out.mkdir()
    (out / f".{bulk.STATE_NAME}.abc123").write_text("{")
    embed_corpus(model, src, out, BulkOptions(part_rows=10))
    assert not list(out.glob(".*"))
    # killed while a later one was rewritten: the resume removes it
    (out / f".{bulk.STATE_NAME}.def456").write_text("{")
    embed_corpus(model, src, out, BulkOptions(part_rows=10))
    assert not list(out.glob(".*"))
    assert_equals_encode(out, model, rows)
    # a file named like a part, which no job writes: named, not an int() traceback
    (out / "part-000000 (1).parquet").write_bytes(b"")
    with pytest.raises(ResumeError, match=r"part-000000 \(1\)\.parquet: not a part this job wrote"):
        embed_corpus(model, src, out, BulkOptions(part_rows=10))
    (out / "part-000000 (1).parquet").unlink()
    # numbered, but not as the job numbers its parts: part-0 was kept (its rows a second time in the dataset),
    # part-9 deleted (a user's file lost), both without a word
    for stray in ("part-0.parquet", "part-9.parquet", "part-0000001.parquet"):
        shutil.copy(out / "part-000000.parquet", out / stray)
        with pytest.raises(ResumeError, match=rf"{stray}: not a part this job wrote"):
            embed_corpus(model, src, out, BulkOptions(part_rows=10))
        assert (out / stray).exists()
        (out / stray).unlink()
    assert_equals_encode(out, model, rows)
    # a finished --skip-bad job reruns as a no-op after its bad-rows file was moved away
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:3], {"_id": "d0", "text": "again"}])
    done = tmp_path / "done"
    assert embed_corpus(model, bad, done, BulkOptions(skip_bad=True)).bad == 1
    (done / bulk.BAD_ROWS_NAME).rename(tmp_path / "kept.jsonl")
    assert embed_corpus(model, bad, done, BulkOptions(skip_bad=True)).texts == 3


def test_csv_header_naming_a_column_twice_and_outputs_the_cli_refuses(tiny_bert, model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "d.csv"
    src.write_text("_id,text,text\na,first,second\n")
    with pytest.raises(InputFileError, match=r"d\.csv:1: the header names column 'text' more than once"):
        embed_corpus(model, src, tmp_path / "o")
    # the same in JSONL and Parquet: json and pyarrow took the last one, silently
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"_id": "a", "text": "x \\"text\\": y"}\n{"_id": "b", "text": "first", "text": "second"}\n'
                   '{"_id": "c", "text": "ok", "x": {"_id": 1, "_id": 2}}\n')  # a nested object's keys: not ours
    with pytest.raises(BadRowError, match=r"d\.jsonl:2: the key 'text' more than once"):
        embed_corpus(model, dup, tmp_path / "o-dup")
    out = tmp_path / "o-dup-skip"
    assert embed_corpus(model, dup, out, BulkOptions(skip_bad=True)).texts == 2
    assert read_output(out)[0] == ["a", "c"]
    with pytest.raises(InputFileError, match=r"d\.jsonl:2: the key 'text' more than once"):
        read_records(dup)
    (tmp_path / "n.jsonl").write_text('{"_id": "a", "本文": "first", "本文": "second"}\n', encoding="utf-8")
    with pytest.raises(BadRowError, match=r"n\.jsonl:1: the key '本文' more than once"):  # written unescaped
        embed_corpus(model, tmp_path / "n.jsonl", tmp_path / "o-dup-n", BulkOptions(field="本文"))
    # a key spelt with escapes is the same key to json: '"te\\u0078t"' is "text"
    (tmp_path / "u.jsonl").write_text('{"_id": "a", "text": "\\u00e9t\\u00e9"}\n'
                                      '{"_id": "b", "text": "first", "te\\u0078t": "second"}\n')
    with pytest.raises(InputFileError, match=r"u\.jsonl:2: the key 'text' more than once"):
        read_records(tmp_path / "u.jsonl")
    (tmp_path / "s.jsonl").write_text('{"_id": "a", "a/b": "first", "a\\/b": "second"}\n')  # "\/" is "/"
    with pytest.raises(InputFileError, match=r"s\.jsonl:1: the key 'a/b' more than once"):
        read_records(tmp_path / "s.jsonl", field="a/b")
    out = tmp_path / "o-dup-u"
    assert embed_corpus(model, tmp_path / "u.jsonl", out, BulkOptions(skip_bad=True)).texts == 1
    assert read_output(out)[0] == ["a"]
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["first"]), pa.array(["second"])],
                                 names=["_id", "text", "text"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(InputFileError, match=r"d\.parquet: the column 'text' more than once"):
        embed_corpus(model, tmp_path / "d.parquet", tmp_path / "o-dup-pq")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(InputFileError, match=r"e\.csv: empty; a header row naming '_id' and 'text' comes first"):
        embed_corpus(model, tmp_path / "e.csv", tmp_path / "o2")
    good = write_jsonl(tmp_path / "c.jsonl", make_rows(3))
    folder = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_bert[1], folder)
    assert main(["embed", str(folder), str(good), "-o", str(folder / "emb")]) == 2
    assert "is inside the model folder" in capsys.readouterr().err and not (folder / "emb").exists()
    with pytest.raises(SystemExit):
        main(["embed", str(folder), str(good), "-o", str(tmp_path / "o3"), "--part-rows", "0"])
    assert "argument --part-rows: must be >= 1, got 0" in capsys.readouterr().err
    odd = Path(os.fsdecode(bytes(tmp_path / "o") + b"\xe9"))
    assert main(["embed", str(folder), str(good), "-o", str(odd)]) == 2
    assert "the output path is not valid UTF-8" in capsys.readouterr().err and not odd.exists()
    named = Path(os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.jsonl"))
    shutil.copy(good, named)  # an input whose name is not UTF-8 is recorded in the job state, escaped
    assert main(["embed", str(folder), str(named), "-o", str(tmp_path / "o4")]) == 0
    assert "\\xe9.jsonl" in (tmp_path / "o4" / bulk.STATE_NAME).read_text()


def test_resume_refuses_another_job(model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(50))
    out = tmp_path / "out"
    embed_corpus(model, src, out, BulkOptions(part_rows=20))
    with pytest.raises(ResumeError, match=r"options\.dtype: was 'float32', now 'float16'"):
        embed_corpus(model, src, out, BulkOptions(part_rows=20, dtype=EmbedDtype.FLOAT16))
    with pytest.raises(ResumeError, match=r"options\.field: was 'text', now 'body'"):
        embed_corpus(model, src, out, BulkOptions(part_rows=20, field="body"))
    write_jsonl(src, make_rows(51))
    with pytest.raises(ResumeError, match=r"input\.bytes: was"):
        embed_corpus(model, src, out, BulkOptions(part_rows=20))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    with pytest.raises(ResumeError, match=r"not empty and holds no _embedrt_bulk\.json"):
        embed_corpus(model, src, foreign)



def test_a_job_started_before_precision_was_recorded_resumes(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Progress files from before 2026-11-23 have no options.precision: the job still resumes, and a model
    that now runs in another precision than it could have then is refused."""
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(50))
    out = tmp_path / "out"
    embed_corpus(model, src, out, BulkOptions(part_rows=20))
    state = json.loads((out / bulk.STATE_NAME).read_text())
    assert state["job"]["options"].pop("precision") == model.precision == "fp32"
    (out / bulk.STATE_NAME).write_text(json.dumps(state))
    summary = embed_corpus(model, src, out, BulkOptions(part_rows=20))  # the same job: a finished one, a no-op
    assert summary.texts == 50 and pq.read_table(out).num_rows == 50
    with pytest.raises(ResumeError, match=r"options\.precision: was 'fp32', now 'bf16'"):
        bulk._open_output(out, {**state["job"], "options": {**state["job"]["options"], "precision": "bf16"}}, "fp32")



def test_a_job_records_where_it_ran_and_older_records_of_the_device_asked_for_resume(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The job records the device the model ran on (``openvino:CPU``), not the string asked for (``auto``);
    progress files from before 2026-12-02 recorded that string, and resume when the same string is asked."""
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(30))
    out = tmp_path / "out"
    on_openvino = embedrt.load(tiny_bert[1], device="openvino")
    embed_corpus(on_openvino, src, out, BulkOptions(part_rows=20, device="openvino"))
    state = json.loads((out / bulk.STATE_NAME).read_text())
    assert state["job"]["options"]["device"] == "openvino:CPU"
    state["job"]["options"]["device"] = "openvino"  # as an older embedrt wrote it
    (out / bulk.STATE_NAME).write_text(json.dumps(state))
    assert embed_corpus(on_openvino, src, out, BulkOptions(part_rows=20, device="openvino")).texts == 30
    # the same job on another backend is another job, whatever string asked for it
    on_ort = embedrt.load(tiny_bert[1], device="cpu")
    with pytest.raises(ResumeError, match=r"options\.device: was 'openvino', now 'cpu'"):
        embed_corpus(on_ort, src, out, BulkOptions(part_rows=20, device="auto"))
    fresh = tmp_path / "fresh"
    embed_corpus(on_openvino, src, fresh, BulkOptions(part_rows=20, device="auto"))
    with pytest.raises(ResumeError, match=r"options\.device: was 'openvino:CPU', now 'cpu'.*--device openvino:CPU"):
        embed_corpus(on_ort, src, fresh, BulkOptions(part_rows=20, device="auto"))
    # a new state's device is never mapped: asked for as "openvino:CPU" but run elsewhere (a fallback) is refused
    with pytest.raises(ResumeError, match=r"options\.device: was 'openvino:CPU', now 'cpu'"):
        embed_corpus(on_ort, src, fresh, BulkOptions(part_rows=20, device="openvino:CPU"))
    assert bulk._never_recorded_now("auto") and bulk._never_recorded_now("openvino")
    assert not bulk._never_recorded_now("cpu") and not bulk._never_recorded_now("cuda:0")


BAD_LINES = [
    json.dumps({"_id": "a", "text": "fine"}),
    json.dumps({"_id": "b"}),                       # 2: no text
    json.dumps({"_id": "c", "text": 7}),            # 3: not a string
    json.dumps({"_id": "", "text": "x"}),           # 4: empty id
    json.dumps({"_id": "a", "text": "again"}),      # 5: duplicate id
    "{not json",                                     # 6
    json.dumps({"text": "no id"}),                  # 7
    json.dumps({"_id": 8, "text": "an int id is its decimal string"}),
]
MORE_BAD_LINES = [
    json.dumps({"_id": None, "text": "x"}),
    json.dumps({"_id": "n", "text": None}),
    '{"_id": "big", "text": "x", "views": 1' + "0" * 4300 + "}",  # past Python's int-from-text limit
    "\x0c",  # not JSON's whitespace: not a blank line (it was skipped)
]


@pytest.mark.parametrize(("bad", "message"), [
    (1, "missing text field 'text'"),
    (2, "text field 'text' is int, not a string"),
    (3, "empty id"),
    (4, "duplicate id 'a'"),
    (5, "not valid JSON"),
    (6, "missing id field '_id'"),
    (-1, "id field '_id' is null"),
    (-2, "text field 'text' is null"),
    (-3, "not valid JSON here: Exceeds the limit (4300 digits) for integer string conversion"),
    (-4, "not valid JSON"),
])
def test_bad_row_is_named(tiny_bert, tmp_path, capsys, bad: int, message: str) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "c.jsonl"
    src.write_text(BAD_LINES[0] + "\n" + (BAD_LINES[bad] if bad > 0 else MORE_BAD_LINES[-bad - 1]) + "\n")
    assert main(["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "o")]) == 2
    assert f"{src}:2: {message}" in capsys.readouterr().err


def test_skip_bad_writes_side_file(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n")
    out = tmp_path / "out"
    summary = embed_corpus(model, src, out, BulkOptions(skip_bad=True))
    assert summary.texts == 2 and summary.bad == 6
    ids, _, _ = read_output(out)
    assert sorted(ids) == ["8", "a"]
    bad = [json.loads(line) for line in (out / bulk.BAD_ROWS_NAME).read_text().splitlines()]
    assert [b["row"].rsplit(":", 1)[1] for b in bad] == ["2", "3", "4", "5", "6", "7"]
    assert bad[3] == {"row": f"{src}:5", "id": "a", "problem": "duplicate id 'a'"}


def test_undecodable_and_surrogate_rows_are_named_and_skippable(model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "c.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"_id": "a", "text": "first, after a byte order mark"}\n'
                    b'{"_id": "b", "text": "be\xfft"}\n'
                    b'{"_id": "c\\udc00", "text": "an id no Parquet file can hold"}\n'
                    b'{"_id": "d", "text": "last"}\n')
    assert main(["embed", str(model.path), str(src), "-o", str(tmp_path / "o")]) == 2
    assert f"{src}:2: not UTF-8 (byte 0xff at column 25)" in capsys.readouterr().err
    summary = embed_corpus(model, src, tmp_path / "o", BulkOptions(skip_bad=True))  # the failed run did nothing
    assert summary.texts == 2 and summary.bad == 2
    assert sorted(read_output(tmp_path / "o")[0]) == ["a", "d"]
    bad = [json.loads(line) for line in (tmp_path / "o" / bulk.BAD_ROWS_NAME).read_text().splitlines()]
    assert [b["row"] for b in bad] == [f"{src}:2", f"{src}:3"] and "lone surrogate" in bad[1]["problem"]
    # Excel's "CSV UTF-8": a byte order mark before the header; a bad byte makes its row bad
    csv_src = tmp_path / "c.csv"
    csv_src.write_bytes(b"\xef\xbb\xbf_id,text\r\nx,first\r\ny,be\xfft\r\n")
    summary = embed_corpus(model, csv_src, tmp_path / "csv", BulkOptions(skip_bad=True))
    assert summary.texts == 1 and summary.bad == 1


def test_lone_cr_ends_a_jsonl_line_and_two_runs_cannot_share_a_folder(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import fcntl

    src = tmp_path / "c.jsonl"
    src.write_bytes(b'{"_id": "a", "text": "one"}\r{"_id": "b", "text": "two"}\r\n{"_id": "c", "text": 3}\n')
    with pytest.raises(bulk.BadRowError, match=r"c\.jsonl:3: text field"):
        embed_corpus(model, src, tmp_path / "o")
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running job holds
        with pytest.raises(ResumeError, match="another run of embedrt embed is writing to this folder"):
            embed_corpus(model, src, out)
    finally:
        os.close(fd)


def test_a_job_that_did_nothing_is_not_another_job(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "c.csv"
    src.write_text("id,text\n1,hello\n")
    with pytest.raises(bulk.InputFileError, match="lacks '_id'"):
        embed_corpus(model, src, tmp_path / "o")
    assert embed_corpus(model, src, tmp_path / "o", BulkOptions(id_field="id")).texts == 1
    with pytest.raises(ValueError, match="part_rows must be >= 1"):
        BulkOptions(part_rows=-1)


def test_an_input_without_rows_gives_a_dataset_with_its_schema(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "c.jsonl"
    src.write_text("\n")
    assert embed_corpus(model, src, tmp_path / "o").texts == 0
    table = pq.read_table(tmp_path / "o")
    assert table.num_rows == 0 and table.schema.names == ["id", "embedding"]
    assert json.loads(table.schema.metadata[b"embedrt"])["dim"] == model.dim


def test_an_edited_manifest_is_another_model(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert[1], folder)
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(30))
    embed_corpus(embedrt.load(folder), src, tmp_path / "o", BulkOptions(part_rows=10))
    state = json.loads((tmp_path / "o" / bulk.STATE_NAME).read_text())
    state["progress"].update(complete=False)
    (tmp_path / "o" / bulk.STATE_NAME).write_text(json.dumps(state))
    manifest = json.loads((folder / "embedrt.json").read_text())
    manifest["max_seq_length"] = 8
    (folder / "embedrt.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeError, match=r"model\.manifest_sha256"):
        embed_corpus(embedrt.load(folder), src, tmp_path / "o", BulkOptions(part_rows=10))


def test_a_full_disk_names_the_part_and_leaves_nothing(model, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import errno

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        Path(args[1]).write_bytes(b"half a part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(5))
    assert main(["embed", str(model.path), str(src), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "part-000000.parquet: cannot write: No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [bulk.STATE_NAME]


def test_idset_finds_duplicates_across_merges() -> None:
    seen = IdSet(pending_max=7)
    ids = [f"id-{i}" for i in range(100)]
    assert all(seen.add(i) for i in ids) and len(seen) == 100
    assert not any(seen.add(i) for i in reversed(ids))
    assert seen.add("new") and not seen.add("new")


def test_bulk_modules_import_no_heavy_packages() -> None:
    code = "import sys, embedrt.bulk, embedrt.ray; print([m for m in ('pyarrow', 'ray', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_huge_part_rows_takes_memory_for_the_rows_only(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The part buffer was sized from --part-rows up front: 20,000,000 rows asked numpy for 29 GiB for 3 texts."""
    rows = make_rows(2500, seed=11)
    out = tmp_path / "out"
    summary = embed_corpus(model, write_jsonl(tmp_path / "c.jsonl", rows), out, BulkOptions(part_rows=2**40))
    assert summary.texts == 2500 and summary.parts == 1
    assert_equals_encode(out, model, rows)


def test_resume_over_a_damaged_part_or_a_full_disk_names_the_file(model, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A truncated part gave "Parquet magic bytes not found" naming no file; another schema an IndexError."""
    rows = make_rows(1000, seed=12)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    # the fresh-job record and part 0 recorded, then killed
    killed_at_progress_write(3, monkeypatch, lambda: embed_corpus(model, src, out, BulkOptions(part_rows=300)))
    part = out / "part-000000.parquet"
    good = part.read_bytes()
    for damage in (good[: len(good) // 2], {"other": [1, 2]}, {"id": [1, 2]}):
        if isinstance(damage, dict):
            pq.write_table(pa.table(damage), part)
        else:
            part.write_bytes(damage)
        with pytest.raises(ResumeError, match=r"part-000000\.parquet: a part this job recorded cannot be read back"):
            embed_corpus(model, src, out, BulkOptions(part_rows=300))
    part.write_bytes(good)

    def disk_full(path: Path, data: dict) -> None:  # type: ignore[type-arg]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bulk, "write_json_atomic", disk_full)
    with pytest.raises(OutputPathError, match=r"_embedrt_bulk\.json: cannot write: No space left on device"):
        embed_corpus(model, src, out, BulkOptions(part_rows=300))


def test_a_job_stopped_at_a_bad_row_goes_on_past_it_with_skip_bad(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = make_rows(60)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:45]) + '{"_id": "bad", "text": 7}\n'
                   + "".join(json.dumps(r) + "\n" for r in rows[45:]))
    out = tmp_path / "out"
    with pytest.raises(BadRowError, match=r"c\.jsonl:46: text field 'text' is int"):
        embed_corpus(model, src, out, BulkOptions(part_rows=20))
    state = json.loads((out / bulk.STATE_NAME).read_text())
    assert state["progress"]["parts"] == 2 and state["progress"]["input_rows"] == 40
    state["job"]["options"]["skip_bad"] = False  # as job states before 2026-12-07 recorded it
    (out / bulk.STATE_NAME).write_text(json.dumps(state))
    summary = embed_corpus(model, src, out, BulkOptions(part_rows=20, skip_bad=True))
    assert summary.complete and summary.texts == 60 and summary.bad == 1 and summary.resumed_texts == 40
    assert_equals_encode(out, model, rows)
    assert [json.loads(line)["row"] for line in (out / bulk.BAD_ROWS_NAME).read_text().splitlines()] == [f"{src}:46"]


def test_a_skip_bad_job_with_nothing_to_embed_fails(model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A wrong --id-field makes every row bad: with --skip-bad that was a 'successful' empty dataset (exit 0)."""
    rows = [{"id": r["_id"], "text": r["text"]} for r in make_rows(bulk.WRONG_FIELD_ROWS + 300)]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    assert main(["embed", str(model.path), str(src), "-o", str(out), "--skip-bad"]) == 2
    err = capsys.readouterr().err
    assert f"the first {bulk.WRONG_FIELD_ROWS} rows all lack the id field '_id' and none could be embedded" in err
    assert "check --id-field '_id' and --field 'text'" in err
    # it stopped there, not after writing a bad row for each of the input's rows
    assert len((out / bulk.BAD_ROWS_NAME).read_text().splitlines()) == bulk.WRONG_FIELD_ROWS
    assert not list(out.glob("part-*"))
    # nothing was recorded: the rerun with the right field starts afresh, and leaves no bad-rows file
    summary = embed_corpus(model, src, out, BulkOptions(id_field="id", skip_bad=True))
    assert summary.texts == len(rows) and summary.bad == 0 and not (out / bulk.BAD_ROWS_NAME).exists()
    # a short input of nothing but bad rows (of any kind) fails at its end; no field is blamed
    short = tmp_path / "short.jsonl"
    short.write_text('{"_id": "a", "text": 1}\n{"_id": "b", "text": null}\n')
    with pytest.raises(BadRowError, match=r"all 2 rows are bad and none could be embedded \(the first: "
                       r".*short\.jsonl:1: text field 'text' is int, not a string\)") as info:
        embed_corpus(model, short, tmp_path / "o2", BulkOptions(skip_bad=True))
    assert "--id-field" not in str(info.value)
    # one good row among them is a job
    short.write_text('{"_id": "a", "text": 1}\n{"_id": "b", "text": "fine"}\n')
    assert embed_corpus(model, short, tmp_path / "o3", BulkOptions(skip_bad=True)).texts == 1
    # rows that leave a null text out (as Spark writes JSON) do not stop the job early, however many lead
    sparse = tmp_path / "sparse.jsonl"
    sparse.write_text("".join(f'{{"_id": "e{i}"}}\n' for i in range(bulk.WRONG_FIELD_ROWS + 10))
                      + '{"_id": "x", "text": "kept"}\n')
    summary = embed_corpus(model, sparse, tmp_path / "o4", BulkOptions(skip_bad=True))
    assert summary.texts == 1 and summary.bad == bulk.WRONG_FIELD_ROWS + 10
    # at the end, a whole input of rows missing a field points at the field options
    sparse.write_text('{"_id": "a"}\n{"_id": "b"}\n')
    with pytest.raises(BadRowError, match=r"all 2 rows are bad .* check --id-field '_id' and --field 'text'"):
        embed_corpus(model, sparse, tmp_path / "o5", BulkOptions(skip_bad=True))


def test_a_lone_cr_in_a_tsv_text_is_text(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The csv module ends a row at a lone \\r: the text's first half was embedded, its second half a bad row."""
    src = tmp_path / "c.tsv"
    src.write_bytes(b"\xef\xbb\xbf_id\ttext\r\na\tone\rtwo\r\nb\tthree\n\nc\tbe\xfft\n")
    out = tmp_path / "out"
    summary = embed_corpus(model, src, out, BulkOptions(skip_bad=True))
    assert summary.texts == 2 and summary.bad == 1
    ids, emb, _ = read_output(out)
    assert ids == ["a", "b"]
    assert float(np.abs(emb - model.encode(["one\rtwo", "three"])).max()) <= 1e-6
    bad = json.loads((out / bulk.BAD_ROWS_NAME).read_text())
    assert bad == {"row": f"{src}:5", "id": None, "problem": "not UTF-8 (byte 0xff at column 5)"}
    # a bad byte in the name of a column not read is no matter (the csv module's reading kept it too)
    (tmp_path / "h.tsv").write_bytes(b"_id\ttext\ta\xf1o\n1\tx\t2020\n")
    assert embed_corpus(model, tmp_path / "h.tsv", tmp_path / "o2").texts == 1


def test_a_tsv_job_from_before_lone_cr_was_text_resumes_only_where_rows_count_alike(model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its rows were counted by the csv module, which ended a row at a lone \\r: skipping that many rows now
    would lose one, unnoticed."""
    for lone_cr in (False, True):
        src = tmp_path / f"c{int(lone_cr)}.tsv"
        first = "a\tone\rtwo" if lone_cr else "a\tone two"
        src.write_text("_id\ttext\n" + first + "\n" + "".join(f"r{i}\ttext {i}\n" for i in range(1, 8))
                       + "bad\tx\ty\n" + "r9\tlast\n", newline="")
        out = tmp_path / f"o{int(lone_cr)}"
        with pytest.raises(BadRowError, match="3 fields"):
            embed_corpus(model, src, out, BulkOptions(part_rows=3))
        state = json.loads((out / bulk.STATE_NAME).read_text())
        assert state["job"]["input"].pop("rows") == "lines"  # as states before 2026-12-07 were written
        (out / bulk.STATE_NAME).write_text(json.dumps(state))
        if lone_cr:
            with pytest.raises(ResumeError, match=r"ended a row at a lone \\r, which this file holds"):
                embed_corpus(model, src, out, BulkOptions(part_rows=3, skip_bad=True))
        else:
            summary = embed_corpus(model, src, out, BulkOptions(part_rows=3, skip_bad=True))
            assert summary.texts == 9 and summary.bad == 1 and summary.resumed_texts == 6
            assert sorted(read_output(out)[0]) == sorted(["a"] + [f"r{i}" for i in range(1, 8)] + ["r9"])
