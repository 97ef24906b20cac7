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


@pytest.fixture(scope="module")
def minilm_ov_int8(tmp_path_factory: pytest.TempPathFactory, minilm_checkpoint):  # type: ignore[no-untyped-def]
    from embedrt.export import export_model

    return export_model(str(minilm_checkpoint), tmp_path_factory.mktemp("int8") / "ov", quantize="static",
                        formats="openvino")


def test_served_int8_vector_does_not_depend_on_batch_mates(minilm_ov_int8) -> None:  # type: ignore[no-untyped-def]
    # the int8 recipe auto and the server use, on the real model. OpenVINO's f32 attention sums over the padded
    # length, and the next int8 quantiser can turn a last-bit difference into a whole step: a text run at its
    # exact length and then padded 17 tokens further moved by up to 0.015 (2 of 165 texts). embedrt runs every
    # OpenVINO call at a multiple of 8 tokens (SHAPE_BUCKETS), alone too; from there a text's vector was
    # identical behind any longer batch-mate (334 texts, 3 to 128 tokens further).
    import random

    from embedrt.export.auto import timing_texts
    from embedrt.export.quantize import casual_calibration_texts, default_calibration_texts
    from embedrt.plan import SHAPE_BUCKETS

    assert all(multiple % 8 == 0 for _, multiple in SHAPE_BUCKETS)
    model = embedrt.load(minilm_ov_int8, device="openvino")
    # short texts, and passages of ~200-400 tokens: fp32 matmuls can depend on the rows of a call (with the
    # FFN up-projections left in fp32 instead, 3 of 312 SciFact documents among batch-mates moved by 0.015)
    texts = [*default_calibration_texts(), *casual_calibration_texts(), *EDGE[:5], *timing_texts()[0]]
    alone = np.concatenate([model.encode([t]) for t in texts])
    ids = model.tokenize(texts)
    own = model.padded_lengths(np.array([len(x) for x in ids]))
    for extra in (8, 24, 64):  # behind a batch-mate padded 8, 24 or 64 tokens longer
        got = np.concatenate([model.encode_padded([x], int(n) + extra) for x, n in zip(ids, own, strict=True)])
        assert np.abs(got - alone).max() <= 1e-6, f"padded {extra} tokens further"
    rng = random.Random(3)
    for _ in range(20):  # through encode's own planning, with random batch-mates
        mates = rng.sample(range(len(texts)), rng.choice([3, 8, 17, 40]))
        got = model.encode([texts[i] for i in mates], batch_size=rng.choice([4, 16, 32]))
        assert np.abs(got - alone[mates]).max() <= 1e-6
