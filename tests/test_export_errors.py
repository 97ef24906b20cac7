"""Bad checkpoints and failed parity: clear errors, nothing half-written left behind."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedrt.errors import ModelFolderError, OutputPathError, ParityError, SourceError
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


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", ["max_seq_length", "prompt", "unknown prompt", "truncation_side", "foreign module"])
def test_what_embedrt_would_compute_differently_is_refused_by_name(checkpoint, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    """Each of these gave a bare torch traceback or an unexplained parity failure before."""
    positions = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    if case == "max_seq_length":
        _edit_json(checkpoint / "sentence_bert_config.json", max_seq_length=positions + 1)
        why = f"max_seq_length {positions + 1} is more than the {positions} positions"
    elif case == "prompt":  # a default prompt that sentence-transformers leaves out of the pooling
        _edit_json(checkpoint / "config_sentence_transformers.json", prompts={"query": "query: "},
                   default_prompt_name="query")
        pooling = next(checkpoint.glob("*Pooling/config.json"))
        _edit_json(pooling, include_prompt=False)
        why = "include_prompt false leaves the default prompt 'query: ' .* out of the pooling"
    elif case == "unknown prompt":
        _edit_json(checkpoint / "config_sentence_transformers.json", prompts={"query": "query: "},
                   default_prompt_name="search")
        why = "default_prompt_name 'search' is not one of its prompts \\('document', 'query'\\)"
    elif case == "truncation_side":
        _edit_json(checkpoint / "tokenizer_config.json", truncation_side="left")
        why = "truncation_side 'left' is not supported"
    else:
        modules = json.loads((checkpoint / "modules.json").read_text())
        modules[-1]["type"] = "mypkg.modules.Normalize"
        (checkpoint / "modules.json").write_text(json.dumps(modules))
        why = "a module of another package"
    with pytest.raises(SourceError, match=why):
        export_model(str(checkpoint), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_default_prompt_is_no_prompt(checkpoint) -> None:  # type: ignore[no-untyped-def]
    from embedrt.export.source import read_checkpoint

    _edit_json(checkpoint / "config_sentence_transformers.json", prompts={"query": ""}, default_prompt_name="query")
    assert read_checkpoint(checkpoint).max_seq_length >= 1


_TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}


@pytest.mark.parametrize(("content", "why"), [
    ({"0": _TRANSFORMER}, "expected a JSON list of modules, got an object"),
    ([_TRANSFORMER, 5], "module 1 is not a JSON object"),
    ([_TRANSFORMER, {"idx": 1, "path": "1_Pooling"}], "module 1 has no string 'type'"),
    ([_TRANSFORMER, {"idx": 1, "path": 1, "type": "sentence_transformers.models.Pooling"}],
     "module 1 has no string 'path'"),
], ids=["object", "item not an object", "no type", "path not a string"])
def test_malformed_modules_json_names_file_and_module(checkpoint, tmp_path, content, why) -> None:  # type: ignore[no-untyped-def]
    (checkpoint / "modules.json").write_text(json.dumps(content))
    with pytest.raises(SourceError, match=f"^{re.escape(str(checkpoint / 'modules.json'))}: {why}"):
        export_model(str(checkpoint), tmp_path / "out")


@pytest.mark.parametrize("name", ["modules.json", "1_Pooling/config.json"])
def test_invalid_utf8_names_the_file(checkpoint, tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    path = checkpoint / name
    path.write_bytes(path.read_bytes().replace(b"{", b"{\"\xff\": 1, ", 1))  # a Latin-1 byte, not UTF-8
    with pytest.raises(SourceError, match=f"^{re.escape(str(path))}: not valid UTF-8"):
        export_model(str(checkpoint), tmp_path / "out")


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
    (tmp_path / "weights.safetensors").write_text("x")  # a file given for the folder: said "not found"
    with pytest.raises(SourceError, match=r"weights\.safetensors: is a file, not a checkpoint folder"):
        export_model(str(tmp_path / "weights.safetensors"), tmp_path / "out")


def test_a_revision_of_a_local_folder_is_refused(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # it was ignored, and the manifest recorded source.revision as though it had been checked out
    from embedrt.export.auto import export_auto

    with pytest.raises(SourceError, match=r"--revision abc picks a revision of a hub id; a local folder is used"):
        export_model(str(checkpoint), tmp_path / "out", revision="abc")
    with pytest.raises(SourceError, match=r"--revision abc picks"):  # not each candidate's rejection
        export_auto(str(checkpoint), tmp_path / "out", overwrite=False, revision="abc")
    assert not (tmp_path / "out").exists()


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


def test_a_full_disk_names_the_export_s_output(checkpoint, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """torch and onnx report a full disk as a bare "[Errno 28] No space left on device", naming no path."""
    import errno

    import embedrt.export.pipeline as pipeline

    for error in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")):
        monkeypatch.setattr(pipeline, "export", lambda build, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(OSError) as info:
            export_model(str(checkpoint), tmp_path / "out")
        assert info.value.errno == error.errno and info.value.__cause__ is error
        said = f"[Errno {error.errno}] {error.strerror} while exporting to {tmp_path / 'out'} "
        assert str(info.value).startswith(said)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary folder
    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))  # a path said already: as it is
    monkeypatch.setattr(pipeline, "export", lambda build: (_ for _ in ()).throw(named))
    with pytest.raises(OSError) as info:
        export_model(str(checkpoint), tmp_path / "out")
    assert info.value is named


def test_existing_output_needs_overwrite(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(str(checkpoint), tmp_path / "out")


def test_an_unwritable_output_location_is_named(checkpoint) -> None:  # type: ignore[no-untyped-def]
    # tests run as root, so chmod cannot make a folder unwritable; nothing can be created under /proc
    out = Path("/proc/embedrt-test/out")
    with pytest.raises(OutputPathError, match=f"^{re.escape(str(out))}: cannot write: "):
        export_model(str(checkpoint), out)


def _temp_folders(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-"))


def test_next_export_removes_what_a_dead_export_left(checkpoint, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    no_lock = tmp_path / ".model.tmp-abc"  # from before work folders were locked
    (no_lock / "scratch").mkdir(parents=True)
    (no_lock / "scratch" / "plain.onnx").write_bytes(b"\0" * 300_000)
    an_hour_ago = time.time() - 3600
    os.utime(no_lock, (an_hour_ago, an_hour_ago))
    unheld = tmp_path / ".model.tmp-def"  # its export died, so the kernel dropped its lock
    unheld.mkdir()
    (unheld / ".embedrt-export.lock").write_text("12345\n")
    other = tmp_path / ".other.tmp-abc"  # another output's: not this export's business
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="embedrt.export"):
        export_model(str(checkpoint), tmp_path / "model", formats="onnx")
    assert _temp_folders(tmp_path, "model") == [] and other.is_dir()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"removed leftover temporary folder {no_lock} (300.0 kB) from an export that did not finish" in w
               for w in warnings), warnings
    assert any(f"removed leftover temporary folder {unheld}" in w for w in warnings), warnings


def test_a_work_folder_locked_by_a_live_process_is_left_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.export.workdir import LOCK_NAME, sweep_stale

    live, dead = tmp_path / ".model.tmp-live", tmp_path / ".model.tmp-dead"
    for folder in (live, dead):
        folder.mkdir()
        (folder / LOCK_NAME).write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(live / LOCK_NAME)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert sweep_stale(tmp_path / "model") == [dead]
        assert live.is_dir() and (live / LOCK_NAME).is_file() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
    assert sweep_stale(tmp_path / "model") == [live]  # its holder is gone now


def test_a_young_work_folder_without_a_lock_may_be_starting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.export.workdir import sweep_stale

    # mkdtemp and taking the lock are two steps; a fresh folder may be a live export between them
    (tmp_path / ".model.tmp-new").mkdir()
    assert sweep_stale(tmp_path / "model") == []
    assert (tmp_path / ".model.tmp-new").is_dir()


def test_export_after_a_kill_9_completes_and_cleans_up(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import embedrt

    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "embedrt.cli", "export", str(tiny_bert[0]), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any((p / ".embedrt-export.lock").is_file() for p in _temp_folders(tmp_path, "model")):
            assert proc.poll() is None, f"the export ended (rc {proc.returncode}) before its work folder appeared"
            assert time.monotonic() < deadline, "no locked work folder within 60 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the export finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(_temp_folders(tmp_path, "model")) == 1 and not out.exists()
    export_model(str(tiny_bert[0]), out, formats="onnx")
    assert _temp_folders(tmp_path, "model") == []
    assert embedrt.load(out).encode(["after the crash"]).shape == (1, 32)


def test_int8_settings_without_quantize_and_bad_eval_sets_are_refused_before_export(tmp_path) -> None:
    """--target sparc, --min-retained 50 or --eval without --quantize were silently ignored; a bad --eval file
    was found only after the export and quantisation (and --precision auto exited 0 over it)."""
    from embedrt.export import ExportOptions

    for settings, flag in (({"target": "sparc"}, "unknown"), ({"target": "avx2"}, "--target"),
                           ({"min_retained": 50.0}, "--min-retained"), ({"calibration_method": "entropy"},
                                                                           "--calibration-method")):
        with pytest.raises(ValueError, match=flag):
            ExportOptions.parse(**settings)
    sts = tmp_path / "notsts.txt"
    sts.write_text("just\ntext\n")
    with pytest.raises(ValueError, match="--eval"):
        ExportOptions.parse(eval_dir=sts)
    with pytest.raises(Exception, match=r"notsts\.txt:1: expected 7 tab-separated fields"):
        ExportOptions.parse(quantize="dynamic", eval_dir=sts)
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text('{"_id": "d", "text": "x"}\n')
    with pytest.raises(Exception, match=r"queries\.jsonl"):
        ExportOptions.parse(quantize="static", eval_dir=beir)


def test_a_checkpoint_without_its_vocabulary_is_refused(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without tokenizer.json the tokenizer had 5 tokens, every word [UNK], and parity was still 1.0."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_bert[0], ckpt)
    for name in ("tokenizer.json", "vocab.txt"):
        (ckpt / name).unlink(missing_ok=True)
    with pytest.raises(SourceError, match="its vocabulary is missing"):
        export_model(ckpt, tmp_path / "out", formats="onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("file", "changes", "why"), [
    ("2_Normalize/config.json", {"module_output_name": "normalized"},
     r"2_Normalize/config\.json: module_output_name 'normalized' is not supported"),
    ("config_sentence_transformers.json", {"model_type": "SparseEncoder"},
     r"config_sentence_transformers\.json: model_type 'SparseEncoder' is not supported"),
    ("config_sentence_transformers.json", {"truncate_dim": 16},
     r"config_sentence_transformers\.json: truncate_dim 16 is not supported"),
    ("sentence_bert_config.json", {"processor_kwargs": {"padding_side": "left"}},
     r"sentence_bert_config\.json: processor_kwargs .* is not supported"),
    ("1_Pooling/config.json", {"pooling_mode": {"mean": True}},
     r"1_Pooling/config\.json: pooling_mode must be a string \(or a list of one\)"),
    # encode_query / encode_document truncate or pad otherwise (cosine 0.93-0.96 to sentence-transformers'),
    # which encode, and so the parity check, never showed
    ("sentence_bert_config.json", {"query_length": 8}, r"sentence_bert_config\.json: query_length 8 is not supported"),
    ("sentence_bert_config.json", {"document_length": 16}, r"document_length 16 is not supported"),
    ("sentence_bert_config.json", {"query_expansion": {"strategy": "fixed", "length": 32, "attend": True}},
     r"sentence_bert_config\.json: query_expansion .* is not supported"),
    ("sentence_bert_config.json", {"tokenizer_args": {"truncation_side": "left"}},
     r"sentence_bert_config\.json: tokenizer_args .* is not supported"),
    # sentence-transformers scores an unknown name with cosine; embedrt read its own alias as dot
    ("config_sentence_transformers.json", {"similarity_fn_name": "dot_score"},
     r"similarity_fn_name 'dot_score' is not one sentence-transformers knows"),
    ("sentence_bert_config.json", {"max_seq_length": 2},
     r"max_seq_length 2 leaves no room for a token beside the 2 special tokens .* sentence_bert_config\.json"),
    ("tokenizer_config.json", {"padding_side": "left"},
     r"tokenizer_config\.json: padding_side 'left' is not supported: bert numbers positions from the left"),
])
def test_settings_the_graph_does_not_follow_are_refused_by_name(checkpoint, tmp_path, file, changes, why) -> None:  # type: ignore[no-untyped-def]
    """Each was exported before: a renamed Normalize output (sentence-transformers then returns the
    unnormalised vector) and a SparseEncoder passed parity at min cosine 1.0 with other vector lengths."""
    _edit_json(checkpoint / file, **changes)
    with pytest.raises(SourceError, match=why):
        export_model(str(checkpoint), tmp_path / "out", formats="onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("section", "key"), [("truncation", "truncation_side"), ("padding", "padding_side")])
def test_a_left_side_set_in_tokenizer_json_only_is_refused_by_name(checkpoint, tmp_path, section, key) -> None:  # type: ignore[no-untyped-def]
    """transformers takes the side from tokenizer.json where tokenizer_config.json does not say: the export then
    failed parity (cosine 0.9966 / 0.893) without saying why."""
    _edit_json(checkpoint / "tokenizer_config.json", truncation_side=None, padding_side=None)
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer[section] = {"truncation": {"direction": "Left", "max_length": 128, "strategy": "LongestFirst",
                                         "stride": 0},
                          "padding": {"direction": "Left", "pad_id": 0, "pad_to_multiple_of": None,
                                      "pad_token": "[PAD]", "pad_type_id": 0, "strategy": "BatchLongest"}}[section]
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(SourceError, match=rf"tokenizer\.json: {key} 'left' is not supported"):
        export_model(str(checkpoint), tmp_path / "out", formats="onnx")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_in_bf16_is_exported_in_fp32(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bf16 weights (config.json dtype bfloat16) made the export fail with ONNX Runtime's own traceback (no Add
    kernel for bf16), exit 1; they are upcast exactly, and the folder is fp32, checked against
    sentence-transformers on the same upcast weights."""
    import safetensors.torch
    import torch
    from sentence_transformers import SentenceTransformer

    import embedrt

    _edit_json(checkpoint / "config.json", dtype="bfloat16", torch_dtype="bfloat16")
    weights = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in weights.items()},
                                str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    out = export_model(str(checkpoint), tmp_path / "out", formats="onnx")
    model = embedrt.load(out, device="cpu")
    assert model.precision == "fp32" and model.manifest.precision.value == "fp32"
    reference = SentenceTransformer(str(checkpoint), device="cpu").float()
    texts = ["a bf16 checkpoint", "exported in fp32 " * 20]
    got, want = model.encode(texts), reference.encode(texts)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos


