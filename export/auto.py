"""``--precision auto``: export every precision this CPU can run, time each here, keep the fastest that passes.

The candidates, each exported and checked by the ordinary pipeline (so each passes its own gate or is
rejected with the reason):

* ``fp32``: ONNX + OpenVINO IR, timed on ONNX Runtime and on OpenVINO (f32);
* ``bf16``: OpenVINO IR checked in bf16 (min cosine 0.9999), only on a CPU with bf16 units;
* ``int8-ort-static`` and ``int8-ov-static``: calibrated (QDQ / NNCF) int8 through the int8 gate, with the
  user's int8 settings (by default the FFN down-projections in f32). Only
  batch-invariant recipes are candidates: ``auto``'s choice is also what a server runs, where a text's
  vector must not depend on other users' texts in its batch. Dynamic int8 is never chosen here.

Each passing candidate is timed on this CPU in this process, one after the other, rotating the order over
``rounds`` rounds: 32 passages (~200-400 tokens, from the shipped calibration texts) at batch 32, and the
median latency of single short queries. The fastest in passages/s wins, with two allowances for timing
noise (:func:`choose`): runs within 10% of each other tie, and the lower single-query latency breaks the tie;
a less exact candidate (bf16, then int8) must be >= 1.10x as fast as the more exact choice. The winner's
folder becomes the output, its manifest recording under ``extra["auto"]`` the CPU, every candidate's
figures or rejection, the rule, and the device it was fastest on, which ``load(device="auto")`` then takes.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from embedrt.outputs import check_not_input, check_replaceable

log = logging.getLogger("embedrt.export")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One export to try and the devices to time it on."""

    name: str
    settings: dict[str, Any]
    devices: tuple[str, ...]


_INT8_ONLY = ("target", "calibration_texts", "calibration_method", "keep_ffn_output_fp32", "smooth_quant",
              "eval_dir", "min_retained", "min_agreement", "min_mean_cosine", "min_p1_cosine")


def candidates(bf16: bool) -> list[Candidate]:
    """What ``auto`` tries on a CPU with (``bf16=True``) or without bf16 units."""
    out = [Candidate("fp32", {"formats": "onnx,openvino"}, ("cpu", "openvino"))]
    if bf16:
        out.append(Candidate("bf16", {"formats": "openvino", "precision": "bf16"}, ("openvino",)))
    out.append(Candidate("int8-ort-static", {"formats": "onnx", "quantize": "static"}, ("cpu",)))
    out.append(Candidate("int8-ov-static", {"formats": "openvino", "quantize": "static"}, ("openvino",)))
    return out


# how much less exactly a timed run computes, by the precision it ran in (``model.precision``; an fp32
# folder checked in bf16 runs bf16 on OpenVINO on AMX CPUs): fp32 (the parity reference), bf16 (min cosine
# >= 0.9999), int8 (its gate: a percentage of fp32's retrieval quality)
EXACTNESS = {"fp32": 0, "bf16": 1, "int8": 2}
# Throughput differences below 10% do not reproduce on the 2-core VMs this was built on: all-MiniLM-L6-v2,
# ONNX Runtime static int8 vs fp32 on the AMD EPYC (Zen 2), 2026-12-01/02: 1.10x in auto's own timing, 0.82x
# over the SciFact corpus (benchmarks.int8_recipes), and 0.98x on auto's timing texts / 1.06x on 256 SciFact
# passages timed side by side in one process (3 rotated rounds). So runs within TIE of the fastest of their
# level are a tie, broken by the single-query p50 (the median of 32 calls, steadier), and a less exact level
# must reach LESS_EXACT_GAIN times the more exact level's best passages/s. bf16 on AMX (~3x f32) and int8
# where it pays (1.5-1.6x f32 on the Xeons) clear it by far.
TIE = 0.10
LESS_EXACT_GAIN = 1.10


