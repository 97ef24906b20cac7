"""Hostile callers: many threads on one model, inputs of any size or shape, manifests that lie about the graph."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedrt
from embedrt.errors import ModelFolderError

THREADS, CALLS = 8, 20


def _call_texts(thread: int, call: int) -> list[str]:
    """Different texts, counts and lengths per call, so that mixed-up rows cannot go unnoticed."""
    n = 1 + (thread * 7 + call * 3) % 5
    return [f"thread {thread} call {call} text {i} " + "word " * ((thread + call + i) % 40) for i in range(n)]


def _hammer(model: embedrt.EmbeddingModel) -> tuple[dict[tuple[int, int], np.ndarray], list[BaseException]]:
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        start.wait()
        for c in range(CALLS):
            try:
                results[(t, c)] = model.encode(_call_texts(t, c))
            except BaseException as exc:  # collected and re-raised by the test, with the call that failed
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


@pytest.mark.parametrize("device", ["cpu", "openvino"])
@pytest.mark.parametrize("which", ["tiny_bert", "minilm_dir"])
def test_concurrent_callers_get_bit_identical_results(device: str, which: str, request: pytest.FixtureRequest) -> None:
    fixture = request.getfixturevalue(which)
    folder = fixture[1] if isinstance(fixture, tuple) else fixture
    model = embedrt.load(folder, device=device)
    want = {(t, c): model.encode(_call_texts(t, c)) for t in range(THREADS) for c in range(CALLS)}
    got, errors = _hammer(model)
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]!r}"
    bad = [key for key in want if got[key].shape != want[key].shape or not np.array_equal(got[key], want[key])]
    assert not bad, f"{len(bad)} of {len(want)} concurrent calls differ from the single-threaded result: {bad[:5]}"


def test_openvino_request_pool_lends_each_request_to_one_caller() -> None:
    from embedrt.backends import RequestPool

    class Compiled:
        made = 0

        def create_infer_request(self) -> object:
            Compiled.made += 1
            return object()

    pool = RequestPool(Compiled(), size=2)
    with pool.request() as a, pool.request() as b:
        assert a is not b
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(pool.request().__enter__()))
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive(), "a third caller must wait while both requests are lent"
    waiter.join(timeout=5)
    assert got and got[0] in (a, b) and Compiled.made == 2


# ---------------------------------------------------------------- memory bounded by the window, not the input

def _encode_peak_kib(folder: Path, n: int) -> tuple[int, int]:
    from benchmarks.encode_memory import encode_peak

    row = encode_peak(folder, n, threads=1)
    return int(row["peak_above_base_kib"]), int(row["output_kib"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_encode_memory_does_not_grow_with_the_number_of_texts(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    # 2,000 vs 8,000 texts of ~480 tokens: tokenized all up front, they cost ~60 KB each
    small, small_out = _encode_peak_kib(tiny_bert[1], 2_000)
    large, large_out = _encode_peak_kib(tiny_bert[1], 8_000)
    # only the output (n x dim float32) may grow; the rest within 10% (+ 5 MB of allocator noise)
    assert large - large_out <= 1.10 * (small - small_out) + 5 * 1024, (small, small_out, large, large_out)


# ---------------------------------------------------------------- bad input named, never embedded silently


def test_lone_surrogates_become_replacement_characters(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    got = model.encode(["a\ud800b", "ok", "x\udfffy", "pair \ud83d\ude00 joined"])
    want = model.encode(["a\ufffdb", "ok", "x\ufffdy", "pair \U0001f600 joined"])
    np.testing.assert_array_equal(got, want)
    assert model.tokenize(["a\ud800b"]) == model.tokenize(["a\ufffdb"])


def test_cli_encodes_a_jsonl_line_with_a_lone_surrogate(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "bad \\ud800 escape"}\n{"text": "fine"}\n')
    assert main(["encode", str(tiny_bert[1]), "--input", str(src), "-o", str(tmp_path / "out.npy")]) == 0
    want = embedrt.load(tiny_bert[1]).encode(["bad \ufffd escape", "fine"])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


@pytest.mark.parametrize(("texts", "match"), [
    ({"a": 1, "b": 2}, "not a dict"),
    ({"a", "b"}, "not a set"),
    (frozenset({"a"}), "not a frozenset"),
    (["a", b"bytes"], r"texts\[1\] is bytes"),
])
def test_containers_that_only_look_like_lists_are_refused(tiny_bert, texts: Any, match: str) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    with pytest.raises(TypeError, match=match):
        model.encode(texts)


@pytest.mark.parametrize(("option", "value", "error"), [
    ("batch_size", None, TypeError), ("batch_size", 1.5, TypeError), ("batch_size", True, TypeError),
    ("batch_size", 0, ValueError), ("max_tokens", 2.0, TypeError), ("max_tokens", 0, ValueError),
    ("max_tokens", "64", TypeError), ("show_progress", "no", TypeError),  # "no" showed a progress bar
])
def test_bad_batch_options_are_named(tiny_bert, option: str, value: Any, error: type) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    with pytest.raises(error, match=option):
        model.encode(["a", "b"], **{option: value})
    assert model.encode(["a", "b"], batch_size=np.int64(1), max_tokens=None).shape == (2, model.dim)


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"threads": 1.5}, TypeError, "threads must be an int"), ({"threads": "2"}, TypeError, "threads must be an int"),
    ({"threads": 2**31}, ValueError, "threads must be between 1 and 1024"),
    ({"device": None}, TypeError, "device must be a string"),
    ({"batch_cost": 3}, TypeError, "batch_cost must be a BatchCost"),
])
def test_bad_load_options_are_named(tiny_bert, options: dict[str, Any], error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        embedrt.load(tiny_bert[1], **options)
    assert embedrt.load(tiny_bert[1], device="cpu", threads=np.int64(1)).plan.threads == 1


def test_encode_padded_stays_within_the_positions(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1], device="cpu")
    ids = model.tokenize(["hello world"])
    positions = model.manifest.extra["limits"]["max_positions"]
    with pytest.raises(ValueError, match=f"pad_to must be <= the {positions} positions the model has"):
        model.encode_padded(ids, positions + 1)
    np.testing.assert_allclose(model.encode_padded(ids, positions), model.encode(["hello world"]), atol=2e-6)


def test_the_models_similarity_takes_its_own_metric_only_for_none(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """``metric or self.similarity_metric``: "" and 0 silently meant the model's metric."""
    model = embedrt.load(tiny_bert[1], device="cpu")
    a = model.encode(["x", "y"])
    np.testing.assert_array_equal(model.similarity(a, a), embedrt.similarity(a, a, model.similarity_metric))
    with pytest.raises(ValueError, match="unknown"):
        model.similarity(a, a, "")
    with pytest.raises(TypeError, match="metric must be"):
        model.similarity(a, a, 0)  # type: ignore[arg-type]


