"""embedrt next to sentence-transformers' own OpenVINO backend: ``python -m benchmarks.peers``.

The issue's protocol: the DistilBERT-base stand-in (or all-MiniLM-L6-v2), 64 passages at batch 32 and
single-query latency, 2 threads, every system in a fresh process (``benchmarks/peer_worker.py``), rounds
rotated so that no system always runs first; the median over rounds; cosine to sentence-transformers on
PyTorch fp32 for every text, next to every speed figure.

sentence-transformers with ``backend="openvino"`` needs optimum-intel, whose pins conflict with this
project's transformers, so it runs from its own environment:

    python -m venv .venv-stov && .venv-stov/bin/pip install -c constraints/stov.txt torch \\
        && .venv-stov/bin/pip install -c constraints/stov.txt "sentence-transformers[openvino]" \\
        && .venv-stov/bin/pip uninstall -y torchvision  # pulled in by optimum-intel; its PyPI wheel breaks
                                                        # `import transformers` against the CPU torch wheel

Its rows: the backend at its default precision (OpenVINO's own choice for this CPU, recorded: bf16 where the
CPU has bf16 instructions) and forced to f32. embedrt's rows: ``embedrt.load(folder)`` on a default export
(what a user gets without options; the path it took is recorded), fp32 on each backend, bf16 where the CPU has
bf16 units, and every shipped int8 recipe at its defaults: OpenVINO NNCF (batch-invariant; what ``auto`` and the
server use), ONNX Runtime static (batch-invariant) and ONNX Runtime dynamic (not).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import systems, workloads
from benchmarks.run import RECIPES, _machine, _versions
from embedrt.ops import row_cosine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "peer_worker.py"
log = logging.getLogger("embedrt.bench")


def _st_openvino_folder(python: Path, checkpoint: Path, folder: Path) -> Path:
    """The checkpoint with the OpenVINO IR sentence-transformers exports for itself (once, then reused)."""
    if not (folder / "openvino" / "openvino_model.xml").is_file():
        code = ("import sys; from sentence_transformers import SentenceTransformer; "
                "SentenceTransformer(sys.argv[1], device='cpu', backend='openvino').save(sys.argv[2])")
        subprocess.run([str(python), "-c", code, str(checkpoint), str(folder)], check=True)
    return folder


def _bf16_folder(checkpoint: Path, folder: Path) -> Path | None:
    from embedrt.cpu import bf16_units

    if bf16_units() is None:
        return None
    return systems.ensure_export(checkpoint, folder, formats="openvino", precision="bf16")


def _stov_versions(python: Path) -> dict[str, str]:
    """The versions in the peer environment (its optimum-intel pins another transformers than embedrt's)."""
    names = ("sentence-transformers", "optimum-intel", "optimum", "transformers", "openvino", "torch")
    code = f"import importlib.metadata as md, json; print(json.dumps({{n: md.version(n) for n in {names!r}}}))"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def build_specs(model: str, threads: int, stov: Path | None) -> list[dict[str, Any]]:
    folders = systems.prepare(model, RECIPES["dynamic"], ort_static=True)
    checkpoint = folders["checkpoint"]
    main_py = sys.executable
    specs: list[dict[str, Any]] = [
        {"name": "st-torch-fp32", "python": main_py, "kind": "st", "path": str(checkpoint)},
    ]
    if stov is not None:
        st_ov = _st_openvino_folder(stov, checkpoint, systems.MODELS_DIR / model / "st-openvino")
        specs += [
            {"name": "st-openvino-default", "python": str(stov), "kind": "st", "backend": "openvino",
             "path": str(st_ov)},
            {"name": "st-openvino-f32", "python": str(stov), "kind": "st", "backend": "openvino",
             "path": str(st_ov), "ov_config": {"INFERENCE_PRECISION_HINT": "f32"}},
        ]
    specs += [
        {"name": "embedrt-default", "python": main_py, "kind": "embedrt", "path": str(folders["fp32"])},
        {"name": "embedrt-fp32-ort", "python": main_py, "kind": "embedrt", "path": str(folders["fp32"]),
         "device": "cpu"},
        {"name": "embedrt-fp32-openvino", "python": main_py, "kind": "embedrt", "path": str(folders["fp32"]),
         "device": "openvino"},
    ]
    bf16 = _bf16_folder(checkpoint, systems.MODELS_DIR / model / "bf16")
    if bf16 is not None:
        specs.append({"name": "embedrt-bf16-openvino", "python": main_py, "kind": "embedrt", "path": str(bf16),
                      "device": "openvino"})
    # every shipped int8 recipe at its defaults: OpenVINO NNCF (what auto and the server use), ONNX Runtime
    # static (batch-invariant) and dynamic (not)
    specs += [
        {"name": "embedrt-int8-openvino", "python": main_py, "kind": "embedrt", "path": str(folders["ov-int8"]),
         "device": "openvino"},
        {"name": "embedrt-int8-ort-static", "python": main_py, "kind": "embedrt",
         "path": str(folders["ort-int8-static"]), "device": "cpu"},
        {"name": "embedrt-int8-ort-dynamic", "python": main_py, "kind": "embedrt", "path": str(folders["int8"]),
         "device": "cpu"},
    ]
    for spec in specs:
        spec["threads"] = threads
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="distilbert-base", choices=["distilbert-base", "all-MiniLM-L6-v2"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stov-python", default=str(REPO / ".venv-stov" / "bin" / "python"),
                   help="the environment with sentence-transformers[openvino]; its rows are skipped if missing")
    p.add_argument("--json", help="write the record here (default benchmarks/results/peers-DATE-MODEL.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stov = Path(args.stov_python)
    if not stov.is_file():
        log.warning("sentence-transformers' OpenVINO rows skipped: %s not found (see this module's docstring)", stov)
    specs = build_specs(args.model, args.threads, stov if stov.is_file() else None)
    loads = {w.name: w for w in workloads.build(n_queries=64, n_passages=64)}
    runs: dict[str, list[dict[str, Any]]] = {s["name"]: [] for s in specs}
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "texts.json"
        texts.write_text(json.dumps({"passages": list(loads["passages"].texts),
                                     "queries": list(loads["queries"].texts)[:64]}))
        for rnd in range(args.rounds):
            order = specs[rnd % len(specs):] + specs[: rnd % len(specs)]
            for spec in order:
                out = Path(tmp) / f"{spec['name']}-{rnd}.json"
                spec_file = Path(tmp) / f"{spec['name']}-{rnd}.spec.json"
                spec_file.write_text(json.dumps({**spec, "texts": str(texts), "out": str(out)}))
                subprocess.run([spec["python"], str(WORKER), str(spec_file)], check=True, cwd=REPO)
                result = json.loads(out.read_text())
                runs[spec["name"]].append(result)
                embeddings[spec["name"]] = (np.load(out.with_suffix(".passages.npy")),
                                            np.load(out.with_suffix(".queries.npy")))
                print(rnd, spec["name"], f"{result['passages_per_s']:.2f} passages/s",
                      f"{result['single_p50_ms']:.2f} ms", flush=True)
    ref_p, ref_q = embeddings["st-torch-fp32"]
    base = statistics.median(r["passages_per_s"] for r in runs["st-torch-fp32"])
    rows = []
    for spec in specs:
        name = spec["name"]
        done = runs[name]
        cos = np.concatenate([row_cosine(embeddings[name][0], ref_p), row_cosine(embeddings[name][1], ref_q)])
        info = {k: v for k, v in done[-1].items() if k not in ("passages_per_s", "single_p50_ms", "pid")}
        thr = statistics.median(r["passages_per_s"] for r in done)
        rows.append({"system": name, **info,
                     "passages_per_s": round(thr, 2),
                     "passages_per_s_rounds": [round(r["passages_per_s"], 2) for r in done],
                     "vs_st_torch": round(thr / base, 2),
                     "single_p50_ms": round(statistics.median(r["single_p50_ms"] for r in done), 2),
                     "single_p50_ms_rounds": [round(r["single_p50_ms"], 2) for r in done],
                     "min_cosine_to_st_torch": round(float(cos.min()), 6)})
    record = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "machine": _machine(args.threads),
              "versions": _versions(), "versions_st_openvino": _stov_versions(stov) if stov.is_file() else None,
              "protocol": f"64 passages at batch 32 and 64 single queries, fresh process "
              f"per system and round, {args.rounds} rotated rounds, median", "rows": rows}
    for row in rows:
        print(json.dumps(row))
    out_path = Path(args.json) if args.json else RESULTS / f"peers-{record['date']}-{args.model}.json"
    out_path.write_text(json.dumps(record, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