def test_duplicate_module_names_and_tokenizer_misfits_are_refused(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    modules = json.loads((checkpoint / "modules.json").read_text())
    original = json.dumps(modules)
    modules[-1]["name"] = modules[-2]["name"]
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(SourceError, match=r"modules\.json: module name '1' is used twice"):
        export_model(str(checkpoint), tmp_path / "out", formats="onnx")
    (checkpoint / "modules.json").write_text(original)
    from transformers import AutoTokenizer

    table = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    tokenizer.add_tokens(["a-new-word"])  # its id is past the model's embedding table
    tokenizer.save_pretrained(str(checkpoint))
    with pytest.raises(SourceError, match=rf"ckpt: the tokenizer has {table + 1} tokens .* embedding table has "
                                          rf"{table} "):
        export_model(str(checkpoint), tmp_path / "out", formats="onnx")
    assert not (tmp_path / "out").exists()


def test_a_vector_of_another_length_fails_parity_at_cosine_one() -> None:
    import numpy as np

    from embedrt.export.validate import check_parity

    ref = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert check_parity("onnx", ref, ref * 1.001, 0.99999)["max_norm_error"] == pytest.approx(0.001, rel=1e-3)
    why = r"onnx parity failed: vector lengths differ by up to 1% \(allowed 0\.447%\) though the min cosine is 1"
    with pytest.raises(ParityError, match=why):
        check_parity("onnx", ref, ref * 1.01, 0.99999)


def test_a_parity_failure_shows_the_digits_that_put_it_below() -> None:
    # --min-cosine 1.0 failed with "min cosine 1.0000000 < required 1.0"
    assert "min cosine 0.99999996 < required 1.0" in str(ParityError("onnx", 0.99999996, 1e-7, 1.0))
    assert "min cosine 0.9123457 < required 0.99999" in str(ParityError("onnx", 0.91234567, 0.1, 0.99999))


def test_split_special_tokens_is_followed(tmp_path) -> None:
    """transformers applies split_special_tokens at call time; tokenizer.json does not keep it. A text holding
    "<s>" or "[SEP]" then came out as the special token here (cosine 0.93 to sentence-transformers)."""
    from sentence_transformers import SentenceTransformer

    import embedrt
    from embedrt.export.synthetic import StandIn, make_checkpoint
    from embedrt.export.validate import parity_figures

    ckpt = make_checkpoint(tmp_path / "ck", StandIn(architecture="roberta", max_seq_length=64))
    _edit_json(ckpt / "tokenizer_config.json", split_special_tokens=True)
    out = export_model(str(ckpt), tmp_path / "out", formats="onnx")
    texts = ["<s>hi</s> <pad> <mask>", "x <unk> y", "plain text"]
    model = embedrt.load(out, device="cpu")
    assert parity_figures(SentenceTransformer(str(ckpt), device="cpu").encode(texts),
                          model.encode(texts))["min_cosine"] >= 0.99999
    assert 2 not in model.tokenize(["a </s> b"])[0][1:-1]  # "</s>" stayed text
    assert model.manifest.split_special_tokens and json.loads((out / "embedrt.json").read_text())["format_version"] == 2
    plain = export_model(str(make_checkpoint(tmp_path / "ck2", StandIn(architecture="roberta", max_seq_length=64))),
                         tmp_path / "out2", formats="onnx")
    assert 2 in embedrt.load(plain, device="cpu").tokenize(["a </s> b"])[0][1:-1]  # by default it is the token
    # the manifest holds the setting: a folder without tokenizer_config.json (dropped as clutter on deploy)
    # still splits; one whose config was changed to disagree is refused (it was followed, silently)
    (out / "tokenizer_config.json").unlink()
    assert 2 not in embedrt.load(out, device="cpu").tokenize(["a </s> b"])[0][1:-1]
    config = plain / "tokenizer_config.json"
    text = config.read_text()
    _edit_json(config, split_special_tokens=True)
    manifest = json.loads((plain / "embedrt.json").read_text())
    manifest["files"]["tokenizer_config.json"]["bytes"] = config.stat().st_size  # past the size check
    (plain / "embedrt.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"tokenizer_config\.json: split_special_tokens is true, but the "
                       r"manifest's field 'split_special_tokens' is false"):
        embedrt.load(plain, device="cpu")
    del manifest["split_special_tokens"]  # exported before the manifest held it: the config decides, as then
    (plain / "embedrt.json").write_text(json.dumps(manifest))
    assert 2 not in embedrt.load(plain, device="cpu").tokenize(["a </s> b"])[0][1:-1]
    config.write_text(text + " ")  # another size: named by the size check
    with pytest.raises(ModelFolderError, match=r"tokenizer_config\.json: corrupt or truncated"):
        embedrt.load(plain, device="cpu")


def test_overwrite_never_deletes_a_file_the_checkpoint_links_to(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The Hugging Face cache's snapshot files are links into blobs/: --overwrite of that folder deleted the
    checkpoint's weights."""
    store = tmp_path / "store"
    store.mkdir()
    weights = checkpoint / "model.safetensors"
    shutil.move(weights, store / "model.safetensors")
    weights.symlink_to(store / "model.safetensors")
    with pytest.raises(OutputPathError, match=r"store: holds .*model\.safetensors, which the input's .* links to"):
        export_model(str(checkpoint), store, formats="onnx", overwrite=True)
    assert (store / "model.safetensors").is_file() and weights.resolve().is_file()


def test_without_any_max_length_the_model_s_positions_are_the_limit(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """sentence-transformers then runs max_position_embeddings (512); embedrt refused such a checkpoint."""
    import embedrt
    from embedrt.export.source import read_checkpoint

    positions = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    st_config = json.loads((checkpoint / "sentence_bert_config.json").read_text())
    st_config.pop("max_seq_length", None)  # sentence-transformers 6 saves it as model_max_length only
    (checkpoint / "sentence_bert_config.json").write_text(json.dumps(st_config))
    tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    for limit in (None, 10**30):  # absent, or transformers' "unset" saved as it is
        if limit is None:
            tok_config.pop("model_max_length", None)
        else:
            tok_config["model_max_length"] = limit
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(tok_config))
        assert read_checkpoint(checkpoint).max_seq_length == positions
    model = embedrt.load(export_model(str(checkpoint), tmp_path / "out", formats="onnx"), device="cpu")
    assert model.manifest.max_seq_length == positions  # and the export's parity check passed
    _edit_json(checkpoint / "tokenizer_config.json", model_max_length="512")
    with pytest.raises(SourceError, match=r"tokenizer_config\.json: model_max_length '512' is not a positive integer"):
        read_checkpoint(checkpoint)


def test_overwrite_replaces_a_model_folder_only(checkpoint, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--overwrite renamed any folder away and deleted it: `-o ~ --overwrite` took a home folder with it."""
    from embedrt.cli import main

    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("keep me")
    assert main(["export", str(checkpoint), "-o", str(home), "--overwrite", "--format", "onnx"]) == 2
    assert "holds files but no embedrt.json, so it is not an embedrt model folder" in capsys.readouterr().err
    assert (home / "notes" / "todo.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(str(checkpoint), empty, formats="onnx", overwrite=True)  # an empty folder is taken
    first = json.loads((empty / "embedrt.json").read_text())
    export_model(str(checkpoint), empty, formats="onnx", overwrite=True, similarity="dot")  # a model folder is replaced
    assert first["similarity"] != json.loads((empty / "embedrt.json").read_text())["similarity"] == "dot"


def test_an_export_sends_no_usage_data() -> None:
    """NNCF and OpenVINO's converter sent telemetry to Google Analytics from a forked process (which also hung an
    interrupted export in its DNS lookup); embedrt.export makes both take their no-op stubs."""
    pytest.importorskip("nncf")
    code = ("import sys, embedrt.export, nncf.telemetry.wrapper as w, openvino.tools.ovc.convert_impl as c; "
            "print(type(w.telemetry).__name__, c.tm.__name__, sys.modules.get('openvino_telemetry'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["MagicMock", "openvino.tools.ovc.telemetry_stub", "None"], out  # pytest itself stubs NNCF's


def test_overwrite_never_deletes_a_file_the_export_reads(checkpoint, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--overwrite of a model folder holding the --calibration-texts, --parity-texts or --eval file deleted it."""
    from embedrt.cli import main

    out = tmp_path / "model"
    out.mkdir()
    (out / "embedrt.json").write_text("{}")  # an earlier export's folder, as far as --overwrite can tell
    texts = out / "mine.txt"
    texts.write_text("a text of mine\nanother one\n")
    sts = out / "mine-sts.csv"
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{i % 5}.0\tfirst {i}\tsecond {i}\n" for i in range(6)))
    for flags in (["--calibration-texts", str(texts), "--quantize", "static"], ["--parity-texts", str(texts)],
                  ["--eval", str(sts), "--quantize", "static"]):
        assert main(["export", str(checkpoint), "-o", str(out), "--overwrite", *flags]) == 2
        assert f"{out}: is a folder holding the input {flags[1]}" in capsys.readouterr().err
    assert texts.is_file() and sts.is_file()
    with pytest.raises(OutputPathError, match="is a folder holding the input"):  # the Python API too
        export_model(str(checkpoint), out, overwrite=True, quantize="static", eval_dir=str(sts))
    # without -o: the default folder, models/<name>, is checked as one named with -o
    monkeypatch.chdir(tmp_path)
    default = Path("models") / checkpoint.name
    default.mkdir(parents=True)
    (default / "embedrt.json").write_text("{}")
    (default / "mine.txt").write_text("a text of mine\n")
    assert main(["export", str(checkpoint), "--overwrite", "--parity-texts", str(default / "mine.txt")]) == 2
    assert f"{default}: is a folder holding the input" in capsys.readouterr().err
    assert (default / "mine.txt").is_file()
