"""Export parity with sentence-transformers, checked here independently of the exporter's own check."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embedrt
from embedrt.export.synthetic import StandIn, seed_stand_in
from embedrt.export.validate import PROBE_TEXTS, parity_figures

SEEDS = [
    "msmarco-distilbert-base-dot-v4",
    "msmarco-distilbert-cos-v5",
    "msmarco-distilbert-base-v4",
    "multi-qa-distilbert-cos-v1",
    "msmarco-distilroberta-base-v3",
]
LONG = "retrieval " * 700  # far past 512 tokens


def assert_parity(checkpoint, folder, texts, device="cpu", threshold=0.99999):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(checkpoint), device="cpu").encode(texts, convert_to_numpy=True)
    if device.startswith("openvino"):  # exact f32 on request, whatever this CPU runs by default
        exact = embedrt.load(folder, device=device, inference_precision="f32")
        figures = parity_figures(ref, exact.encode(texts, batch_size=4))
        assert exact.precision == "fp32" and figures["min_cosine"] >= threshold, figures
    model = embedrt.load(folder, device=device)
    figures = parity_figures(ref, model.encode(texts, batch_size=4))
    # an fp32 folder runs bf16 on AMX CPUs when its export checked it in bf16 (BF16_MIN_COSINE)
    assert figures["min_cosine"] >= (min(threshold, 0.9999) if model.precision == "bf16" else threshold), figures
    return ref, model


@pytest.mark.parametrize("name", SEEDS)
def test_seed_configuration_stand_ins(name: str, stand_in_factory) -> None:  # type: ignore[no-untyped-def]
    spec = seed_stand_in(name)
    checkpoint, folder = stand_in_factory(spec)
    manifest = json.loads((folder / "embedrt.json").read_text())
    assert manifest["similarity"] == ("dot" if "dot" in name else "cosine")
    assert manifest["normalize"] is ("cos-v" in name)
    assert manifest["max_seq_length"] == 512
    assert manifest["inputs"] == ["input_ids", "attention_mask"]  # DistilBERT / RoBERTa: no token_type_ids
    texts = [*PROBE_TEXTS, LONG, "short"]
    _ref, model = assert_parity(checkpoint, folder, texts)
    assert len(model.tokenize([LONG])[0]) == 512
    norms = np.linalg.norm(model.encode(["a", "b c d"]), axis=1)
    if spec.normalize:
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    else:
        assert not np.allclose(norms, 1.0, rtol=1e-3)


@pytest.mark.parametrize(
    "spec",
    [
        StandIn(architecture="bert", pooling="cls", normalize=True, similarity="cosine", max_seq_length=64),
        StandIn(architecture="bert", pooling="max", dense_dim=24, similarity="dot", max_seq_length=128),
        StandIn(architecture="distilbert", pooling="mean_sqrt_len", similarity="euclidean", max_seq_length=32),
        StandIn(architecture="roberta", pooling="cls", normalize=True, dense_dim=8, max_seq_length=100),
    ],
    ids=lambda s: f"{s.architecture}-{s.pooling}",
)
def test_pooling_modes_dense_and_lengths(spec: StandIn, stand_in_factory) -> None:  # type: ignore[no-untyped-def]
    checkpoint, folder = stand_in_factory(spec, formats="onnx,openvino")
    texts = [*PROBE_TEXTS, LONG]
    assert_parity(checkpoint, folder, texts)
    assert_parity(checkpoint, folder, texts, device="openvino")
    manifest = embedrt.read_manifest(folder)
    assert manifest.pooling.value == spec.pooling and manifest.max_seq_length == spec.max_seq_length
    assert manifest.dim == (spec.dense_dim or 32)
    assert ("token_type_ids" in manifest.inputs) is (spec.architecture == "bert")


# texts where tokenizers differ: whitespace runs, compatibility characters, controls, no spaces, past 512 tokens
TOKENIZER_PROBES = ["Hello  World", "  leading and trailing  ", "tab\there\nnewline",
                    "\ufb01ne caf\u00e9 na\u00efve \u216b", "", " ", "x" * 5000, "word " * 40000, "e\u0301 " * 30000,
                    "\u65e5\u672c\u8a9e", "UPPER lower MiXeD",
                    "a\u00a0b\u2003c", "\x00\x01 ctrl"]


@pytest.mark.parametrize("architecture", ["mpnet", "xlm-roberta", "camembert", "albert", "electra"])
def test_other_bert_family_architectures(architecture: str, stand_in_factory) -> None:  # type: ignore[no-untyped-def]
    """MPNet (relative position bias), ALBERT (shared layers, factored embeddings), ELECTRA, and the RoBERTa
    family with SentencePiece tokenizers: same vectors as sentence-transformers, same tokens as transformers."""
    from transformers import AutoTokenizer

    spec = StandIn(architecture=architecture, pooling="mean", normalize=architecture == "mpnet")
    checkpoint, folder = stand_in_factory(spec)
    texts = [*PROBE_TEXTS, LONG, "short"]
    assert_parity(checkpoint, folder, texts)
    _, model = assert_parity(checkpoint, folder, texts, device="openvino")
    manifest = embedrt.read_manifest(folder)
    assert manifest.architecture == architecture
    assert ("token_type_ids" in manifest.inputs) is (architecture in ("albert", "electra"))
    # 512 positions (BERT-style) or 514 counted from the pad id (RoBERTa-style): 512 tokens either way
    assert manifest.extra["limits"]["max_positions"] == 512
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    for text in TOKENIZER_PROBES:
        want = hf(text, truncation=True, max_length=manifest.max_seq_length)["input_ids"]
        assert list(model.tokenize([text])[0]) == want, text[:40]


def test_in_graph_pooling_matches_numpy_pooling() -> None:
    torch = pytest.importorskip("torch")
    from embedrt.export.graph import torch_pool

    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 17, 5)).astype(np.float32)
    mask = (np.arange(17)[None, :] < np.array([17, 5, 1])[:, None]).astype(np.int64)
    for mode in embedrt.Pooling:
        got = torch_pool(torch.from_numpy(h), torch.from_numpy(mask), mode).numpy()
        np.testing.assert_allclose(got, embedrt.pool(h, mask, mode), rtol=1e-5, atol=1e-6)


def test_onnx_graph_contract(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    import onnx

    _, folder = tiny_bert
    model = onnx.load(str(folder / "model.onnx"))
    assert model.opset_import[0].version >= 17
    assert model.ir_version <= 10
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims), dims  # dynamic batch and sequence
    meta = {p.key: p.value for p in model.metadata_props}
    contract = json.loads(meta["embedrt"])
    assert contract["pooling"] == "mean" and contract["normalize"] is True and contract["max_seq_length"] == 512
    manifest = json.loads((folder / "embedrt.json").read_text())
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json", "openvino_model.xml", "openvino_model.bin"}


def test_recorded_parity_is_what_sentence_transformers_gives(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """The manifest's parity figures, recomputed here against sentence-transformers (not read back as a pass)."""
    from sentence_transformers import SentenceTransformer

    checkpoint, folder = tiny_bert
    ref = SentenceTransformer(str(checkpoint), device="cpu").encode(list(PROBE_TEXTS), batch_size=16)
    recorded = embedrt.read_manifest(folder).parity
    for fmt, device in (("onnx", "cpu"), ("openvino", "openvino")):
        got = embedrt.load(folder, device=device).encode(list(PROBE_TEXTS), batch_size=16)
        figures = parity_figures(ref, got)
        assert figures["min_cosine"] >= 0.99999, (fmt, figures)
        # the probe texts and one holding the tokenizer's special-token strings
        assert recorded[fmt]["n_texts"] == len(PROBE_TEXTS) + 1 and recorded[fmt]["device"] == model_device(device)
        assert recorded[fmt]["min_cosine"] == pytest.approx(figures["min_cosine"], abs=1e-6), fmt


def model_device(device: str) -> str:
    return "openvino:CPU" if device == "openvino" else device


def test_cpu_graph_keeps_residual_layernorm_unfused(tiny_bert, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ONNX Runtime's CPU SkipLayerNormalization is ~4x slower than Add + LayerNormalization: neither the
    exported graph nor the CPU session may fuse them (the other fusions stay)."""
    import onnx

    from embedrt import backends

    _, folder = tiny_bert
    exported = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert {"Attention", "LayerNormalization"} <= exported and "SkipLayerNormalization" not in exported, exported
    optimized = tmp_path / "optimized.onnx"
    make_options = backends._session_options

    def recording(ort, threads):  # type: ignore[no-untyped-def]
        options = make_options(ort, threads)
        options.optimized_model_filepath = str(optimized)  # what the session actually runs
        return options

    monkeypatch.setattr(backends, "_session_options", recording)
    embedrt.load(folder, device="cpu").encode(["a residual connection"])
    ran = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert "LayerNormalization" in ran and "SkipLayerNormalization" not in ran, ran
