"""The runtime's contract: shapes, order, bad input, broken folders, torch-free imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import embedrt
from embedrt.errors import ModelFolderError


@pytest.fixture()
def bert_folder(tiny_bert, tmp_path):  # type: ignore[no-untyped-def]
    """A private copy of the tiny BERT model folder that a test may break."""
    return shutil.copytree(tiny_bert[1], tmp_path / "model")


def test_empty_list_gives_zero_rows(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    out = model.encode([])
    assert out.shape == (0, model.dim) and out.dtype == np.float32


def test_non_str_item_names_its_index(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        model.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="single str"):
        model.encode("a bare string")
    # these said "'NoneType' object is not iterable", or "texts[0] is int" for bytes iterated as ints
    for bad, name in ((None, "NoneType"), (5, "int"), (3.5, "float"), (bytearray(b"hi"), "bytearray"),
                      (memoryview(b"hi"), "memoryview"), (b"hi", "bytes")):
        with pytest.raises(TypeError, match=rf"^texts must be a sequence of str.*not {name}"):
            model.encode(bad)


def test_order_is_restored_and_batching_does_not_change_results(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    texts = ["short", "a much longer text " * 20, "", "medium length text here", "x " * 300]
    one_by_one = np.stack([model.encode([t])[0] for t in texts])
    for batch_size in (1, 2, 32):
        np.testing.assert_allclose(model.encode(texts, batch_size=batch_size), one_by_one, atol=2e-6)
    np.testing.assert_allclose(model.encode(texts, max_tokens=64), one_by_one, atol=2e-6)
    reversed_out = model.encode(texts[::-1])
    np.testing.assert_allclose(reversed_out[::-1], one_by_one, atol=2e-6)


def test_model_similarity_defaults_to_checkpoint_function(stand_in_factory) -> None:  # type: ignore[no-untyped-def]
    from embedrt.export.synthetic import seed_stand_in

    _, folder = stand_in_factory(seed_stand_in("msmarco-distilbert-base-dot-v4"))
    model = embedrt.load(folder)
    assert model.similarity_metric is embedrt.Similarity.DOT
    emb = model.encode(["a", "b"])
    np.testing.assert_allclose(model.similarity(emb, emb), emb @ emb.T, rtol=1e-5)
    _idx, scores = model.search(["a"], emb, k=2)
    np.testing.assert_allclose(scores[0], np.sort(emb @ emb[0])[::-1], rtol=1e-5)


def test_missing_folder_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelFolderError, match="nowhere"):
        embedrt.load(tmp_path / "nowhere")


def test_missing_manifest_is_named(bert_folder) -> None:  # type: ignore[no-untyped-def]
    (bert_folder / "embedrt.json").unlink()
    with pytest.raises(ModelFolderError, match=r"embedrt\.json: manifest missing"):
        embedrt.load(bert_folder)


# the graph files are checked by the load that reads them (device="cpu": model.onnx; "openvino": the IR)
@pytest.mark.parametrize(("name", "device"), [("model.onnx", "cpu"), ("tokenizer.json", "auto"),
                                              ("openvino_model.xml", "openvino"), ("openvino_model.bin", "openvino")])
def test_missing_file_is_named(bert_folder, name: str, device: str) -> None:  # type: ignore[no-untyped-def]
    (bert_folder / name).unlink()
    with pytest.raises(ModelFolderError, match=rf"{name}: file missing"):
        embedrt.load(bert_folder, device=device)


@pytest.mark.parametrize(("name", "device"), [("model.onnx", "cpu"), ("openvino_model.bin", "openvino")])
def test_truncated_graph_is_named(bert_folder, name: str, device: str) -> None:  # type: ignore[no-untyped-def]
    path = bert_folder / name
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match=rf"{name}: corrupt or truncated"):
        embedrt.load(bert_folder, device=device)


# verify hashes every file, also the graph this device does not read
@pytest.mark.parametrize(("name", "device"), [("model.onnx", "cpu"), ("openvino_model.bin", "openvino"),
                                              ("model.onnx", "openvino"), ("openvino_model.bin", "cpu")])
def test_same_size_corruption_is_caught_by_verify(bert_folder, name: str, device: str) -> None:  # type: ignore[no-untyped-def]
    path = bert_folder / name
    data = bytearray(path.read_bytes())
    data[-100:] = b"\x00" * 100
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=rf"{name}: sha256 does not match"):
        embedrt.load(bert_folder, device=device, verify=True)


def test_bad_manifest_fields_are_named(bert_folder) -> None:  # type: ignore[no-untyped-def]
    path = bert_folder / "embedrt.json"
    data = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ModelFolderError, match="cannot read manifest"):
        embedrt.load(bert_folder)
    path.write_text(json.dumps({**data, "pooling": "weird"}))
    with pytest.raises(ModelFolderError, match="unknown pooling 'weird'; valid: mean, cls, max, mean_sqrt_len"):
        embedrt.load(bert_folder)
    del data["max_seq_length"]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="field 'max_seq_length' missing"):
        embedrt.load(bert_folder)


def test_runtime_never_imports_torch_or_transformers(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    code = textwrap.dedent(
        f"""
        import sys, embedrt
        m = embedrt.load({str(tiny_bert[1])!r}, device="cpu")
        m.encode(["hello", "world"])
        m2 = embedrt.load({str(tiny_bert[1])!r}, device="openvino")
        m2.encode(["hello"])
        embedrt.top_k(m.encode(["a"]), m.encode(["b", "c"]), k=1)
        heavy = [name for name in ("torch", "transformers", "sentence_transformers") if name in sys.modules]
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_import_embedrt_stays_light() -> None:
    """``import embedrt`` loads numpy only: the server's and bulk modules' dependencies load when they are used."""
    heavy = ("torch", "transformers", "sentence_transformers", "onnx", "onnxruntime", "tokenizers", "openvino",
             "starlette", "uvicorn", "ray", "pyarrow")
    code = f"import sys, embedrt, embedrt.plan; print('HEAVY', [m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_no_usage_data_leaves_a_process_running_embedrt(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime 1.31's Linux wheel keeps a device id and an event cache for Microsoft's collector under
    ~/.cache/Microsoft/DeveloperTools/ unless ORT_DISABLE_TELEMETRY is set before it starts; a user's own
    setting of it wins."""
    code = textwrap.dedent(
        f"""
        import os, embedrt
        m = embedrt.load({str(tiny_bert[1])!r}, device="cpu")
        m.encode(["hello"])
        print("SETTING", os.environ["ORT_DISABLE_TELEMETRY"])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # (this process set it)
    for given, want in ((None, "1"), ("0", "0")):
        home = tmp_path / f"home-{given}"
        home.mkdir()
        run_env = {**env, "HOME": str(home), **({"ORT_DISABLE_TELEMETRY": given} if given else {})}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=run_env)
        assert f"SETTING {want}" in out.stdout, out.stdout + out.stderr
        if given is None:
            assert not list(home.rglob("*")), sorted(map(str, home.rglob("*")))


