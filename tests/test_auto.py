"""export --precision auto: every candidate exported and gated, timed here, the fastest passing one kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import embedrt
from embedrt.cpu import bf16_units
from embedrt.export.auto import candidates, choose, export_auto, timing_texts
from embedrt.manifest import read_manifest


def test_candidates_follow_the_cpu_and_are_batch_invariant() -> None:
    with_units = [c.name for c in candidates(bf16=True)]
    without = [c.name for c in candidates(bf16=False)]
    assert with_units == ["fp32", "bf16", "int8-ort-static", "int8-ov-static"]
    assert without == ["fp32", "int8-ort-static", "int8-ov-static"]  # bf16 would be emulated: never tried
    assert all(c.settings.get("quantize") in (None, "static") for c in candidates(bf16=True))  # no dynamic
    passages, queries = timing_texts()
    assert len(passages) == len(queries) == 32 and min(len(p.split()) for p in passages) >= 160


def test_auto_keeps_the_fastest_passing_candidate_and_records_why(tiny_bert: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "auto"
    # a mean cosine of exactly 1 to fp32 is out of int8's reach: both int8 candidates must be rejected
    export_auto(str(tiny_bert[0]), out, overwrite=False, rounds=1, min_mean_cosine=1.0)
    report = read_manifest(out).extra["auto"]
    cands = report["candidates"]
    assert all("rejected" in cands[name] for name in ("int8-ort-static", "int8-ov-static"))
    assert "mean cosine" in cands["int8-ort-static"]["rejected"]
    if bf16_units() is None:  # not tried, and the record says why
        assert list(cands["bf16"]) == ["not_tried"] and "no bf16 units" in cands["bf16"]["not_tried"]
    else:
        assert "not_tried" not in cands["bf16"]
    timed = {(name, dev): f for name, figs in cands.items() if not {"rejected", "not_tried"} & set(figs)
             for dev, f in figs.items()}
    assert {("fp32", "cpu"), ("fp32", "openvino")} <= set(timed)
    assert (report["chosen"], report["device"]) == choose(timed) and "1.10x" in report["rule"]
    assert "within 10%" in report["rule"]
    assert report["cpu"] and report["int8_target"]
    manifest = read_manifest(out)
    assert manifest.precision.value == ("bf16" if report["chosen"] == "bf16" else "fp32")
    model = embedrt.load(out, device="auto")  # auto takes the device the export measured fastest
    assert model.device.split(":")[0] == report["device"]
    assert [p.name for p in tmp_path.iterdir()] == ["auto"]  # the scratch folder is gone
    with pytest.raises(FileExistsError):
        export_auto(str(tiny_bert[0]), out, overwrite=False)


def _run(passages_per_s: float, p50: float, precision: str) -> dict[str, float | str]:
    return {"passages_per_s": passages_per_s, "query_p50_ms": p50, "precision": precision}


def test_auto_buys_a_less_exact_model_only_with_a_clear_gain() -> None:
    # the AMD EPYC's auto run of 2026-12-01: within 10% the lower single-query latency wins (ONNX Runtime), and
    # an int8 5% faster than the best fp32 is noise, not a reason; measured against that best, not the pick
    fp32 = {("fp32", "cpu"): _run(13.0, 8.0, "fp32"), ("fp32", "openvino"): _run(13.7, 11.8, "fp32")}
    assert choose(fp32) == ("fp32", "cpu")
    assert choose({**fp32, ("int8-ort-static", "cpu"): _run(14.4, 6.5, "int8")}) == ("fp32", "cpu")
    assert choose({**fp32, ("int8-ort-static", "cpu"): _run(15.1, 6.5, "int8")}) == ("int8-ort-static", "cpu")
    slower = {("fp32", "cpu"): _run(12.0, 8.0, "fp32"), ("fp32", "openvino"): _run(13.7, 11.8, "fp32")}
    assert choose(slower) == ("fp32", "openvino")  # 14% faster: not a tie
    # an AMX CPU: the fp32 folder runs bf16 on OpenVINO (3x), and int8 must clear 1.10x of that
    amx = {("fp32", "cpu"): _run(9.7, 9.7, "fp32"), ("fp32", "openvino"): _run(32.0, 5.0, "bf16"),
           ("bf16", "openvino"): _run(31.5, 5.1, "bf16")}
    assert choose(amx) == ("fp32", "openvino")
    assert choose({**amx, ("int8-ov-static", "openvino"): _run(46.6, 2.6, "int8")}) == ("int8-ov-static", "openvino")
    assert choose({**amx, ("int8-ov-static", "openvino"): _run(34.0, 2.6, "int8")}) == ("fp32", "openvino")
    # the gain is measured against the choice so far, not against fp32
    ladder = {("fp32", "cpu"): _run(10.0, 9.0, "fp32"), ("bf16", "openvino"): _run(11.5, 8.0, "bf16"),
              ("int8-ov-static", "openvino"): _run(12.0, 7.0, "int8")}
    assert choose(ladder) == ("bf16", "openvino")
    # a slower int8 run with a lower p50 does not hide a faster one that clears the gain
    fast_int8 = {**fp32, ("int8-ov-static", "openvino"): _run(16.0, 9.0, "int8")}
    assert choose(fast_int8) == ("int8-ov-static", "openvino")
    assert choose({**fast_int8, ("int8-ort-static", "cpu"): _run(14.5, 6.5, "int8")}) == ("int8-ov-static", "openvino")
    with pytest.raises(ValueError, match="no timed candidate"):
        choose({})


def test_auto_refuses_smooth_quant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only considers batch-invariant int8"):
        export_auto("unused", tmp_path / "x", overwrite=False, smooth_quant=True)
    assert not (tmp_path / "x").exists()


def test_auto_gives_no_speed_advice_about_its_own_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """On a CPU without VNNI each passing OpenVINO int8 candidate warned "runs slower than fp32" naming its
    scratch folder (`.out.tmp-.../int8-ov-static`): advice to run the measurement auto is making."""
    from embedrt.errors import ParityError
    from embedrt.model import openvino_int8_advice

    monkeypatch.setattr("embedrt.cpu.detect_target", lambda: "avx2")
    assert openvino_int8_advice(tmp_path) is not None  # outside auto it is given
    seen: list[str | None] = []

    def candidate(source: str, output: Path, **settings: object) -> Path:
        seen.append(openvino_int8_advice(output))
        raise ParityError("onnx", 0.5, 1.0, 0.99999)

    monkeypatch.setattr("embedrt.export.pipeline.export_model", candidate)
    with pytest.raises(embedrt.errors.QualityGateError, match="no candidate passed") as info:
        export_auto(str(tmp_path), tmp_path / "x", overwrite=False, rounds=1)
    assert len(seen) >= 3 and seen == [None] * len(seen)
    # every candidate's reason is in the error; a bf16 this CPU lacks units for is "not tried" (was a KeyError)
    assert str(info.value).count("parity failed: min cosine 0.5000000") == len(seen)
    assert ("bf16: not tried" in str(info.value)) is (bf16_units() is None)
    assert not (tmp_path / "x").exists()


def test_cli_auto_refuses_settings_it_chooses_itself(tiny_bert: tuple[Path, Path], tmp_path: Path) -> None:
    for extra in (["--quantize", "static"], ["--format", "openvino"], ["--min-cosine", "0.99"]):
        proc = subprocess.run([sys.executable, "-m", "embedrt.cli", "export", str(tiny_bert[0]), "-o",
                               str(tmp_path / "x"), "--precision", "auto", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "--precision auto picks" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_cpu_name_from_cpuinfo(tmp_path: Path) -> None:
    from embedrt.cpu import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Test CPU\n"
                    "flags\t\t: fpu avx2\n")
    assert cpu_name(info) == "Intel(R) Xeon(R) Test CPU"
    assert cpu_name(tmp_path / "missing")  # falls back to what platform reports, never empty


@pytest.mark.parametrize(("flags", "says"), [
    ("fpu avx2 fma", ["ONNX Runtime first", "no bf16 units", "int8 target avx2", "7-bit weights"]),  # AMD Zen 2/3
    ("avx2 avx512f avx512_vnni avx512_bf16", ["OpenVINO first", "bf16 units avx512_bf16, no AMX: f32 is faster",
                                              "avx512_vnni"]),
    ("avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", ["OpenVINO first",
                                                                         "bf16 units amx_bf16: bf16 pays", "amx"]),
])
def test_cpu_summary_says_which_path_this_cpu_takes(tmp_path: Path, flags: str, says: list[str]) -> None:
    from embedrt.cpu import summary

    info = tmp_path / "cpuinfo"
    info.write_text(f"model name\t: Test CPU\nflags\t\t: {flags}\n")
    line = summary(cpuinfo=info)
    assert line.startswith("Test CPU; ") and all(s in line for s in says), line
    assert ("7-bit" in line) == ("vnni" not in flags and "amx" not in flags)
