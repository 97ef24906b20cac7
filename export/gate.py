"""The quality gate: an int8 model must keep the fp32 model's quality, on every dataset given and per text.

It judges what users will see: every evaluation folder given (BEIR retrieval folders: NDCG@10; STS Benchmark
files: Spearman) must keep ``min_retained`` percent of the fp32 figure, and on every text the gate embeds,
per dataset, the 1st-percentile cosine of int8 to fp32 must reach ``min_p1_cosine`` (a recipe can keep the
average and still wreck a share of the texts). Without evaluation folders, a built-in check on shipped texts
(top-10 agreement and mean cosine) stands in. A passing export records every figure in its manifest; a
refusal names every figure that fell short.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedrt.errors import QualityGateError, shown_below
from embedrt.ops import row_cosine, top_k
from embedrt.textio import InputFileError

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


def _per_text(cos: np.ndarray) -> dict[str, float]:
    return {"p1_cosine": float(np.percentile(cos, 1)), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()), "texts": int(cos.size)}


def agreement(fp32: Any, int8: Any, corpus: list[str], queries: list[str], k: int = 10) -> dict[str, float]:
    """Cosine of int8 to fp32 embeddings and the share of fp32's top-k that int8 also ranks top-k."""
    a, b = fp32.encode_document(corpus), int8.encode_document(corpus)
    qa, qb = fp32.encode_query(queries), int8.encode_query(queries)
    ref_top = top_k(qa, a, k, fp32.similarity_metric)[0]
    got_top = top_k(qb, b, k, int8.similarity_metric)[0]
    overlap = np.mean([len(set(x) & set(y)) / x.size for x, y in zip(ref_top, got_top)])
    return {**_per_text(np.concatenate([row_cosine(a, b), row_cosine(qa, qb)])), f"top{k}_agreement": float(overlap),
            "queries": len(queries)}


def dataset_kind(path: Path) -> str:
    """``beir`` (a folder with corpus.jsonl) or ``sts`` (an STS Benchmark file, or a folder with sts-test.csv).

    Raises:
        InputFileError: neither (names the path and what was looked for).
    """
    if (path / "corpus.jsonl").is_file():
        return "beir"
    if path.is_file() or (path / "sts-test.csv").is_file():
        return "sts"
    raise InputFileError(f"{path}: not an evaluation set: expected a BEIR folder (corpus.jsonl, queries.jsonl, "
                         "qrels/test.tsv) or an STS Benchmark file (or a folder holding sts-test.csv)")


def load_eval_set(path: Path) -> Any:
    """An evaluation set, read whole and checked that it can judge int8: a BEIR split with a judged query and a
    relevant document, or an STS file of two or more pairs whose gold scores differ.

    Raises:
        InputFileError: the set cannot be read, or cannot judge (names it and why).
    """
    from embedrt.beir import load_beir
    from embedrt.sts import load_sts

    if dataset_kind(path) == "beir":
        data = load_beir(path)
        if not data.query_ids or not data.corpus_ids:
            raise InputFileError(f"{path}: no judged queries or no documents: this set cannot judge int8")
        if not any(score > 0 for judged in data.qrels.values() for score in judged.values()):
            raise InputFileError(f"{path}: the qrels judge no document relevant (every score <= 0), so NDCG@10 is 0 "
                                 "for any model: this set cannot judge int8")
        return data
    sts = load_sts(path)
    if len(sts.scores) < 2 or float(np.ptp(sts.scores)) == 0.0:
        raise InputFileError(f"{path}: needs at least two pairs with different gold scores to judge int8")
    return sts


def _beir(fp32: Any, int8: Any, path: Path) -> dict[str, Any]:
    from embedrt.beir import score_embeddings

    data = load_eval_set(path)
    out: dict[str, Any] = {"dataset": path.name, "kind": "beir", "metric": "ndcg@10"}
    cos = []
    for name, model in (("fp32", fp32), ("int8", int8)):
        corpus, queries = model.encode_document(data.corpus_texts), model.encode_query(data.query_texts)
        out[f"{name}_ndcg@10"] = score_embeddings(data, queries, corpus, model.similarity_metric)["ndcg@10"]
        cos.append((corpus, queries))
    docs, queries = row_cosine(cos[0][0], cos[1][0]), row_cosine(cos[0][1], cos[1][1])
    out["fp32"], out["int8"] = out["fp32_ndcg@10"], out["int8_ndcg@10"]
    # queries are short, where int8 is weakest; many documents must not hide them: the floor is the worse part's
    parts = {"corpus": _per_text(docs), "queries": _per_text(queries)}
    part = min(parts, key=lambda name: parts[name]["p1_cosine"])
    return {**out, **parts[part], "part": part, "per_part": parts}


