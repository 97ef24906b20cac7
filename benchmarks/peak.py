"""This machine's dense matmul peak through ONNX Runtime (fp32 sgemm, u8 x s8 int8 gemm) and numpy."""

from __future__ import annotations

import time

import numpy as np


def _matmul_model(int8: bool, m: int, k: int, n: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])
        w = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w")
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])
        zp_a = numpy_helper.from_array(np.array(128, dtype=np.uint8), "za")
        node = helper.make_node("MatMulInteger", ["a", "w", "za"], ["y"])
        inits = [w, zp_a]
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        inits = [w]
    graph = helper.make_graph([node], "peak", [a], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString())


def ort_peak(threads: int, int8: bool, m: int = 4096, k: int = 768, n: int = 3072, reps: int = 5) -> float:
    """Best GFLOP/s (or GOP/s) of one FFN-shaped matmul in ONNX Runtime with ``threads`` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(_matmul_model(int8, m, k, n), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (m, k), dtype=np.uint8) if int8 else rng.standard_normal((m, k), dtype=np.float32)
    sess.run(None, {"a": a})
    best = min(_timed(lambda: sess.run(None, {"a": a})) for _ in range(reps))
    return 2.0 * m * k * n / best / 1e9


def openvino_peak(threads: int, m: int = 4096, k: int = 768, n: int = 3072, reps: int = 5) -> float | None:
    """Best GFLOP/s of the same fp32 matmul in OpenVINO (oneDNN), fp32 kept; None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    model = core.read_model(_matmul_model(False, m, k, n), b"")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    request.infer({0: a})
    best = min(_timed(lambda: request.infer({0: a})) for _ in range(reps))
    return 2.0 * m * k * n / best / 1e9


def numpy_peak(m: int = 4096, k: int = 768, n: int = 3072, reps: int = 5) -> float:
    """Best GFLOP/s of numpy's sgemm (its BLAS thread count as configured)."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2.0 * m * k * n / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(threads: int) -> dict[str, float | None]:
    """Every peak, and the fp32 reference: the best sgemm any of the three libraries reaches here."""
    out: dict[str, float | None] = {"ort_fp32_gflops": ort_peak(threads, False),
                                    "openvino_fp32_gflops": openvino_peak(threads),
                                    "numpy_fp32_gflops": numpy_peak(), "ort_int8_gops": ort_peak(threads, True)}
    out["fp32_gflops"] = max(v for k, v in out.items() if k.endswith("fp32_gflops") and v is not None)
    return out


def describe(peaks: dict[str, float | None]) -> str:
    """One sentence for the report."""
    parts = [f"{name} {peaks[key]:.0f}" for name, key in (("ONNX Runtime", "ort_fp32_gflops"),
             ("OpenVINO", "openvino_fp32_gflops"), ("numpy", "numpy_fp32_gflops")) if peaks.get(key)]
    fp32 = peaks.get("fp32_gflops") or peaks["ort_fp32_gflops"]
    return (f"Peak fp32 matmul on this machine (4096 x 768 x 3072): {', '.join(parts)} GFLOP/s; the best, "
            f"{fp32:.0f}, is the fp32 reference. int8 gemm (ONNX Runtime u8 x s8): {peaks['ort_int8_gops']:.0f} GOP/s.")


def fraction(peaks: dict[str, float | None], rate: float, precision: str) -> str:
    """A system's achieved rate as a share of the peak for its precision."""
    if precision == "int8":
        return f"{100 * rate / float(peaks['ort_int8_gops'] or 1):.0f}% int8"
    return f"{100 * rate / float(peaks.get('fp32_gflops') or peaks['ort_fp32_gflops'] or 1):.0f}%"
