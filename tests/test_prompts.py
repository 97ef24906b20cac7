"""Prompts (sentence-transformers' ``prompts`` / ``default_prompt_name``): carried by the export, applied by
``encode``, ``encode_query``, ``encode_document``, the CLI, bulk embedding and the server as
sentence-transformers applies them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedrt
from embedrt.errors import ModelFolderError, SourceError
from embedrt.export import export_model
from embedrt.export.synthetic import StandIn, make_checkpoint
from embedrt.export.validate import PROBE_TEXTS, parity_figures

PROMPTS = (("query", "query: "), ("passage", "passage: "))
TEXTS = [*PROBE_TEXTS, "retrieval " * 700]  # the last is cut at max_seq_length, prompt included


@pytest.fixture(scope="module")
def prompted(stand_in_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    return stand_in_factory(StandIn(architecture="bert", prompts=PROMPTS))


@pytest.fixture(scope="module")
def defaulted(stand_in_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    return stand_in_factory(StandIn(architecture="roberta", prompts=PROMPTS, default_prompt_name="query"))


def _reference(checkpoint: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(checkpoint), device="cpu")


@pytest.mark.parametrize("device", ["cpu", "openvino"])
def test_prompted_encodes_match_sentence_transformers(prompted, device: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint, folder = prompted
    st = _reference(checkpoint)
    model = embedrt.load(folder, device=device, **({"inference_precision": "f32"} if device == "openvino" else {}))
    # sentence-transformers saves empty query / document prompts beside the checkpoint's own
    assert model.prompts == {"query": "query: ", "passage": "passage: ", "document": ""}
    assert model.manifest.default_prompt_name is None
    plain = model.encode(TEXTS)
    for kwargs in ({}, {"prompt_name": "query"}, {"prompt_name": "passage"}, {"prompt": ""}, {"prompt": "x: "}):
        got = model.encode(TEXTS, **kwargs)
        assert parity_figures(st.encode(TEXTS, **kwargs), got)["min_cosine"] >= 0.99999, kwargs
        if kwargs.get("prompt_name") or kwargs.get("prompt"):  # the prompt really changed the vectors
            assert parity_figures(plain, got)["min_cosine"] < 0.9999, kwargs
    assert parity_figures(st.encode_query(TEXTS), model.encode_query(TEXTS))["min_cosine"] >= 0.99999
    assert parity_figures(st.encode_document(TEXTS), model.encode_document(TEXTS))["min_cosine"] >= 0.99999
    np.testing.assert_array_equal(model.encode_query(TEXTS[:3]), model.encode(TEXTS[:3], prompt_name="query"))
    np.testing.assert_array_equal(model.encode_document(TEXTS[:3]), plain[:3])  # "document" is empty
    one = model.encode(TEXTS[:1], prompt_name="query")  # the one-text latency path
    np.testing.assert_allclose(one, model.encode(TEXTS[:2], prompt_name="query")[:1], atol=1e-6)
    tokens = model.tokenize(["abc"], prompt_name="query")[0]
    assert tokens == model.tokenize(["query: abc"])[0]
    assert len(model.tokenize([TEXTS[-1]], prompt_name="query")[0]) == model.manifest.max_seq_length
    # search embeds its queries as encode_query does
    corpus = model.encode_document(TEXTS)
    idx, _ = model.search(TEXTS[:2], corpus, k=3)
    want = embedrt.top_k(model.encode_query(TEXTS[:2]), corpus, 3, model.similarity_metric)
    np.testing.assert_array_equal(idx, want[0])


def test_a_default_prompt_applies_unless_another_is_asked_for(defaulted) -> None:  # type: ignore[no-untyped-def]
    checkpoint, folder = defaulted
    st = _reference(checkpoint)
    model = embedrt.load(folder, device="cpu")
    assert model.manifest.default_prompt_name == "query"
    # the export's own parity check ran with it (sentence-transformers applies it to the probe texts too)
    assert embedrt.read_manifest(folder).parity["onnx"]["min_cosine"] >= 0.99999
    for kwargs in ({}, {"prompt": ""}, {"prompt_name": "passage"}):
        assert parity_figures(st.encode(TEXTS, **kwargs), model.encode(TEXTS, **kwargs))["min_cosine"] >= 0.99999
    np.testing.assert_array_equal(model.encode(TEXTS[:3]), model.encode(TEXTS[:3], prompt_name="query"))
    assert parity_figures(model.encode(TEXTS[:3]), model.encode(TEXTS[:3], prompt=""))["min_cosine"] < 0.9999
    assert model.tokenize(["abc"])[0] == model.tokenize(["query: abc"], prompt="")[0]


def test_bad_prompt_arguments_are_named(prompted) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(prompted[1], device="cpu")
    known = r"\('document', 'passage', 'query'\)"
    with pytest.raises(ValueError, match=rf"prompt_name 'qeury' is not one of this model's prompts {known}"):
        model.encode(["a"], prompt_name="qeury")
    with pytest.raises(ValueError, match=r"give prompt_name \('query'\) or prompt \('x'\), not both"):
        model.encode(["a"], prompt_name="query", prompt="x")
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        model.tokenize_batch(["a"], prompt=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt_name must be a str, got list"):
        model.encode_query(["a"], prompt_name=["query"])  # type: ignore[arg-type]


def test_a_manifest_edited_to_other_prompts_is_refused(prompted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "edited"
    shutil.copytree(prompted[1], folder)
    path = folder / "embedrt.json"
    manifest = json.loads(path.read_text())
    manifest["prompts"]["query"] = "search_query: "
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"field 'prompts' is .* but the graph was exported with"):
        embedrt.load(folder, device="cpu")
    manifest["default_prompt_name"] = "missing"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"field 'default_prompt_name' is 'missing', which is not one of"):
        embedrt.read_manifest(folder)
    manifest["prompts"] = {"query": 5}
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"field 'prompts' must be an object of strings"):
        embedrt.read_manifest(folder)
    manifest["format_version"] = 3  # a later format: refused, naming the ones this embedrt reads
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"format_version 3 is not supported \(this embedrt reads 1 and 2\)"):
        embedrt.read_manifest(folder)
    manifest["format_version"] = True  # true == 1 in Python: it was read as version 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"format_version True is not supported"):
        embedrt.read_manifest(folder)


def _pooling_without_prompt(checkpoint: Path) -> None:
    config = checkpoint / "1_Pooling" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "include_prompt": False}))


def _set_prompts(checkpoint: Path, prompts: dict[str, str], default: str | None) -> None:
    """Prompts as older sentence-transformers saved them: without its empty query / document ones."""
    path = checkpoint / "config_sentence_transformers.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prompts": prompts, "default_prompt_name": default}))


def _all_ways(st: Any, model: Any, texts: list[str]) -> None:
    for name in ("encode", "encode_query", "encode_document"):
        for kwargs in ({}, {"prompt": ""}, *({"prompt_name": n} for n in st.prompts)):
            want, got = getattr(st, name)(texts, **kwargs), getattr(model, name)(texts, **kwargs)
            assert parity_figures(want, got)["min_cosine"] >= 0.99999, (name, kwargs)
            assert parity_figures(want, got)["max_norm_error"] <= 1e-4, (name, kwargs)


@pytest.mark.parametrize(("prompts", "default"), [
    ({"query": "query: ", "passage": "passage: "}, None),  # encode_document: "document" (empty), not passage
    ({"passage": "passage: "}, "passage"),  # encode_query: "query" (empty), not the default
    ({}, "query"),  # the default names the prompt sentence-transformers adds
    ({"document": "doc: ", "query": None}, None),  # null reads as ""
])
def test_prompts_saved_without_the_empty_ones_match_sentence_transformers(tmp_path, prompts, default) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_checkpoint(tmp_path / "ck", StandIn(architecture="bert", max_seq_length=64))
    _set_prompts(checkpoint, prompts, default)
    folder = export_model(str(checkpoint), tmp_path / "out", formats="onnx")
    model = embedrt.load(folder, device="cpu")
    assert {"query", "document"} <= set(model.prompts)
    _all_ways(_reference(checkpoint), model, TEXTS)
    version = json.loads((folder / "embedrt.json").read_text())["format_version"]
    assert version == (2 if default and model.prompts[default] else 1)  # older runtimes refuse what they'd miss


def test_include_prompt_false_keeps_prompts_it_can_refuse(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    with_default = make_checkpoint(tmp_path / "d", StandIn(architecture="bert", prompts=PROMPTS,
                                                           default_prompt_name="query"))
    _pooling_without_prompt(with_default)
    with pytest.raises(SourceError, match=r"1_Pooling/config\.json: include_prompt false leaves the default prompt "
                                          r"'query: ' .* out of the pooling"):
        export_model(str(with_default), tmp_path / "out-d", formats="onnx")
    assert not (tmp_path / "out-d").exists()
    named = make_checkpoint(tmp_path / "n", StandIn(architecture="bert", prompts=PROMPTS))
    _pooling_without_prompt(named)
    model = embedrt.load(export_model(str(named), tmp_path / "out-n", formats="onnx"), device="cpu")
    st = _reference(named)
    assert model.prompts["query"] == "query: " and model.manifest.include_prompt is False
    for kwargs in ({}, {"prompt": ""}, {"prompt_name": "document"}):  # empty prompts: nothing left out
        assert parity_figures(st.encode(TEXTS, **kwargs), model.encode(TEXTS, **kwargs))["min_cosine"] >= 0.99999
    assert parity_figures(st.encode_document(TEXTS), model.encode_document(TEXTS))["min_cosine"] >= 0.99999
    for call in (lambda: model.encode_query(["a"]), lambda: model.encode(["a"], prompt="x: ")):
        with pytest.raises(ValueError, match=r"include_prompt false.* the prompt '(query|x): ' cannot be used"):
            call()
    # the server refuses them too, naming the parameter (it named "input", where the tokenizer raised)
    from embedrt.serve import ServeConfig, create_app

    from .test_serve import LiveServer

    with LiveServer(create_app([model], ServeConfig())) as server:
        for extra, param in (({"prompt_name": "query"}, "prompt_name"), ({"prompt": "x: "}, "prompt")):
            status, _, body = server.request("POST", "/v1/embeddings", {"model": "out-n", "input": ["a"], **extra})
            error = json.loads(body)["error"]
            assert status == 400 and error["param"] == param and "include_prompt false" in error["message"], body
        status, _, body = server.request("POST", "/v1/embeddings", {"model": "out-n", "input": ["a"],
                                                                     "prompt_name": "document"})
        assert status == 200, body
    # an empty default prompt leaves nothing out (sentence-transformers counts a prompt's tokens only if any)
    empty = make_checkpoint(tmp_path / "e", StandIn(architecture="bert", prompts=(("query", ""),),
                                                    default_prompt_name="query"))
    _pooling_without_prompt(empty)
    model = embedrt.load(export_model(str(empty), tmp_path / "out-e", formats="onnx"), device="cpu")
    assert parity_figures(_reference(empty).encode(TEXTS), model.encode(TEXTS))["min_cosine"] >= 0.99999


def test_a_prompt_that_is_not_valid_unicode_is_repaired_as_a_text_is(prompted) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(prompted[1], device="cpu")
    np.testing.assert_array_equal(model.encode(["a", "b"], prompt="\udcff: "),
                                  model.encode(["a", "b"], prompt="\ufffd: "))


def test_eval_and_search_embed_queries_and_documents_as_sentence_transformers_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.beir import evaluate, load_beir, score_embeddings

    checkpoint = make_checkpoint(tmp_path / "ck", StandIn(architecture="bert", max_seq_length=64))
    _set_prompts(checkpoint, {"query": "query: ", "passage": "passage: "}, None)
    model = embedrt.load(export_model(str(checkpoint), tmp_path / "out", formats="onnx"), device="cpu")
    st = _reference(checkpoint)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [f"topic {i % 5} document {i} about {'retrieval' if i % 2 else 'ranking'}" for i in range(30)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": d}) + "\n"
                                               for i, d in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"topic {i} documents"}) + "\n"
                                                for i in range(5)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i % 5}\td{i}\t1\n" for i in range(30)))
    data = load_beir(beir)
    got = evaluate(model, data)
    want = score_embeddings(data, st.encode_query(data.query_texts), st.encode_document(data.corpus_texts),
                            model.similarity_metric)
    assert got["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-6)
    # the query prompt changed the query vectors (so evaluate with plain encode would not pass above)
    assert parity_figures(st.encode_query(data.query_texts), st.encode(data.query_texts))["min_cosine"] < 0.9999
    idx, _ = model.search(data.query_texts, model.encode_document(data.corpus_texts), k=5)
    want_idx = embedrt.top_k(st.encode_query(data.query_texts), st.encode_document(data.corpus_texts), 5,
                             model.similarity_metric)[0]
    np.testing.assert_array_equal(idx, want_idx)


def test_cli_encode_and_embed_take_a_prompt(prompted, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    from embedrt.bulk import ResumeError
    from embedrt.cli import main

    _, folder = prompted
    model = embedrt.load(folder, device="cpu")
    texts = ["first text", "a second, longer text about retrieval"]
    assert main(["encode", str(folder), "--text", texts[0], "--text", texts[1], "--prompt-name", "query",
                 "--device", "cpu", "-o", str(tmp_path / "q.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), model.encode(texts, prompt_name="query"), atol=1e-6)
    assert main(["encode", str(folder), "--text", "a", "--prompt-name", "nope", "-o", str(tmp_path / "x.npy")]) == 2
    assert "prompt_name 'nope' is not one of this model's prompts" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    assert main(["embed", str(folder), str(corpus), "-o", str(out), "--prompt", "passage: ", "--device", "cpu"]) == 0
    table = pq.read_table(out)
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                               model.encode(texts, prompt_name="passage"), atol=1e-6)
    from embedrt.bulk import BulkOptions, embed_corpus

    with pytest.raises(ResumeError, match=r"options\.prompt: was 'passage: ', now None"):
        embed_corpus(model, corpus, out, BulkOptions(device="cpu"))


def test_server_takes_prompt_name_for_text_inputs(prompted) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("openai")
    from embedrt.serve import ServeConfig, create_app

    from .test_serve import LiveServer

    model = embedrt.load(prompted[1], device="cpu", threads=1)
    with LiveServer(create_app([model], ServeConfig())) as server:
        client = server.client()
        model_id = client.models.list().data[0].id
        got = client.embeddings.create(model=model_id, input=["a query"], extra_body={"prompt_name": "query"})
        np.testing.assert_allclose(got.data[0].embedding, model.encode(["a query"], prompt_name="query")[0],
                                   atol=1e-5)
        status, _, body = server.request("POST", "/v1/embeddings", {"model": model_id, "input": "a",
                                                                     "prompt_name": "nope"})
        error = json.loads(body)["error"]
        assert status == 400 and error["param"] == "prompt_name" and "'nope' is not one of the prompts" in \
            error["message"], body
        status, _, body = server.request("POST", "/v1/embeddings", {"model": model_id, "input": [101, 102],
                                                                     "prompt_name": "query"})
        assert status == 400 and b"applies to text inputs" in body, body
        status, _, body = server.request("POST", "/v1/embeddings", {"model": model_id, "input": "a",
                                                                     "prompt_name": "query", "prompt": "x"})
        assert status == 400 and b"not both" in body, body
