"""Device selection with faked provider lists: explicit choices, visible fallbacks, thread budget."""

from __future__ import annotations

import logging

import pytest

import embedrt
from embedrt.errors import ProviderUnavailableError
from embedrt.providers import cgroup_cpu_quota, default_thread_count, parse_device


@pytest.mark.parametrize(
    "text,kind,index,ov",
    [("cpu", "cpu", 0, "CPU"), ("cuda", "cuda", 0, "CPU"), ("cuda:1", "cuda", 1, "CPU"),
     ("openvino", "openvino", 0, "CPU"), ("openvino:gpu.1", "openvino", 0, "GPU.1"), ("AUTO", "auto", 0, "CPU")],
)
def test_parse_device(text: str, kind: str, index: int, ov: str) -> None:
    req = parse_device(text)
    assert (req.kind, req.index, req.openvino_device) == (kind, index, ov)


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_bad_device_lists_valid_ones(text: str) -> None:
    with pytest.raises(ValueError, match="valid: auto, auto:cpu, cpu, cuda, cuda:N"):
        parse_device(text)


@pytest.mark.parametrize("text", ["openvino:AUTO", "openvino:auto:CPU", "openvino:MULTI:CPU,GPU", "openvino:HETERO"])
def test_openvinos_own_device_choice_is_refused(text: str) -> None:
    """openvino:AUTO compiled without the CPU's threads and precision (dropped silently): on a bf16 CPU it would
    run bf16 while model.precision said fp32."""
    with pytest.raises(ValueError, match="is not supported, as embedrt pins each device's properties itself"):
        parse_device(text)


