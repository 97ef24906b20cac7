"""bf16: OpenVINO on CPUs with bf16 units, checked against sentence-transformers in bf16; refused elsewhere."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

import embedrt
import embedrt.cpu
from embedrt.cpu import bf16_units
from embedrt.errors import ProviderUnavailableError
from embedrt.export import export_model
from embedrt.export.options import ExportOptions, Format
from embedrt.manifest import Precision, read_manifest
from embedrt.ops import row_cosine
from embedrt.plan import openvino_cpu_precision

needs_bf16 = pytest.mark.skipif(bf16_units() is None, reason="needs a CPU with AMX or AVX512_BF16")
NO_BF16 = frozenset({"avx2", "fma", "avx512f"})
TEXTS = ["how do vaccines train the immune system", "a" * 300, "interest rates and inflation in 2024",
         "The mitochondria is the powerhouse of the cell. " * 20, "x", "Ünïcödé and emoji 😀 text"]


@pytest.fixture(scope="module")
def minilm_bf16(tmp_path_factory: pytest.TempPathFactory, minilm_checkpoint: Path) -> Path:
    """all-MiniLM-L6-v2 exported with --precision bf16: here where this CPU has bf16 units; elsewhere as a CPU
    with them would export it, standing in for a folder made on such a machine and copied to this one."""
    out = tmp_path_factory.mktemp("bf16") / "minilm-bf16"
    if bf16_units() is not None:
        return export_model("all-MiniLM-L6-v2", out, precision="bf16", formats="openvino")
    real = embedrt.cpu.cpu_flags()
    with pytest.MonkeyPatch.context() as patch:  # the export's bf16 check then computes f32 (no bf16 here)
        patch.setattr("embedrt.cpu.cpu_flags", lambda *a: real | {"avx512_bf16"})
        return export_model("all-MiniLM-L6-v2", out, precision="bf16", formats="openvino")


@needs_bf16
def test_bf16_folder_runs_in_bf16_within_its_parity(minilm_bf16: Path, minilm_st) -> None:  # type: ignore[no-untyped-def]
    manifest = read_manifest(minilm_bf16)
    assert manifest.precision is Precision.BF16 and list(manifest.graphs) == ["openvino"]
    model = embedrt.load(minilm_bf16, device="openvino")
    assert model.precision == "bf16" and model.plan.inference_precision == "bf16"
    # independently of the exporter's own check: recomputed against sentence-transformers here
    want = minilm_st.encode(TEXTS, convert_to_numpy=True)
    got = model.encode(TEXTS)
    assert row_cosine(want, got).min() >= 0.9999
    # and it really runs in bf16: the f32 run of the same IR is closer to sentence-transformers
    exact = embedrt.load(minilm_bf16, device="openvino", allow_fallback=True)
    assert exact.precision == "bf16"  # the CPU has units: no fallback happens
    assert np.abs(got - want).max() > 1e-5


def test_bf16_without_bf16_units_is_refused_or_runs_f32(minilm_bf16: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: NO_BF16)
    with pytest.raises(ProviderUnavailableError, match=r"no bf16 units .*allow_fallback=True"):
        embedrt.load(minilm_bf16, device="openvino")
    with caplog.at_level(logging.WARNING, logger="embedrt"):
        model = embedrt.load(minilm_bf16, device="openvino", allow_fallback=True)
    assert model.precision == "fp32" and model.plan.inference_precision == "f32"
    assert "running it in f32" in caplog.text
    monkeypatch.undo()
    if bf16_units() is not None:
        fp32_run = model.encode(TEXTS)
        bf16_run = embedrt.load(minilm_bf16, device="openvino").encode(TEXTS)
        assert row_cosine(fp32_run, bf16_run).min() >= 0.9999 and not np.array_equal(fp32_run, bf16_run)


@pytest.mark.skipif(bf16_units() is not None, reason="needs a CPU without bf16 units (this one has them)")
def test_bf16_folder_on_this_cpu_without_units(minilm_bf16: Path, minilm_st, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """No flags faked: this CPU's own /proc/cpuinfo says no bf16, and the folder is refused or runs exact f32."""
    from embedrt.cli import main

    with pytest.raises(ProviderUnavailableError) as refused:
        embedrt.load(minilm_bf16, device="openvino")
    message = str(refused.value)
    assert embedrt.cpu.cpu_name() in message and "no bf16 units" in message and "allow_fallback=True" in message
    with pytest.raises(ProviderUnavailableError, match="no bf16 units"):  # auto does not step around it either
        embedrt.load(minilm_bf16, device="auto")
    out = tmp_path / "v.npy"
    assert main(["encode", str(minilm_bf16), "--device", "openvino", "--text", TEXTS[0], "-o", str(out)]) == 2
    assert "no bf16 units" in capsys.readouterr().err and not out.exists()
    # the fallback, and inference_precision="f32" without it, run the folder's fp32 IR: the fp32 model exactly
    fallback = embedrt.load(minilm_bf16, device="openvino", allow_fallback=True)
    exact = embedrt.load(minilm_bf16, device="openvino", inference_precision="f32")
    for model in (fallback, exact):
        assert model.precision == "fp32" and model.plan.inference_precision == "f32"
    got = fallback.encode(TEXTS)
    assert np.array_equal(got, exact.encode(TEXTS))
    assert row_cosine(minilm_st.encode(TEXTS, convert_to_numpy=True), got).min() >= 0.99999
    assert main(["encode", str(minilm_bf16), "--device", "openvino", "--allow-fallback", "--text", TEXTS[0],
                 "-o", str(out)]) == 0
    assert np.array_equal(np.load(out), got[:1])