def test_search_with_no_query_is_empty(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1], device="cpu")
    idx, scores = model.search([], model.encode(["x", "y", "z"]), k=1)
    assert idx.shape == scores.shape == (0, 1)


def test_generators_and_tuples_are_ordered_inputs(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(tiny_bert[1])
    want = model.encode(["a", "b c"])
    np.testing.assert_array_equal(model.encode(t for t in ("a", "b c")), want)
    np.testing.assert_array_equal(model.encode(("a", "b c")), want)


# ---------------------------------------------------------------- the manifest checked against the graph


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / "embedrt.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture()
def bert_copy(tiny_bert, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    return Path(shutil.copytree(tiny_bert[1], tmp_path / "model"))


@pytest.mark.parametrize("device", ["cpu", "openvino"])
@pytest.mark.parametrize(("changes", "field"), [
    ({"dim": 48}, "dim"),
    ({"inputs": ["input_ids", "attention_mask"]}, "inputs"),
    ({"pad_token_id": 7}, "pad_token_id"),
    ({"pad_token_id": 10**6}, "pad_token_id"),
    ({"max_seq_length": 4096}, "max_seq_length"),
    ({"normalize": False}, "normalize"),
    ({"similarity": "euclidean"}, "similarity"),  # search ranked by the edited metric, silently
    ({"architecture": "roberta"}, "architecture"),
    ({"do_lower_case": True}, "do_lower_case"),
])
def test_a_manifest_that_contradicts_the_graph_is_named_at_load(
    bert_copy: Path, device: str, changes: dict[str, Any], field: str
) -> None:
    _edit_manifest(bert_copy, **changes)
    with pytest.raises(ModelFolderError, match=f"field '{field}'"):
        embedrt.load(bert_copy, device=device)


def test_a_shorter_max_seq_length_is_allowed(bert_copy: Path) -> None:
    _edit_manifest(bert_copy, max_seq_length=16)
    model = embedrt.load(bert_copy)
    assert len(model.tokenize(["word " * 100])[0]) == 16
    _edit_manifest(bert_copy, max_seq_length=3)  # [CLS], one token, [SEP]
    assert len(embedrt.load(bert_copy).tokenize(["word " * 100])[0]) == 3
    for short in (1, 2):  # no room for a token: not "a probe came out as special tokens only"
        _edit_manifest(bert_copy, max_seq_length=short)
        with pytest.raises(ModelFolderError, match=f"embedrt.json: field 'max_seq_length' is {short}, which "
                                                   "leaves no room for a token"):
            embedrt.load(bert_copy)


@pytest.mark.parametrize("device", ["cpu", "openvino"])
def test_the_manifests_limits_are_the_graphs(bert_copy: Path, device: str) -> None:
    """extra.limits.max_positions raised past the graph's table was accepted, and encode_padded then failed
    deep inside the backend."""
    extra = json.loads((bert_copy / "embedrt.json").read_text())["extra"]
    for key, value in (("max_positions", extra["limits"]["max_positions"] * 2), ("vocab_size", 10)):
        _edit_manifest(bert_copy, extra={**extra, "limits": {**extra["limits"], key: value}})
        with pytest.raises(ModelFolderError, match=f"field 'extra.limits.{key}' is {value} but the graph was "
                                                   "exported with"):
            embedrt.load(bert_copy, device=device)


@pytest.mark.parametrize(("changes", "match"), [
    ({"parity": {"openvino": 5}}, "field 'parity.openvino' has the wrong type"),
    ({"parity": {"openvino": {"bf16": {"passed": True, "units": "amx_bf16"}}}},
     "field 'parity.openvino.bf16.min_cosine' missing"),
    ({"parity": {"openvino": {"bf16": {"passed": "yes", "min_cosine": 1.0}}}},
     "field 'parity.openvino.bf16.passed' has the wrong type"),
    ({"extra": {"auto": "x"}}, "field 'extra.auto' has the wrong type"),
    ({"extra": {"auto": {"device": 3}}}, "field 'extra.auto.device' has the wrong type"),
    ({"extra": {"quantization": []}}, "field 'extra.quantization' has the wrong type"),
])
def test_records_the_runtime_reads_are_checked(bert_copy: Path, changes: dict[str, Any], match: str) -> None:
    """Were AttributeError / KeyError from deep in the device plan (auto, the default, among them)."""
    _edit_manifest(bert_copy, **changes)
    with pytest.raises(ModelFolderError, match=match):
        embedrt.load(bert_copy)


def test_extra_null_is_no_extra_and_files_stay_inside_the_folder(bert_copy: Path) -> None:
    _edit_manifest(bert_copy, extra=None)
    embedrt.load(bert_copy).encode(["a"])
    _edit_manifest(bert_copy, extra=[1])
    with pytest.raises(ModelFolderError, match="field 'extra' has the wrong type"):
        embedrt.load(bert_copy)
    data = json.loads((bert_copy / "embedrt.json").read_text())
    for outside in ("../../../../etc/hostname", "/etc/hostname", "a/../../b"):
        files = {**data["files"], outside: {"bytes": 1, "sha256": "0" * 64}}
        _edit_manifest(bert_copy, extra={}, files=files)
        with pytest.raises(ModelFolderError, match="is not a path inside the model folder"):
            embedrt.load(bert_copy, verify=True)


@pytest.mark.parametrize(("entry", "match"), [
    ({"bytes": "12kb", "sha256": "0" * 64}, r"files\['model.onnx'\].bytes"),
    ({"bytes": None, "sha256": "0" * 64}, r"files\['model.onnx'\].bytes"),
    ({"bytes": 12, "sha256": 5}, r"files\['model.onnx'\].sha256"),
])
def test_bad_file_entries_are_named(bert_copy: Path, entry: dict[str, Any], match: str) -> None:
    data = json.loads((bert_copy / "embedrt.json").read_text())
    data["files"]["model.onnx"] = entry
    (bert_copy / "embedrt.json").write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match=match):
        embedrt.load(bert_copy)


def test_extra_limits_of_the_wrong_type_are_refused_at_load(bert_copy: Path) -> None:
    """A string 'extra.limits' loaded, then encode_padded raised AttributeError on every call."""
    data = json.loads((bert_copy / "embedrt.json").read_text())
    extra = data.get("extra") or {}
    for limits, where in (("big", "extra.limits' has the wrong type"), ({"max_positions": "512"},
                          "extra.limits.max_positions' must be an integer >= 1"), ({"vocab_size": 0},
                          "extra.limits.vocab_size' must be an integer >= 1")):
        _edit_manifest(bert_copy, extra={**extra, "limits": limits})
        with pytest.raises(ModelFolderError, match=where):
            embedrt.load(bert_copy)