def choose(best: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, str]:
    """The (candidate, device) ``auto`` keeps, from each one's best timing round.

    Within one exactness level (:data:`EXACTNESS` of the precision each run computed in), the runs within
    :data:`TIE` of the level's best passages/s tie, and the lowest single-query p50 among them is the pick.
    Then going down in exactness (bf16, then int8), a level's pick replaces the choice only if it gives
    >= :data:`LESS_EXACT_GAIN` times the best passages/s of the choice's level: a gain the timing cannot
    tell from noise does not buy a less exact model.
    """
    def level_of(figures: dict[str, Any]) -> int:
        return EXACTNESS[str(figures["precision"])] if figures["precision"] in EXACTNESS else len(EXACTNESS)

    choice: tuple[str, str] | None = None
    choice_top = 0.0
    for level in sorted({level_of(v) for v in best.values()}):
        # below the first level only the runs that clear the gain compete (a slower one with a lower p50 must
        # not hide a faster one that clears it)
        runs = {k: v for k, v in best.items() if level_of(v) == level
                and (choice is None or v["passages_per_s"] >= LESS_EXACT_GAIN * choice_top)}
        if not runs:
            continue
        top = max(v["passages_per_s"] for v in runs.values())
        choice = min((k for k, v in runs.items() if v["passages_per_s"] >= (1 - TIE) * top),
                     key=lambda k: best[k]["query_p50_ms"])
        choice_top = top
    if choice is None:
        raise ValueError("no timed candidate to choose from")
    return choice


def timing_texts() -> tuple[list[str], list[str]]:
    """32 passages of ~200-400 tokens and 32 short queries, built from the shipped calibration texts."""
    from embedrt.export.quantize import default_calibration_texts

    texts = list(default_calibration_texts())
    passages: list[str] = []
    current = ""
    for i in range(len(texts) * 8):
        current = f"{current} {texts[i % len(texts)]}".strip()
        if len(current.split()) >= 160 + 16 * (len(passages) % 8):
            passages.append(current)
            current = ""
            if len(passages) == 32:
                break
    queries = [" ".join(t.split()[:10]) for t in texts[:32]]
    return passages, queries


def measure(folder: Path, device: str, passages: list[str], queries: list[str]) -> dict[str, Any]:
    """One timing round: passages/s at batch 32 and the median single-query latency (ms)."""
    import embedrt

    model = embedrt.load(folder, device=device)
    model.encode(passages[:4], batch_size=4)  # warm-up: first shapes, thread pools
    model.encode(queries[:4])
    start = time.perf_counter()
    model.encode(passages, batch_size=32)
    passages_s = len(passages) / (time.perf_counter() - start)
    latencies = []
    for q in queries:
        t0 = time.perf_counter()
        model.encode([q])
        latencies.append(time.perf_counter() - t0)
    return {"passages_per_s": passages_s, "query_p50_ms": 1000 * statistics.median(latencies),
            "precision": model.precision}