def test_bf16_export_on_a_cpu_without_units_is_refused(tiny_bert, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: NO_BF16)
    with pytest.raises(ProviderUnavailableError, match="needs a CPU with bf16 units"):
        export_model(str(tiny_bert[0]), tmp_path / "out", precision="bf16", formats="openvino")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"precision": "bf16", "formats": "onnx"}, "OpenVINO only"),
    ({"precision": "bf16", "formats": "onnx,openvino"}, "OpenVINO only"),
    ({"precision": "bf16", "formats": "openvino", "quantize": "static"}, "exclude each other"),
])
def test_bf16_options_that_cannot_work_are_refused(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExportOptions.parse(**kwargs)
    assert ExportOptions.parse(precision="bf16", formats="openvino").parity_threshold == 0.9999
    assert ExportOptions.parse(precision="bf16").formats == (Format.OPENVINO,)  # bf16 without --format: the IR


def test_default_formats_follow_the_precision(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    assert ExportOptions.parse().formats == ExportOptions().formats == (Format.ONNX, Format.OPENVINO)
    assert ExportOptions.parse(precision="fp16").formats == (Format.ONNX,)
    assert ExportOptions.parse(quantize="dynamic").formats == (Format.ONNX,)
    assert ExportOptions.parse(quantize="static").formats == (Format.ONNX,)
    assert ExportOptions.parse(quantize="static", smooth_quant=True).formats == (Format.OPENVINO,)  # NNCF's only
    assert ExportOptions.parse(formats="openvino").formats == (Format.OPENVINO,)  # given: as given
    with pytest.raises(ValueError, match="no format given"):
        ExportOptions.parse(formats=" , ")
    monkeypatch.setattr("embedrt.export.options._openvino_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="embedrt.export"):
        assert ExportOptions.parse().formats == (Format.ONNX,)
    assert "openvino is not installed" in caplog.text and "in f32 even on CPUs with bf16" in caplog.text


def test_default_export_and_load_take_each_cpus_fast_faithful_path(  # type: ignore[no-untyped-def]
        tiny_bert, tmp_path, monkeypatch, capsys, caplog) -> None:
    """``embedrt export SOURCE`` then ``embedrt.load(folder)``, no options: bf16 with its parity check on
    AMX CPUs, OpenVINO f32 on other AVX-512 CPUs, ONNX Runtime f32 on AVX2 ones. The first export stands in
    for one made on an AMX CPU (flags patched; without bf16 units OpenVINO computes its bf16 check in f32)."""
    from embedrt.cli import main

    monkeypatch.setattr("embedrt.plan.cuda_unavailable_reason", lambda ort: "no GPU in this test")
    real = embedrt.cpu.cpu_flags()
    amx = real | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: amx)
    assert main(["export", str(tiny_bert[0]), "-o", str(tmp_path / "default")]) == 0
    assert "openvino in bf16 (amx_bf16): min cosine" in capsys.readouterr().out
    folder = tmp_path / "default"
    manifest = read_manifest(folder)
    assert sorted(manifest.graphs) == ["onnx", "openvino"] and manifest.precision is Precision.FP32
    record = manifest.parity["openvino"]["bf16"]
    assert record["passed"] and record["units"] == "amx_bf16" and record["threshold"] == 0.9999

    fast = embedrt.load(folder)
    assert (fast.device, fast.precision, fast.plan.inference_precision) == ("openvino:CPU", "bf16", "bf16")
    assert fast.plan.openvino_config["INFERENCE_PRECISION_HINT"] == "bf16"
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: amx - {"amx_bf16", "amx_tile"})  # AVX512_BF16 only
    assert (lambda m: (m.device, m.precision))(embedrt.load(folder)) == ("openvino:CPU", "fp32")
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: frozenset({"avx2", "fma", "avx_vnni"}))
    assert (lambda m: (m.device, m.precision))(embedrt.load(folder)) == ("cpu", "fp32")
    # the CLI's commands default to the same path
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: amx)
    assert main(["encode", str(folder), "--text", "hello", "-o", str(tmp_path / "v.npy")]) == 0
    assert "on openvino:CPU" in capsys.readouterr().out

    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: real)  # this CPU as it is
    assert main(["export", str(tiny_bert[0]), "-o", str(tmp_path / "here")]) == 0
    printed = capsys.readouterr().out
    here = read_manifest(tmp_path / "here")
    assert sorted(here.graphs) == ["onnx", "openvino"]
    model = embedrt.load(tmp_path / "here")
    if bf16_units() is None:  # nothing here could check bf16: the folder runs f32 on every CPU, and says so
        assert "bf16" not in here.parity["openvino"] and "not checked in bf16" in printed
        assert model.precision == "fp32"
        monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: amx)
        with caplog.at_level(logging.INFO, logger="embedrt"):
            assert embedrt.load(tmp_path / "here").precision == "fp32"
        assert "did not check it in bf16 on AMX" in caplog.text
    elif "amx_bf16" in real:
        assert model.precision == "bf16" and model.device == "openvino:CPU"
    assert row_cosine(model.encode(TEXTS), embedrt.load(folder, device="cpu").encode(TEXTS)).min() >= 0.9999


