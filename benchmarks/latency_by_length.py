"""Single-text latency against text length: ``python -m benchmarks.latency_by_length MODEL_DIR``.

One text per ``encode`` call, as a search service embeds a query. The main suite times real queries of
one length mix; this shows how the p50 grows with the token count, for the devices asked for, so a
latency budget can be read off for a deployment's own query lengths. ``--matmul`` adds the same row
counts through DistilBERT-base's FFN matmuls alone, in ONNX Runtime and OpenVINO: the FLOP rate and the
weight-read rate that a few rows reach, which is what bounds fp32 single-text latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

LENGTHS = (8, 12, 16, 18, 20, 24, 32, 48, 64)
FFN = (6, 768, 3072)  # DistilBERT-base: layers, width, FFN width


def timings(calls: int, warmup: int, fn, *args) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of ``calls`` calls of ``fn(*args)`` after ``warmup`` untimed ones, sorted."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)


def ffn_stack(layers: int, width: int, inner: int) -> bytes:
    """An ONNX graph of ``layers`` FFN matmul pairs (width -> inner -> width) with distinct fp32 weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        for j, shape in enumerate(((width, inner), (inner, width))):
            w = f"w{i}_{j}"
            weights.append(numpy_helper.from_array(0.02 * rng.standard_normal(shape, dtype=np.float32), w))
            nodes.append(helper.make_node("MatMul", [x, w], [f"h{i}_{j}"]))
            x = f"h{i}_{j}"
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def matmul_rates(threads: int, rows: list[int], calls: int) -> dict[str, dict[int, dict[str, float]]]:
    """p50 of the FFN matmul stack at each row count (= tokens of one text), in ONNX Runtime (MLAS) and
    OpenVINO (oneDNN), with the FLOP rate and the rate at which the fp32 weights are read."""
    import onnxruntime as ort

    layers, width, inner = FFN
    graph = ffn_stack(layers, width, inner)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    runners = {"onnxruntime": lambda x: session.run(None, {"x": x})}
    try:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(graph, b""), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        runners["openvino"] = lambda x: request.infer({0: x})
    except ImportError:
        pass
    weight_bytes = 4 * 2 * layers * width * inner
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, run in runners.items():
        out[name] = {}
        for m in rows:
            x = np.random.default_rng(1).standard_normal((m, width), dtype=np.float32)
            t = statistics.median(timings(calls, 10, run, x))
            out[name][m] = {"p50_ms": round(1000 * t, 2), "gflops": round(2 * m * weight_bytes / 4 / t / 1e9, 1),
                            "weights_gb_per_s": round(weight_bytes / t / 1e9, 1)}
    return out


def text_of(model, tokens: int) -> str:  # type: ignore[no-untyped-def]
    """A text that the model's tokenizer turns into exactly ``tokens`` ids (special tokens included)."""
    for words in range(1, tokens + 1):
        text = " ".join(["the"] * words)
        got = len(model.tokenize([text])[0])
        if got == tokens:
            return text
        if got > tokens:
            break
    raise ValueError(f"cannot build a text of exactly {tokens} tokens with this tokenizer")


def main(argv: list[str] | None = None) -> int:
    """Prints one JSON record per device: p50 and p95 in ms per length."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--device", action="append", help="cpu (default), openvino, cuda; repeatable")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(LENGTHS),
                   help="comma-separated token counts (default %(default)s)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matmul", action="store_true",
                   help="also time DistilBERT-base's 12 FFN matmuls (113 MB fp32) alone at these row counts")
    args = p.parse_args(argv)
    import embedrt

    for device in args.device or ["cpu"]:
        model = embedrt.load(args.model, device=device, threads=args.threads)
        record: dict[str, object] = {"model": args.model, "device": device, "threads": args.threads,
                                     "providers": model.providers, "calls": args.calls}
        rows = {}
        for tokens in args.lengths:
            text = text_of(model, tokens)
            times = timings(args.calls, 20, model.encode, [text])
            rows[tokens] = {"p50_ms": round(1000 * statistics.median(times), 2),
                            "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 2)}
        record["latency"] = rows
        print(json.dumps(record))
        sys.stdout.flush()
    if args.matmul:
        print(json.dumps({"ffn_matmul_stack": dict(zip(("layers", "width", "inner"), FFN)),
                          "threads": args.threads, **matmul_rates(args.threads, [1, *args.lengths], args.calls)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
