"""Bad checkpoints and failed parity: clear errors, nothing half-written left behind."""

from __future__ import annotations

import json
import shutil

import pytest

from embedrt.errors import ParityError, SourceError
from embedrt.export import export_model


@pytest.fixture()
def checkpoint(tiny_bert, tmp_path):  # type: ignore[no-untyped-def]
    return shutil.copytree(tiny_bert[0], tmp_path / "ckpt")


def test_unknown_module_is_an_error(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    modules = json.loads((checkpoint / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Weird", "type": "sentence_transformers.models.LSTM"})
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(SourceError, match=r"module 3 has type 'sentence_transformers\.models\.LSTM'"):
        export_model(str(checkpoint), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_pooling_lists_supported(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = checkpoint / "1_Pooling" / "config.json"
    path.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "weightedmean"}))
    with pytest.raises(SourceError, match="'weightedmean' is not supported; supported: cls, mean, max"):
        export_model(str(checkpoint), tmp_path / "out")


def test_not_a_sentence_transformers_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError, match=r"modules\.json: missing"):
        export_model(str(tmp_path / "plain"), tmp_path / "out")


def test_missing_local_folder_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceError, match="checkpoint folder not found"):
        export_model(str(tmp_path / "nope" / "model"), tmp_path / "out")


def test_uncached_hub_id_offline_names_the_id(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SourceError, match="cannot get 'someone/not-a-cached-model'"):
        export_model("someone/not-a-cached-model", tmp_path / "out")


def test_parity_failure_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import embedrt.export.graph as graph
    from embedrt.ops import Pooling

    real = graph.torch_pool
    monkeypatch.setattr(graph, "torch_pool", lambda h, m, mode: real(h, m, Pooling.CLS))  # a wrong graph
    with pytest.raises(ParityError) as info:
        export_model(str(checkpoint), tmp_path / "out")
    assert info.value.min_cosine < 0.99999 and "nothing was written" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary folder


def test_existing_output_needs_overwrite(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(str(checkpoint), tmp_path / "out")