def _with_bf16_record(manifest, passed: bool = True, min_cosine: float = 0.99995,  # type: ignore[no-untyped-def]
                      units: str = "amx_bf16"):
    parity = {**manifest.parity, "openvino": {**manifest.parity["openvino"], "bf16": {
        "min_cosine": min_cosine, "min_cosine_unbatched": min_cosine, "threshold": 0.9999, "passed": passed,
        "units": units}}}
    return dataclasses.replace(manifest, parity=parity)


def test_which_folders_run_bf16_on_which_cpu(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    manifest = read_manifest(tiny_bert[1])
    manifest = dataclasses.replace(manifest, parity={**manifest.parity, "openvino": {
        k: v for k, v in manifest.parity["openvino"].items() if k != "bf16"}})
    amx = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    dot_only = frozenset({"avx512f", "avx512_bf16"})
    # fp32 folders: bf16 only where the export checked it in bf16 and the CPU has AMX (where bf16 pays)
    assert openvino_cpu_precision(manifest, flags=amx) == "f32"  # never checked in bf16
    checked = _with_bf16_record(manifest)
    assert openvino_cpu_precision(checked, flags=amx) == "bf16"
    assert openvino_cpu_precision(checked, flags=dot_only) == "f32"  # AVX512_BF16 alone: slower than f32
    # checked on AVX512_BF16 only: AMX runs other kernels, so the check does not vouch for them
    assert openvino_cpu_precision(_with_bf16_record(manifest, units="avx512_bf16"), flags=amx) == "f32"
    assert openvino_cpu_precision(checked, flags=NO_BF16) == "f32"
    assert openvino_cpu_precision(_with_bf16_record(manifest, passed=False, min_cosine=0.9991), flags=amx) == "f32"
    assert openvino_cpu_precision(checked, flags=amx, requested="f32") == "f32"
    assert openvino_cpu_precision(manifest, flags=dot_only, requested="bf16") == "bf16"  # asked for: units suffice
    asked = r"bf16 was asked for, but this CPU \(.*\) has no bf16 units .*bf16 cannot run here"
    with pytest.raises(ProviderUnavailableError, match=asked):
        openvino_cpu_precision(checked, flags=NO_BF16, requested="bf16")
    assert openvino_cpu_precision(checked, flags=NO_BF16, requested="bf16", allow_fallback=True) == "f32"
    # the guard int8 needs: its bf16 attention went wrong at sequence length 32 in OpenVINO 2026.4.1
    int8 = dataclasses.replace(checked, precision=Precision.INT8)
    assert openvino_cpu_precision(int8, flags=amx) == "f32"
    with pytest.raises(ProviderUnavailableError, match="int8 folders keep their non-int8 ops in f32"):
        openvino_cpu_precision(int8, flags=amx, requested="bf16")
    bf16 = dataclasses.replace(manifest, precision=Precision.BF16)
    assert openvino_cpu_precision(bf16, flags=dot_only) == "bf16"
    assert openvino_cpu_precision(bf16, allow_fallback=True, flags=NO_BF16) == "f32"
    with pytest.raises(ProviderUnavailableError):
        openvino_cpu_precision(bf16, flags=NO_BF16)
    assert embedrt.load(tiny_bert[1]).precision == "fp32"
    with pytest.raises(ProviderUnavailableError, match="OpenVINO only"):
        embedrt.load(tiny_bert[1], device="cpu", inference_precision="bf16")
    with pytest.raises(ValueError, match="unknown inference_precision"):
        embedrt.load(tiny_bert[1], device="openvino", inference_precision="fp16")


def test_fp32_export_records_its_bf16_check(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """Every export made on a CPU with bf16 units checks its IR in bf16 too; elsewhere there is no record."""
    record = read_manifest(tiny_bert[1]).parity["openvino"].get("bf16")
    if bf16_units() is None:
        assert record is None
        return
    assert record is not None and record["threshold"] == 0.9999 and record["units"] == bf16_units()
    assert record["passed"] is (min(record["min_cosine"], record["min_cosine_unbatched"]) >= 0.9999)
    assert 0.99 < record["min_cosine"] < 1.0  # really computed in bf16: not the f32 result


@needs_bf16
def test_fp32_folder_runs_bf16_on_amx_within_its_check(minilm_dir: Path, minilm_st, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On an AMX CPU the default export runs at bf16 speed with bf16 parity; f32 on request (AMX simulated
    here by its flag: this CPU's AVX512_BF16 units really compute the bf16)."""
    import json
    import shutil

    import embedrt.cpu

    record = read_manifest(minilm_dir).parity["openvino"]["bf16"]
    assert record["passed"], record
    if record["units"] != "amx_bf16":  # exported here, on AVX512_BF16: as if the export had run on AMX
        copy = tmp_path / "minilm"
        shutil.copytree(minilm_dir, copy)
        raw = json.loads((copy / "embedrt.json").read_text())
        raw["parity"]["openvino"]["bf16"]["units"] = "amx_bf16"
        (copy / "embedrt.json").write_text(json.dumps(raw))
        minilm_dir = copy

    real = embedrt.cpu.cpu_flags()
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: real | {"amx_bf16", "amx_tile"})
    fast = embedrt.load(minilm_dir, device="openvino")
    assert fast.precision == "bf16" and fast.plan.inference_precision == "bf16"
    assert embedrt.load(minilm_dir, device="auto").precision == "bf16"
    want = minilm_st.encode(TEXTS, convert_to_numpy=True)
    got = fast.encode(TEXTS)
    assert row_cosine(want, got).min() >= 0.9999 and np.abs(got - want).max() > 1e-5
    exact = embedrt.load(minilm_dir, device="openvino", inference_precision="f32")
    assert exact.precision == "fp32"
    np.testing.assert_allclose(exact.encode(TEXTS), want, atol=2e-5)
    monkeypatch.undo()
    assert embedrt.load(minilm_dir, device="openvino").precision == ("bf16" if "amx_bf16" in real else "fp32")
    assert embedrt.load(minilm_dir, device="cpu", inference_precision="f32").precision == "fp32"
