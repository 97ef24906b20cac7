"""embedrt embed --ray / embedrt.ray on a local Ray cluster: same output as local mode, survives a killed actor."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import embedrt
from embedrt import bulk
from embedrt.bulk import BadRowError, BulkOptions, EmbedDtype, ResumeError, embed_corpus
from embedrt.cli import main
from embedrt.textio import InputFileError

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
psutil = pytest.importorskip("psutil")

from tests.test_bulk import assert_equals_encode, make_rows, read_output, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    """A two-CPU local Ray for this module, stopped afterwards."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_bert) -> embedrt.EmbeddingModel:  # type: ignore[no-untyped-def]
    return embedrt.load(tiny_bert[1], device="auto:cpu")  # where the Ray actors run


def test_ray_output_equals_local(cluster, tiny_bert, model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    rows = make_rows(3000, seed=5)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    assert main(["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "ray"), "--ray"]) == 0
    assert "3000 texts" in capsys.readouterr().out
    embed_corpus(model, src, tmp_path / "local", BulkOptions(part_rows=1000))
    assert_equals_encode(tmp_path / "ray", model, rows)
    ray_ids, ray_emb, ray_table = read_output(tmp_path / "ray")
    local_ids, local_emb, local_table = read_output(tmp_path / "local")
    assert ray_table.schema == local_table.schema  # same columns, types and metadata
    assert ray_ids == local_ids == [r["_id"] for r in rows]  # in input order, as local mode writes them
    assert len(list((tmp_path / "ray").glob("part-*.parquet"))) > 1  # (over several parts)
    assert float(np.abs(ray_emb - local_emb).max()) <= 1e-6
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]  # the staging folder is gone
    state = json.loads((tmp_path / "ray" / "_embedrt_bulk.json").read_text())
    assert state["progress"]["complete"] and state["job"]["options"]["mode"] == "ray"


def test_embed_dataset_blocks_are_compact(cluster, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    from embedrt.ray import embed_dataset

    rows = make_rows(100, seed=6)
    out = embed_dataset(ray.data.from_items(rows), tiny_bert[1], num_actors=1, batch_rows=32).materialize()
    assert out.count() == 100
    for ref in out.to_arrow_refs():
        block = ray.get(ref)
        assert block.schema.field("embedding").type == pa.list_(pa.float32(), 32)
        assert json.loads(block.schema.metadata[b"embedrt"])["dim"] == 32


def test_ray_bad_and_duplicate_rows_stop_the_job(cluster, tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.ray import embed_with_ray

    rows = make_rows(20)
    rows[7]["_id"] = rows[3]["_id"]
    src = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(BadRowError, match="duplicate id 'd3'"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing published, no staging left: the folder is as it was
    rows = make_rows(20)
    rows[4]["_id"] = ""
    src = write_jsonl(tmp_path / "empty.jsonl", rows)
    # the actor's BadRowError, not Ray's wrapping of it, so the CLI says which row and exits 2
    with pytest.raises(BadRowError, match=r"empty\.jsonl:5: empty id"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "out"), "--ray"]) == 2
    (tmp_path / "out").mkdir()  # an empty folder that was there is left there
    with pytest.raises(BadRowError):
        embed_with_ray(tiny_bert[1], src, tmp_path / "out")
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())
    # another run writing to the folder (a local one holds this lock): refused, not written beside or over
    with bulk.exclusive(tmp_path / "out"), pytest.raises(ResumeError, match="another run of embedrt embed"):
        embed_with_ray(tiny_bert[1], write_jsonl(tmp_path / "good.jsonl", make_rows(5)), tmp_path / "out")
    (tmp_path / "out" / ".ray-0123").mkdir()  # what a killed driver leaves
    with pytest.raises(ResumeError, match="staging folder of a Ray job that was interrupted"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "out")
    (tmp_path / "out" / "other").touch()
    with pytest.raises(ResumeError, match="not empty"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "out")
    with pytest.raises(ValueError, match="--skip-bad is not supported with --ray"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "out3", BulkOptions(skip_bad=True))


def test_ray_refuses_what_it_would_ignore_or_never_schedule(cluster, tiny_bert, tmp_path, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    """--part-rows on Ray and --actors without it were taken and ignored; --threads above every node's CPUs
    gave an actor Ray could never place, and a job that waited forever."""
    from embedrt.ray import _check_actor_fits, embed_with_ray

    src = write_jsonl(tmp_path / "c.jsonl", make_rows(5))
    with pytest.raises(ValueError, match="--part-rows is not supported with --ray"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "o1", BulkOptions(part_rows=100))
    assert main(["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "o2"), "--actors", "2"]) == 2
    assert "--actors applies to --ray only" in capsys.readouterr().err
    _check_actor_fits(ray, 2, local=True)  # this module's Ray has 2 CPUs
    with pytest.raises(ValueError, match=r"--threads 3: .* the largest node of this Ray has 2; no actor could start"):
        _check_actor_fits(ray, 3, local=True)
    _check_actor_fits(ray, 3, local=False)  # a cluster's autoscaler may add a node that large: a warning
    assert "waits until a node that large joins" in caplog.text


def test_ray_actors_take_the_load_settings_given(cluster, tiny_bert, model, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--openvino-cache-dir, --hint, --no-huge-pages and --allow-fallback were taken with --ray and ignored."""
    from embedrt.ray import embed_dataset

    rows = make_rows(40, seed=3)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    cache = tmp_path / "ov-cache"
    args = ["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "out"), "--ray", "--device", "openvino",
            "--openvino-cache-dir", str(cache), "--hint", "throughput", "--no-huge-pages", "--allow-fallback"]
    assert main(args) == 0, capsys.readouterr().err
    assert cache.is_dir() and any(cache.iterdir())  # the actors compiled into it (the driver loads without it)
    ov = embedrt.load(tiny_bert[1], device="openvino")
    assert_equals_encode(tmp_path / "out", ov, rows)
    with pytest.raises(ValueError, match=r"load_options takes allow_fallback, .*; not device, threads"):
        embed_dataset(ray.data.from_items([{"_id": "a", "text": "b"}]), tiny_bert[1],
                      load_options={"device": "cpu", "threads": 2})
    # OpenVINO's settings where the actors run ONNX Runtime: dropped with a warning where auto or a fallback
    # chose it (every actor refused them, and the job failed), refused where the device asked for is the CPU
    args = ["embed", str(tiny_bert[1]), str(src), "-o", str(tmp_path / "cpu"), "--ray", "--device", "cpu",
            "--hint", "throughput"]
    assert main(args) == 2
    assert "performance_hint='throughput': OpenVINO only, but device='cpu' runs ONNX Runtime" in capsys.readouterr().err
    from embedrt.ray import _drop_unused

    for asked in ("auto:cpu", "openvino"):
        options = {"performance_hint": "latency", "openvino_cache_dir": "/c", "huge_pages": False}
        _drop_unused(options, "m", asked, "cpu")
        assert options == {"huge_pages": False}
        options = {"performance_hint": "latency"}
        _drop_unused(options, "m", asked, "openvino:CPU")
        assert options == {"performance_hint": "latency"}


def test_ray_reads_jsonl_csv_and_tsv_as_local_mode_does(cluster, tiny_bert, model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ray's read_json (pandas) made the id "007" 7 and dropped the title "2020"; a BOM failed the job."""
    from embedrt.ray import embed_with_ray

    rows = make_rows(40, seed=9)
    rows[0].update(_id="007", title="2020")
    rows[1].update(_id="7", text="0123")
    rows[2].update(_id="1e3", title="1999", text="42")
    rows[3]["text"] = '"Hello," he said'
    src = tmp_path / "c.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "c.tsv").write_text("_id\ttitle\ttext\n" + "".join(
        f"{r['_id']}\t{r['title']}\t{r['text']}\n" for r in rows))
    for name in ("c.jsonl", "c.tsv"):
        embed_with_ray(tiny_bert[1], tmp_path / name, tmp_path / f"ray-{name}")
        embed_corpus(model, tmp_path / name, tmp_path / f"local-{name}")
        ray_ids, ray_emb, _ = read_output(tmp_path / f"ray-{name}")
        local_ids, local_emb, _ = read_output(tmp_path / f"local-{name}")
        assert sorted(ray_ids) == sorted(local_ids) == sorted(r["_id"] for r in rows)
        by_id = dict(zip(local_ids, local_emb))
        assert float(max(np.abs(e - by_id[i]).max() for i, e in zip(ray_ids, ray_emb))) <= 1e-6
    # a prompt reaches the actors (their tokenize_batch), as it does local mode's
    prompted = BulkOptions(prompt="query: ")
    embed_with_ray(tiny_bert[1], tmp_path / "c.tsv", tmp_path / "ray-prompted", prompted)
    embed_corpus(model, tmp_path / "c.tsv", tmp_path / "local-prompted", prompted)
    ray_ids, ray_emb, _ = read_output(tmp_path / "ray-prompted")
    local_ids, local_emb, _ = read_output(tmp_path / "local-prompted")
    by_id = dict(zip(local_ids, local_emb))
    assert float(max(np.abs(e - by_id[i]).max() for i, e in zip(ray_ids, ray_emb))) <= 1e-6
    plain = dict(zip(*read_output(tmp_path / "local-c.tsv")[:2]))
    assert min(float(np.dot(by_id[i], plain[i])) for i in plain) < 0.9999  # (normalised) the prompt counted
    # half a UTF-16 pair, escaped: U+FFFD, as local mode embeds it (Arrow could not hold it: a Ray traceback)
    src.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "bad \\ud800 half"}\n')
    embed_with_ray(tiny_bert[1], src, tmp_path / "ray-surrogate")
    embed_corpus(model, src, tmp_path / "local-surrogate")
    ray_ids, ray_emb, _ = read_output(tmp_path / "ray-surrogate")
    local_ids, local_emb, _ = read_output(tmp_path / "local-surrogate")
    assert sorted(ray_ids) == local_ids == ["a", "b"]
    assert np.abs(ray_emb[ray_ids.index("b")] - local_emb[1]).max() <= 1e-6
    assert np.abs(local_emb[1] - model.encode(["bad \ufffd half"])[0]).max() <= 1e-6
    src.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y\xff"}\n')
    with pytest.raises(BadRowError, match=r"c\.jsonl:2: not UTF-8 \(byte 0xff at column 24\)"):
        embed_with_ray(tiny_bert[1], src, tmp_path / "bad")
    (tmp_path / "q.csv").write_text('_id,text\n1,fine\n2,"unclosed\n3,c\n')
    with pytest.raises(InputFileError, match=r"q\.csv:3: not a valid CSV row"):
        embed_with_ray(tiny_bert[1], tmp_path / "q.csv", tmp_path / "bad2")


def test_ray_reads_parquet_with_every_cpu_in_the_pool(cluster, tiny_bert, model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ray 2.60's read_parquet lists files in a task that needs a CPU the actor pool already holds: a hang."""
    from embedrt.ray import embed_with_ray

    pq = pytest.importorskip("pyarrow.parquet")
    rows = make_rows(300, seed=8)
    src = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=70)
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(summary=embed_with_ray(tiny_bert[1], src, tmp_path / "o")),
                              daemon=True)
    worker.start()
    worker.join(240)
    assert not worker.is_alive(), "the Ray job on a Parquet input did not finish"
    assert_equals_encode(tmp_path / "o", model, rows)


def test_ray_on_an_empty_input_writes_the_schema(cluster, tiny_bert, model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.ray import embed_with_ray

    src = tmp_path / "empty.jsonl"
    src.write_text("")
    summary = embed_with_ray(tiny_bert[1], src, tmp_path / "o")
    assert summary.texts == 0 and summary.complete
    table = pytest.importorskip("pyarrow.parquet").read_table(tmp_path / "o")
    assert table.num_rows == 0 and table.schema.field("embedding").type == pa.list_(pa.float32(), model.dim)
    assert b"embedrt" in table.schema.metadata
    embed_with_ray(tiny_bert[1], src, tmp_path / "f16", BulkOptions(dtype=EmbedDtype.FLOAT16))
    table = pytest.importorskip("pyarrow.parquet").read_table(tmp_path / "f16")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), model.dim)


def test_ray_publish_that_fails_partway_leaves_the_folder_usable(cluster, tiny_bert, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import embedrt.ray

    real = os.replace

    def move_then_fail(src, dst):  # type: ignore[no-untyped-def]
        real(src, dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedrt.ray.os, "replace", move_then_fail)
    src = write_jsonl(tmp_path / "c.jsonl", make_rows(40))
    with pytest.raises(OSError, match="No space left"):
        embedrt.ray.embed_with_ray(tiny_bert[1], src, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # neither the moved part nor the staging folder; the folder it made


def _embed_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "EmbedBatch" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_killed_actor_still_gives_complete_output(cluster, tiny_bert, model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.ray import embed_with_ray

    rows = make_rows(16000, seed=7)
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    killed: list[int] = []
    done = threading.Event()

    def kill_one_actor_mid_job() -> None:
        # wait until Ray has written output for some batch (the job is under way), then SIGKILL an actor
        while not done.is_set():
            if any(out.glob(".ray-*/*.parquet")):
                workers = _embed_workers()
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    killed.append(workers[0].pid)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_actor_mid_job)
    killer.start()
    try:
        summary = embed_with_ray(tiny_bert[1], src, out)
    finally:
        done.set()
        killer.join()
    assert killed, "no actor was killed before the job ended"
    assert summary.texts == 16000
    assert_equals_encode(out, model, rows)


SIGTERM_DURING_PUBLISH = """
import sys, time
from pathlib import Path
import embedrt.ray
from embedrt.cli import main

def publish_slowly(staging, *args):
    assert any(staging.iterdir())  # Ray's files are in the staging folder
    Path(sys.argv[1]).write_text("publishing")
    time.sleep(120)

embedrt.ray._publish = publish_slowly
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_a_ray_job_it_started_cleans_up(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ray.init makes SIGTERM sys.exit(15): the job's staging folder was left behind, and the exit code was Ray's."""
    import subprocess
    import sys

    src = write_jsonl(tmp_path / "c.jsonl", make_rows(40))
    ready, out = tmp_path / "ready", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_DURING_PUBLISH, str(ready), "embed", str(tiny_bert[1]),
                             str(src), "-o", str(out), "--ray", "--actors", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), proc.communicate(timeout=60)
        assert [p.name for p in out.iterdir() if p.name.startswith(".ray-")]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "embedrt embed: terminated (SIGTERM)" in err
    assert not out.exists()  # no staging folder, no part, not the folder the job made: a rerun may use the path
