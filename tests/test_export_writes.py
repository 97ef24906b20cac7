"""Each file of an export is written once: the graphs, the tokenizer, and the manifest (built in memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedrt.export import export_model

from .writes import WriteLog, recording


def published_and_scratch(log: WriteLog) -> tuple[dict[str, int], dict[str, int]]:
    """The writes into the folder that was published (``<work>/model``) and into the work folder's scratch."""
    work = {key.split("/", 1)[0] for key in log.counts if ".tmp-" in key.split("/", 1)[0]}
    assert len(work) == 1, log.counts
    (name,) = work
    return log.under(f"{name}/model"), log.under(f"{name}/scratch")


def assert_written_once(log: WriteLog, out: Path) -> dict[str, int]:
    """Every file below the recorded root written once, and the published folder exactly the files of ``out``."""
    published, _scratch = published_and_scratch(log)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(published)
    assert {k: n for k, n in log.counts.items() if n != 1} == {}, log.counts
    return published


def test_fp32_export_writes_each_file_once(tiny_bert, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with recording(tmp_path, monkeypatch) as log:
        out = export_model(str(tiny_bert[0]), tmp_path / "fp32", formats="onnx,openvino")
    published = assert_written_once(log, out)
    expected = {"embedrt.json", "model.onnx", "openvino_model.xml", "openvino_model.bin", "tokenizer.json"}
    assert expected <= set(published)


def test_the_recorder_sees_a_second_write(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from embedrt.manifest import write_json_atomic

    with recording(tmp_path, monkeypatch) as log:
        write_json_atomic(tmp_path / "a.json", {})
        (tmp_path / "b.bin").write_bytes(b"x")
        write_json_atomic(tmp_path / "a.json", {"again": True})
    assert log.counts == {"a.json": 2, "b.bin": 1}
    with pytest.raises(AssertionError):
        assert {k: n for k, n in log.counts.items() if n != 1} == {}