def test_openvino_buckets_padding_without_changing_results(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    ov = embedrt.load(tiny_bert[1], device="openvino", inference_precision="f32")
    cpu = embedrt.load(tiny_bert[1], device="cpu")
    padded = ov.padded_lengths(np.array([17, 64, 65, 250, 300, 510, 3, 900]))
    assert padded.tolist() == [24, 64, 80, 256, 320, 512, 8, 900]
    assert cpu.padded_lengths(np.array([17, 510])).tolist() == [17, 510]
    texts = ["a", "b c d e f g h i j k l m n o p q r s", "word " * 600]
    np.testing.assert_allclose(ov.encode(texts), cpu.encode(texts), atol=1e-5)


def test_encode_tokens_equals_encode_and_names_bad_rows(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    texts = ["short", "a much longer text " * 200, "", "medium length text here"]
    batch = model.tokenize_batch(texts)
    assert batch.truncated.tolist() == [False, True, False, False]
    assert [len(x) for x in batch.ids] == [len(x) for x in model.tokenize(texts)]
    assert batch.lengths.max() == model.manifest.max_seq_length
    np.testing.assert_array_equal(model.encode_tokens(batch.ids), model.encode(texts))
    np.testing.assert_array_equal(model.encode_tokens([list(map(int, x)) for x in batch.ids], batch_size=1),
                                  model.encode(texts, batch_size=1))
    vocab = model.tokenize_batch(["x"]).ids[0].max() + 10**6
    with pytest.raises(ValueError, match=r"token ids \[1\] holds an id outside"):
        model.encode_tokens([[1, 2], [1, int(vocab)]])
    for row in ([1, 2**64], [2**63, 5]):  # were "not a flat list of int" (numpy: object, float64)
        with pytest.raises(ValueError, match=r"token ids \[0\] holds an id outside"):
            model.encode_tokens([row])
    with pytest.raises(ValueError, match=r"token ids \[0\] has 9999 ids"):
        model.encode_tokens([[1] * 9999])
    with pytest.raises(ValueError, match=r"token ids \[1\] is empty"):
        model.encode_tokens([[1], []])
    with pytest.raises(TypeError, match=r"token ids \[0\] is str"):
        model.encode_tokens(["abc"])
    with pytest.raises(TypeError, match=r"token ids \[0\] must be a flat list of int"):
        model.encode_tokens([[1.5, 2.0]])
    with pytest.raises(TypeError, match=r"token ids \[1\] holds a bool, not an int"):
        model.encode_tokens([[101, 102], [101, True, 102]])  # numpy alone would take True as id 1
