"""The real all-MiniLM-L6-v2, exported by the CLI, against sentence-transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embedrt
from embedrt.export.validate import PROBE_TEXTS, parity_figures

from .conftest import scifact_docs

EDGE = ["", "x", "naïve café — “quotes”", "日本語のテキスト", "emoji 😀🚀👩‍👩‍👧‍👦", "long " * 400]


@pytest.mark.parametrize("device", ["cpu", "openvino"])
def test_parity_on_scifact_and_edge_cases(device: str, minilm_dir, minilm_st) -> None:  # type: ignore[no-untyped-def]
    texts = scifact_docs(300) + EDGE
    ref = minilm_st.encode(texts, convert_to_numpy=True, batch_size=32)
    model = embedrt.load(minilm_dir, device=device)
    figures = parity_figures(ref, model.encode(texts))
    # on AMX CPUs the IR runs bf16 by default (its export checked it in bf16): 0.9999 there
    assert figures["min_cosine"] >= (0.9999 if model.precision == "bf16" else 0.99999), figures
    if device == "openvino":
        exact = embedrt.load(minilm_dir, device=device, inference_precision="f32")
        figures = parity_figures(ref, exact.encode(texts))
        assert figures["min_cosine"] >= 0.99999, figures


def test_manifest_records_checkpoint_contract(minilm_dir) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((minilm_dir / "embedrt.json").read_text())
    assert manifest["max_seq_length"] == 256  # sentence_bert_config.json, not tokenizer.json's 128
    assert manifest["similarity"] == "cosine" and manifest["normalize"] is True and manifest["dim"] == 384
    # the figures themselves are recomputed against sentence-transformers in test_parity_on_scifact_and_edge_cases
    assert manifest["parity"]["onnx"]["n_texts"] >= len(PROBE_TEXTS)
    assert manifest["parity"]["openvino"]["device"] == "openvino:CPU"


def test_text_between_128_and_256_tokens_is_not_cut_at_128(minilm_dir, minilm_st) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(f"token{i}" for i in range(90))  # about 190 word pieces
    model = embedrt.load(minilm_dir)
    n = len(model.tokenize([text])[0])
    assert 128 < n < 256, n
    cut = " ".join(f"token{i}" for i in range(40))
    ref = minilm_st.encode([text, cut])
    got = model.encode([text, cut])
    assert parity_figures(ref, got)["min_cosine"] >= 0.99999


def test_empty_string_gives_sentence_transformers_vector(minilm_dir, minilm_st) -> None:  # type: ignore[no-untyped-def]
    got = embedrt.load(minilm_dir).encode([""])
    np.testing.assert_allclose(got[0], minilm_st.encode([""])[0], atol=1e-5)