def test_an_openvino_device_name_that_is_not_listed_is_unavailable(tiny_bert, caplog) -> None:  # type: ignore[no-untyped-def]
    """openvino:CPU.0 was a ModelFolderError blaming the folder, and allow_fallback did not fall back."""
    with pytest.raises(ProviderUnavailableError, match=r"OpenVINO device 'CPU\.0' is not available here"):
        embedrt.load(tiny_bert[1], device="openvino:CPU.0")
    with caplog.at_level(logging.WARNING, logger="embedrt"):
        model = embedrt.load(tiny_bert[1], device="openvino:CPU.0", allow_fallback=True)
    assert model.device == "cpu" and "falling back to the CPU" in caplog.text


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="this machine has the CUDA provider")
def test_cuda_without_cuda_says_why_and_fallback_warns(tiny_bert, caplog) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProviderUnavailableError, match="has no CUDA provider"):
        embedrt.load(tiny_bert[1], device="cuda")
    with caplog.at_level(logging.WARNING, logger="embedrt"):
        model = embedrt.load(tiny_bert[1], device="cuda", allow_fallback=True)
    assert model.device == "cpu" and model.providers == ["CPUExecutionProvider"]
    assert any("CUDA" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert model.encode(["x"]).shape == (1, model.dim)


def test_session_that_silently_lost_cuda_is_caught(tiny_bert, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("embedrt.providers.cuda_unavailable_reason", lambda ort: None)
    monkeypatch.setattr("embedrt.plan.cuda_unavailable_reason", lambda ort: None)
    real = onnxruntime.InferenceSession

    def cpu_only_session(path, sess_options=None, providers=None, **kwargs):  # type: ignore[no-untyped-def]
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", cpu_only_session)
    with pytest.raises(ProviderUnavailableError, match=r"asked for CUDAExecutionProvider but .* came up with"):
        embedrt.load(tiny_bert[1], device="cuda")


def test_auto_takes_the_faster_cpu_backend_of_this_cpu(tiny_bert, stand_in_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import embedrt.cpu
    from embedrt.export.synthetic import StandIn
    from embedrt.manifest import read_manifest
    from embedrt.plan import auto_requests

    if _has_cuda():
        pytest.skip("auto would pick CUDA here")
    real = embedrt.cpu.cpu_flags()
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: real | {"avx512f"})  # OpenVINO leads with AVX-512
    assert embedrt.load(tiny_bert[1], device="auto").device == "openvino:CPU"
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: real - {"avx512f"})  # AVX2 only: ONNX Runtime leads
    assert embedrt.load(tiny_bert[1], device="auto").device == "cpu"
    # a folder timed by export --precision auto keeps its device on the CPU it was timed on, not on another
    manifest = read_manifest(tiny_bert[1])
    here = dataclasses.replace(manifest, extra={**manifest.extra, "auto": {"device": "openvino",
                                                                          "cpu": embedrt.cpu.cpu_name()}})
    elsewhere = dataclasses.replace(manifest, extra={**manifest.extra, "auto": {"device": "openvino",
                                                                               "cpu": "Another CPU"}})
    assert [r.kind for r in auto_requests(here)] == ["openvino", "cpu"]
    assert [r.kind for r in auto_requests(elsewhere)] == ["cpu", "openvino"]
    monkeypatch.undo()
    _, onnx_only = stand_in_factory(StandIn(architecture="distilbert", seed=3), formats="onnx")
    assert embedrt.load(onnx_only, device="auto").device == "cpu"
    with pytest.raises(ProviderUnavailableError, match="holds no OpenVINO IR"):
        embedrt.load(onnx_only, device="openvino")


def test_unknown_openvino_device_lists_available(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProviderUnavailableError, match="'NPU' is not available here; available: CPU"):
        embedrt.load(tiny_bert[1], device="openvino:NPU")


def test_thread_budget_follows_cgroup_quota(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    monkeypatch.setattr("embedrt.providers.cgroup_cpu_quota", lambda: 1.5)
    assert default_thread_count() == 1
    monkeypatch.setattr("embedrt.providers.cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert default_thread_count() == 3


def test_openvino_cache_dir_and_hint(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "ov-cache"
    model = embedrt.load(tiny_bert[1], device="openvino", openvino_cache_dir=str(cache), performance_hint="throughput")
    assert any(cache.iterdir())  # the compiled blob was cached
    again = embedrt.load(tiny_bert[1], device="openvino", openvino_cache_dir=str(cache))
    import numpy as np

    np.testing.assert_allclose(model.encode(["a b c"]), again.encode(["a b c"]), atol=1e-6)
    with pytest.raises(ValueError, match="valid: latency, throughput"):
        embedrt.load(tiny_bert[1], device="openvino", performance_hint="fast")


def test_auto_cpu_never_takes_a_gpu(tiny_bert, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``auto`` (load's default) puts CUDA first where a CUDA session can start; ``auto:cpu`` (the Ray
    actors' default: they reserve CPUs) only the folder's CPU backends."""
    from embedrt.manifest import read_manifest
    from embedrt.plan import auto_requests
    from embedrt.providers import DeviceRequest, parse_device

    assert parse_device("auto:cpu") == DeviceRequest("auto", cpu_only=True)
    assert str(parse_device("AUTO:CPU")) == "auto:cpu"
    with pytest.raises(ValueError, match="valid: auto, auto:cpu, cpu"):
        parse_device("auto:gpu")
    monkeypatch.setattr("embedrt.plan.cuda_unavailable_reason", lambda ort: None)  # as if CUDA could start
    manifest = read_manifest(tiny_bert[1])
    assert auto_requests(manifest)[0].kind == "cuda"
    assert "cuda" not in [r.kind for r in auto_requests(manifest, cpu_only=True)]
    assert embedrt.load(tiny_bert[1], device="auto:cpu").device in ("cpu", "openvino:CPU")


def test_spinning_is_the_plans_and_reaches_the_session_without_changing_a_vector(tiny_bert, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import onnxruntime

    real = onnxruntime.InferenceSession
    seen: list[str] = []

    def recording_session(path, sess_options=None, **kwargs):  # type: ignore[no-untyped-def]
        try:
            seen.append(sess_options.get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: ONNX Runtime's own default
            seen.append("default")
        return real(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    texts = ["a query", "a longer passage about the same thing, with more words in it", "x"]
    spinning = embedrt.load(tiny_bert[1], device="cpu", threads=2)
    sleeping = embedrt.load(tiny_bert[1], device="cpu", threads=2, spinning=False)
    assert (spinning.plan.spinning, sleeping.plan.spinning) == (True, False)
    assert seen == ["default", "0"]  # ONNX Runtime's own default (spin) unless told otherwise
    assert np.array_equal(spinning.encode(texts), sleeping.encode(texts))
    with pytest.raises(TypeError, match="spinning must be True or False, got 'no'"):
        embedrt.load(tiny_bert[1], device="cpu", spinning="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("name,value", [("verify", "no"), ("allow_fallback", 0), ("huge_pages", "false"),
                                        ("spinning", None), ("performance_hint", 1)])
def test_load_refuses_non_boolean_flags(tiny_bert, name, value) -> None:  # type: ignore[no-untyped-def]
    """A string is always truthy: ``huge_pages="no"`` used to mean True. Every boolean option now takes only
    True or False, and the error names the option."""
    with pytest.raises((TypeError, ValueError), match=name):
        embedrt.load(tiny_bert[1], device="cpu", **{name: value})


def test_settings_of_the_other_backend_are_refused_or_reported(tiny_bert, caplog) -> None:  # type: ignore[no-untyped-def]
    """OpenVINO's settings on ONNX Runtime (and ONNX Runtime's on OpenVINO) were silently ignored. With an
    explicit device they are refused, naming them; with ``auto`` a warning says what the backend it took left
    unused."""
    with pytest.raises(ValueError, match=r"openvino_cache_dir='/tmp/x', performance_hint='throughput': OpenVINO "
                                         r"only, but device='cpu' runs ONNX Runtime"):
        embedrt.load(tiny_bert[1], device="cpu", openvino_cache_dir="/tmp/x", performance_hint="throughput")
    with pytest.raises(ValueError, match=r"spinning=False: ONNX Runtime only, but device='openvino:CPU' runs "
                                         "OpenVINO"):
        embedrt.load(tiny_bert[1], device="openvino", spinning=False)
    # the defaults are nobody's choice: no complaint on either backend
    embedrt.load(tiny_bert[1], device="cpu", performance_hint=None)
    with caplog.at_level(logging.WARNING, logger="embedrt"):
        model = embedrt.load(tiny_bert[1], device="auto:cpu", performance_hint="throughput", spinning=False)
    unused = "spinning=False" if model.device.startswith("openvino") else "performance_hint='throughput'"
    assert f"{unused} not used: device='auto' took {model.device}" in caplog.text
