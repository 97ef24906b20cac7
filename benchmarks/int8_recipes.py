"""Every int8 recipe judged on data it was not chosen on: ``python -m benchmarks.int8_recipes``.

Protocol (issue #14): calibration uses only the texts shipped in ``export/data/`` (``calibration.txt``, and
for NNCF also ``calibration_casual.txt``; outside every evaluation set); SciFact's 300 judged queries are
split in two fixed halves by query id: recipes are compared on the *select* half and reported on the *confirm*
half, with STS-B Spearman (all 1,379 pairs) as a second, unrelated task. Short-text fidelity is chosen on too:
the select half's queries, the exporter's probe texts and ``benchmarks/data/select_short.txt`` (hand-written
sentences held out from the pool ``calibration_casual.txt`` came from), reported as ``cos_short_select``.
Per-text fidelity is the cosine to the fp32 model over short texts (confirm: queries, STS sentences) and long ones
(SciFact documents): minimum and 1st percentile, and the overlap of each query's top-10. Batch invariance: the
largest difference between a text embedded alone and in a batch of 32 mixed texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SELECT_SHORT = Path(__file__).resolve().parent / "data" / "select_short.txt"
# "ffn32": the FFN down-projections in fp32, the default since 2026-11-23 (recipe revision c)
RECIPES: dict[str, dict[str, Any]] = {
    "ort-dynamic": {"quantize": "dynamic", "keep_ffn_output_fp32": False},
    "ort-dynamic-ffn32": {"quantize": "dynamic", "keep_ffn_output_fp32": True},
    "ort-static": {"quantize": "static", "keep_ffn_output_fp32": False},
    "ort-static-ffn32": {"quantize": "static", "keep_ffn_output_fp32": True},
    "ov-nncf-static": {"quantize": "static", "formats": "openvino", "keep_ffn_output_fp32": False},
    "ov-nncf-static-ffn32": {"quantize": "static", "formats": "openvino", "keep_ffn_output_fp32": True},
    # SmoothQuant on, everything int8
    "ov-nncf-static-sq": {"quantize": "static", "formats": "openvino", "smooth_quant": True,
                          "keep_ffn_output_fp32": False},
}


def split_queries(data: Any) -> tuple[Any, Any]:
    """The select and confirm halves of a BEIR split, fixed by a hash of each query id."""
    def half(keep: int) -> Any:
        ids = [q for q in data.query_ids if hashlib.sha256(q.encode()).digest()[0] % 2 == keep]
        texts = dict(zip(data.query_ids, data.query_texts, strict=True))
        return dataclasses.replace(data, query_ids=ids, query_texts=[texts[q] for q in ids],
                                   qrels={q: data.qrels[q] for q in ids})
    return half(0), half(1)


def _fidelity(fp32: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    from embedrt.ops import row_cosine

    cos = row_cosine(fp32, int8)
    return {"min": float(cos.min()), "p1": float(np.percentile(cos, 1)), "mean": float(cos.mean())}


def judge(folder: Path, device: str, reference: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Quality, fidelity, speed and batch invariance of one model folder against the fp32 reference."""
    import embedrt
    from embedrt.beir import score_embeddings
    from embedrt.ops import row_cosine, top_k
    from embedrt.sts import spearman

    model = embedrt.load(folder, device=device)
    start = time.perf_counter()
    corpus = model.encode(data["beir"].corpus_texts)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"docs_per_s": round(len(corpus) / seconds, 1)}
    for name in ("select", "confirm"):
        part = data[name]
        queries = model.encode(part.query_texts)
        out[f"ndcg_{name}"] = score_embeddings(part, queries, corpus, model.similarity_metric)["ndcg@10"]
    sts = data["sts"]
    a, b = model.encode(sts.first), model.encode(sts.second)
    out["sts_spearman"] = 100 * spearman(row_cosine(a, b), sts.scores)
    queries = model.encode(data["beir"].query_texts)
    out["cos_short"] = _fidelity(np.concatenate([reference["queries"], reference["sts"]]),
                                 np.concatenate([queries, a]))
    out["cos_long"] = _fidelity(reference["corpus"], corpus)
    out["cos_short_select"] = _fidelity(reference["select_short"], model.encode(data["select_short"]))
    ref_top = top_k(reference["queries"], reference["corpus"], 10, model.similarity_metric)[0]
    got_top = top_k(queries, corpus, 10, model.similarity_metric)[0]
    out["top10_overlap"] = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ref_top, got_top, strict=True)]))
    mixed = list(data["beir"].query_texts[:16]) + list(data["beir"].corpus_texts[:16])
    batched = model.encode(mixed, batch_size=32)
    alone = np.stack([model.encode([t])[0] for t in mixed])
    out["batch_max_abs_diff"] = float(np.abs(batched - alone).max())
    return out


def main(argv: list[str] | None = None) -> int:
    """Export each recipe (once, cached under --work), judge it, print and write a JSON table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--work", default="models/_int8")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--devices", default="cpu,openvino", help="judge the recipes of these devices only")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)
    import embedrt
    from benchmarks.run import _machine, _versions
    from benchmarks.systems import ensure_export
    from embedrt.beir import load_beir
    from embedrt.export.artifacts import EXPORTER
    from embedrt.export.validate import PROBE_TEXTS
    from embedrt.sts import load_sts

    work = Path(args.work)
    beir = load_beir(DATA / "scifact")
    select, confirm = split_queries(beir)
    held_out = [line for line in SELECT_SHORT.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = {"beir": beir, "select": select, "confirm": confirm, "sts": load_sts(DATA / "stsb"),
            "select_short": [*select.query_texts, *PROBE_TEXTS, *held_out]}
    fp32_dir = ensure_export(args.model, work / "fp32", formats="onnx,openvino")
    rows: dict[str, Any] = {}
    for device in args.devices.split(","):
        fp32 = embedrt.load(fp32_dir, device=device, inference_precision="f32")  # never bf16, even on AMX
        reference = {"corpus": fp32.encode(beir.corpus_texts), "queries": fp32.encode(beir.query_texts),
                     "sts": fp32.encode(data["sts"].first), "select_short": fp32.encode(data["select_short"])}
        rows[f"fp32-{device}"] = judge(fp32_dir, device, reference, data)
        for name in args.recipes.split(","):
            recipe = dict(RECIPES[name])
            if (recipe.get("formats") == "openvino") != (device == "openvino"):
                continue
            folder = ensure_export(args.model, work / name, **recipe)
            rows[name] = judge(folder, device, reference, data)
            base = rows[f"fp32-{device}"]
            rows[name]["retained"] = {k: 100 * rows[name][k] / base[k]
                                      for k in ("ndcg_select", "ndcg_confirm", "sts_spearman")}
            print(name, json.dumps(rows[name]), flush=True)
    recipes = {n: RECIPES[n] for n in args.recipes.split(",")}
    rows["_run"] = {"exporter": EXPORTER, "model": args.model, "recipes": recipes, "embedrt": embedrt.__version__,
                    "machine": _machine(fp32.plan.threads), "versions": _versions()}
    text = json.dumps(rows, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