def export_auto(source: str, output: Path, overwrite: bool, rounds: int = 3, **gate: Any) -> Path:
    """Export the candidates into a scratch folder beside ``output``, time them, publish the winner.

    Args:
        source: as :func:`embedrt.export.export_model`.
        output: the folder to create.
        overwrite: replace ``output`` if it exists.
        rounds: timing rounds (the order of the candidates rotates each round; the best round counts).
        **gate: the user's gate settings, passed to every export (``eval_dir``, ``min_retained``,
            ``min_agreement``, ``min_mean_cosine``, ``min_p1_cosine``, ``parity_texts``, ``similarity``,
            ``revision``, ...).

    Raises:
        QualityGateError: no candidate passed its gate (the message gives each one's reason).
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    from embedrt.export.options import ExportOptions
    from embedrt.export.workdir import claim_work_dir

    output = Path(output)
    # a local checkpoint folder, or an --eval set, that --overwrite would delete
    evals = gate.get("eval_dir") or ()
    check_not_input(output, [source, *([evals] if isinstance(evals, (str, Path)) else evals)])
    if overwrite:
        check_replaceable(output, source if Path(source).is_dir() else None)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    if gate.get("smooth_quant"):  # NNCF's SmoothQuant graphs are not batch-invariant (see QuantConfig.describe)
        raise ValueError("--precision auto only considers batch-invariant int8, and --smooth-quant is not: export it "
                         "on its own with --quantize static --format openvino --smooth-quant")
    # the user's settings are checked once, here: a bad --eval path is an error, not every candidate's rejection
    ExportOptions.parse(quantize="static", **{k: v for k, v in gate.items() if k != "formats"})
    # and so is the source (a missing folder, --revision of a local one, a hub id that cannot be had): the
    # candidates then take it from the folder or the cache
    from embedrt.export.source import resolve_source

    resolve_source(source, gate.get("revision"))
    # a locked work folder beside the output, as a plain export's: one a killed run left is swept by the next
    from embedrt.model import without_speed_advice

    # and no advice on which int8 runs faster here while candidates are exported and timed: this measures it
    with claim_work_dir(output) as scratch, without_speed_advice():
        return _export_auto(source, output, rounds, scratch, gate)


def _export_auto(source: str, output: Path, rounds: int, scratch: Path, gate: dict[str, Any]) -> Path:
    from embedrt.cpu import NO_BF16_UNITS, OPENVINO_WITHOUT_BF16, bf16_units, cpu_flags, cpu_name, detect_target
    from embedrt.errors import EmbedrtError, QualityGateError
    from embedrt.export.artifacts import write_manifest
    from embedrt.export.pipeline import export_model
    from embedrt.manifest import read_manifest

    units = bf16_units()
    report: dict[str, Any] = {"cpu": cpu_name(), "bf16_units": units, "int8_target": detect_target(),
                              "amx": any(f.startswith("amx") for f in cpu_flags()), "candidates": {}}
    if units is None:  # said, not silently left out: a reader of the record asks where bf16 went
        report["candidates"]["bf16"] = {
            "not_tried": f"this CPU has {NO_BF16_UNITS}, so bf16 cannot be checked or run here: "
                         f"{OPENVINO_WITHOUT_BF16}"}
    passed: dict[str, Candidate] = {}
    for cand in candidates(units is not None):
        settings = {**gate, **cand.settings}  # the candidate's own settings win
        if "quantize" not in cand.settings:  # the int8 settings are for the int8 candidates only
            settings = {k: v for k, v in settings.items() if k not in _INT8_ONLY}
        try:
            export_model(source, scratch / cand.name, overwrite=True, **settings)
        except EmbedrtError as exc:  # parity or gate failed: recorded, never chosen
            log.warning("auto: %s rejected: %s", cand.name, exc)
            report["candidates"][cand.name] = {"rejected": str(exc)}
            continue
        passed[cand.name] = cand
    if not passed:
        # a bf16 this CPU cannot run is in the record as not tried, with its reason
        reasons = "; ".join(f"{k}: {v['rejected'] if 'rejected' in v else 'not tried: ' + v['not_tried']}"
                            for k, v in report["candidates"].items())
        raise QualityGateError(f"--precision auto: no candidate passed its gate ({reasons})")
    runs = [(name, device) for name, cand in passed.items() for device in cand.devices]
    passages, queries = timing_texts()
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in range(rounds):
        for name, device in runs[r % len(runs):] + runs[: r % len(runs)]:
            got = measure(scratch / name, device, passages, queries)
            old = best.get((name, device))
            if old is None or got["passages_per_s"] > old["passages_per_s"]:
                best[(name, device)] = got
    # chosen from the figures as recorded (2 decimals), so that the record bears out its own choice
    best = {key: {k: round(v, 2) if isinstance(v, float) else v for k, v in got.items()}
            for key, got in best.items()}
    for (name, device), got in best.items():
        report["candidates"].setdefault(name, {})[device] = got
    chosen = choose(best)
    report.update(chosen=chosen[0], device=chosen[1], rounds=rounds,
                  timing=f"{len(passages)} passages at batch 32, {len(queries)} single queries",
                  rule=f"fastest in passages/s (within {TIE:.0%}: lowest single-query p50) among the most exact "
                       f"runs; a less exact one (bf16, then int8) only at >= {LESS_EXACT_GAIN:.2f}x the best "
                       "passages/s of the more exact level")
    folder = scratch / chosen[0]
    manifest = read_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, extra={**manifest.extra, "auto": report}))
    if output.exists():
        old_dir = scratch / "previous"
        output.rename(old_dir)
    folder.rename(output)
    log.info("auto: chose %s on %s (%.1f passages/s, %.1f ms per query)", chosen[0], chosen[1],
             best[chosen]["passages_per_s"], best[chosen]["query_p50_ms"])
    return output

