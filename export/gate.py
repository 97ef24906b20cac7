"""The quality gate: an int8 model must keep the fp32 model's retrieval quality before it ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embedrt.errors import QualityGateError
from embedrt.ops import row_cosine, top_k

# queries for the built-in check; the corpus is the calibration set plus the demo corpus
GATE_QUERIES = (
    "how do vaccines work", "interest rates and inflation", "symptoms of heart disease", "renewable energy output",
    "earthquake damage to cities", "healthy diet for children", "python performance tips", "space exploration news",
    "clinical trial results for a new drug", "flooding after heavy rain", "music festival", "train delays",
    "protecting online accounts", "ocean and coral reef health", "housing policy", "sleep and exam performance",
)


def builtin_texts() -> tuple[list[str], list[str]]:
    """(corpus, queries) of the built-in gate: shipped texts only, so it runs anywhere."""
    from embedrt.export.quantize import default_calibration_texts
    from embedrt.textio import read_package_records

    docs = read_package_records("embedrt", "data/demo_corpus.jsonl")[1]
    return [*default_calibration_texts(), *docs], list(GATE_QUERIES)


def agreement(fp32: Any, int8: Any, corpus: list[str], queries: list[str], k: int = 10) -> dict[str, float]:
    """Cosine of int8 to fp32 embeddings and the share of fp32's top-k that int8 also ranks top-k."""
    a, b = fp32.encode(corpus), int8.encode(corpus)
    cos = row_cosine(a, b)
    ref_top = top_k(fp32.encode(queries), a, k, fp32.similarity_metric)[0]
    got_top = top_k(int8.encode(queries), b, k, int8.similarity_metric)[0]
    overlap = np.mean([len(set(x) & set(y)) / x.size for x, y in zip(ref_top, got_top)])
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), f"top{k}_agreement": float(overlap),
            "texts": len(corpus), "queries": len(queries)}


def run_gate(fp32: Any, int8: Any, beir_dir: Path | None, min_retained: float, min_agreement: float,
             min_mean_cosine: float) -> dict[str, Any]:
    """Measure int8 against fp32 and raise QualityGateError (with both figures) if it falls short."""
    corpus, queries = builtin_texts()
    figures: dict[str, Any] = {"builtin": agreement(fp32, int8, corpus, queries)}
    built = figures["builtin"]
    if beir_dir is None:
        if built["top10_agreement"] < min_agreement or built["mean_cosine"] < min_mean_cosine:
            raise QualityGateError(
                f"int8 fails the built-in gate: top-10 agreement {built['top10_agreement']:.3f} "
                f"(needs {min_agreement}), mean cosine {built['mean_cosine']:.5f} (needs {min_mean_cosine}) "
                "against the fp32 model; nothing was written"
            )
        return {**figures, "passed": "builtin"}
    from embedrt.beir import evaluate, load_beir

    data = load_beir(beir_dir)
    base = evaluate(fp32, data)
    quant = evaluate(int8, data)
    retained = 100.0 * quant["ndcg@10"] / base["ndcg@10"] if base["ndcg@10"] else 0.0
    figures["beir"] = {"dataset": Path(beir_dir).name, "fp32_ndcg@10": base["ndcg@10"],
                       "int8_ndcg@10": quant["ndcg@10"], "retained_percent": retained}
    if retained < min_retained:
        raise QualityGateError(
            f"int8 keeps {retained:.2f}% of the fp32 NDCG@10 on {Path(beir_dir).name} "
            f"({quant['ndcg@10']:.2f} vs {base['ndcg@10']:.2f}); the gate needs {min_retained}%; nothing was written"
        )
    return {**figures, "passed": "beir"}