def _sts(fp32: Any, int8: Any, path: Path) -> dict[str, Any]:
    from embedrt.sts import spearman

    data = load_eval_set(path)
    out: dict[str, Any] = {"dataset": path.name if path.is_dir() else path.stem, "kind": "sts", "metric": "spearman"}
    emb = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        a, b = model.encode(data.first), model.encode(data.second)
        out[name] = 100.0 * spearman(row_cosine(a, b), data.scores)
        emb[name] = (a, b)
    per_text = np.concatenate([row_cosine(emb["fp32"][0], emb["int8"][0]), row_cosine(emb["fp32"][1], emb["int8"][1])])
    return {**out, **_per_text(per_text)}


class GateFailure(QualityGateError):
    """The gate's shortfalls on one graph; ``failures`` lists them (the export names every graph's)."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        super().__init__("int8 fails the quality gate: " + "; ".join(failures) + "; nothing was written")


def run_gate(fp32: Any, int8: Any, eval_dirs: Sequence[Path] | None, min_retained: float,
             min_agreement: float, min_mean_cosine: float, min_p1_cosine: float = 0.95) -> dict[str, Any]:
    """Measure int8 against fp32 on every dataset and raise QualityGateError naming every shortfall.

    Returns:
        The figures: ``builtin`` (always), ``datasets`` (one entry per evaluation folder: fp32 and int8
        metric, ``retained_percent``, per-text cosine figures), the thresholds, and ``passed``.
    """
    dirs = [Path(d) for d in eval_dirs or ()]
    kinds = [dataset_kind(d) for d in dirs]  # a bad folder fails before anything is measured
    corpus, queries = builtin_texts()
    built = agreement(fp32, int8, corpus, queries)
    figures: dict[str, Any] = {"builtin": built, "min_p1_cosine": min_p1_cosine}
    failures = []
    if not dirs:
        if built["top10_agreement"] < min_agreement:
            failures.append(f"built-in check: top-10 agreement {built['top10_agreement']:.3f} (needs {min_agreement})")
        if built["mean_cosine"] < min_mean_cosine:
            failures.append(f"built-in check: mean cosine {shown_below(built['mean_cosine'], min_mean_cosine, 5)} "
                            f"(needs {min_mean_cosine})")
        if built["p1_cosine"] < min_p1_cosine:
            failures.append(f"built-in check: 1st-percentile cosine {shown_below(built['p1_cosine'], min_p1_cosine)} "
                            f"over {built['texts']} texts (needs {min_p1_cosine})")
    datasets = []
    short = [d.name if d.is_dir() else d.stem for d in dirs]
    for path, kind, name in zip(dirs, kinds, short, strict=True):
        got = _beir(fp32, int8, path) if kind == "beir" else _sts(fp32, int8, path)
        # two sets with one name (stsb/sts-test.csv and other/sts-test.csv) are told apart by their paths
        got["dataset"], got["path"] = (str(path) if short.count(name) > 1 else name), str(path)
        judged = bool(np.isfinite([got["fp32"], got["int8"]]).all() and got["fp32"] > 0)
        got["retained_percent"] = 100.0 * got["int8"] / got["fp32"] if judged else None
        datasets.append(got)
        where = f"{got['dataset']} ({got['part']})" if "part" in got else got["dataset"]
        if not judged:
            failures.append(f"{got['dataset']}: the fp32 model scores {got['fp32']:.2f} {got['metric']} and int8 "
                            f"{got['int8']:.2f}: this set cannot judge int8 (it needs a positive fp32 figure)")
        elif got["retained_percent"] < min_retained:
            failures.append(f"{got['dataset']}: int8 keeps {shown_below(got['retained_percent'], min_retained, 2)}% of "
                            f"the fp32 {got['metric']} "
                            f"({got['int8']:.2f} vs {got['fp32']:.2f}; needs {min_retained}%)")
        if got["p1_cosine"] < min_p1_cosine:
            failures.append(f"{where}: 1st-percentile cosine to fp32 {shown_below(got['p1_cosine'], min_p1_cosine)} "
                            f"over {got['texts']} texts (needs {min_p1_cosine})")
    if dirs:
        figures.update(datasets=datasets, min_retained=min_retained)
        first = next((d for d in datasets if d["kind"] == "beir"), None)
        if first is not None:  # the first retrieval set, under the key earlier manifests used
            figures["beir"] = {k: first[k] for k in ("dataset", "fp32_ndcg@10", "int8_ndcg@10", "retained_percent")}
    else:
        figures.update(min_agreement=min_agreement, min_mean_cosine=min_mean_cosine)
    if failures:
        raise GateFailure(failures)
    figures["passed"] = [d["dataset"] for d in datasets] or "builtin"
    return figures
