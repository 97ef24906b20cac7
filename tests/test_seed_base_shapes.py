"""The five seed configurations at full size (DistilBERT-base / DistilRoBERTa-base shapes, random weights)."""

from __future__ import annotations

import json

import pytest

import embedrt
from embedrt.export.synthetic import seed_stand_in
from embedrt.export.validate import PROBE_TEXTS, parity_figures

from .test_export_parity import LONG, SEEDS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", SEEDS)
def test_base_shaped_seed_exports_match(name: str, stand_in_factory) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    spec = seed_stand_in(name, size="base")
    checkpoint, folder = stand_in_factory(spec, formats="onnx")
    manifest = json.loads((folder / "embedrt.json").read_text())
    assert manifest["dim"] == 768 and manifest["max_seq_length"] == 512
    assert manifest["similarity"] == ("dot" if "dot" in name else "cosine")
    assert manifest["normalize"] is ("cos-v" in name)
    texts = [*PROBE_TEXTS, LONG]
    ref = SentenceTransformer(str(checkpoint), device="cpu").encode(texts)
    figures = parity_figures(ref, embedrt.load(folder).encode(texts, batch_size=8))
    print(name, figures)
    assert figures["min_cosine"] >= 0.99999, figures
