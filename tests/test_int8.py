"""INT8 exports: recipe recorded, gate enforced, batch invariance of static, CPU-feature warnings."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import embedrt
from embedrt.cpu import detect_target, missing_features, parse_target
from embedrt.errors import QualityGateError
from embedrt.export import export_model
from embedrt.export.gate import builtin_texts
from embedrt.export.quantize import casual_calibration_texts, default_calibration_texts
from embedrt.ops import row_cosine

from .test_export_writes import assert_written_once
from .writes import recording


@pytest.fixture(scope="module")
def static_int8_writes(tiny_bert, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The static int8 export (ONNX + OpenVINO), with the count of every file it wrote."""
    root = tmp_path_factory.mktemp("int8")
    with pytest.MonkeyPatch.context() as monkeypatch, recording(root, monkeypatch) as log:
        out = export_model(str(tiny_bert[0]), root / "static", quantize="static", formats="onnx,openvino",
                           min_agreement=0.5, min_cosine=0.99995)
    return out, log


@pytest.fixture(scope="module")
def static_int8(static_int8_writes):  # type: ignore[no-untyped-def]
    return static_int8_writes[0]


def test_int8_export_writes_each_file_once(static_int8_writes) -> None:  # type: ignore[no-untyped-def]
    out, log = static_int8_writes
    published = assert_written_once(log, out)
    assert {"embedrt.json", "model.onnx", "openvino_model.xml", "openvino_model.bin"} <= set(published)


def test_static_int8_manifest_and_size(static_int8, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((static_int8 / "embedrt.json").read_text())
    assert manifest["precision"] == "int8"
    quant = manifest["extra"]["quantization"]
    assert quant["method"] == "static" and quant["target"] == detect_target()
    assert quant["calibration"]["texts"] == len(default_calibration_texts())
    assert quant["calibration"]["openvino_texts"] == len(default_calibration_texts()) + len(casual_calibration_texts())
    assert set(quant["gate"]) == {"onnx", "openvino"}
    # --min-cosine bounded the fp32 graphs int8 was built from, and says so; int8's own parity has no bar
    for fmt in ("onnx", "openvino"):
        assert quant["fp32_parity"][fmt]["threshold"] == 0.99995 <= quant["fp32_parity"][fmt]["min_cosine"]
        assert manifest["parity"][fmt]["threshold"] == 0.0
    # the recorded gate figure, recomputed here from the two folders with the runtime's own top-k
    fp32, int8 = embedrt.load(tiny_bert[1], device="cpu"), embedrt.load(static_int8, device="cpu")  # gate["onnx"]
    corpus, queries = builtin_texts()
    want = embedrt.top_k(fp32.encode(queries), fp32.encode(corpus), k=10)[0]
    got = embedrt.top_k(int8.encode(queries), int8.encode(corpus), k=10)[0]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert quant["gate"]["onnx"]["builtin"]["top10_agreement"] == pytest.approx(overlap, abs=1e-9)
    assert (static_int8 / "model.onnx").stat().st_size < 0.5 * (tiny_bert[1] / "model.onnx").stat().st_size


def test_static_int8_is_batch_invariant(static_int8) -> None:  # type: ignore[no-untyped-def]
    model = embedrt.load(static_int8)
    corpus = list(default_calibration_texts())[:60]
    queries = ["heart disease", "rain and floods", "music", "interest rates"]
    ref_top = embedrt.top_k(model.encode(queries), model.encode(corpus, batch_size=1), k=10)[0]
    rng = random.Random(0)
    for batch_size in (3, 17, 64):
        order = list(range(len(corpus)))
        rng.shuffle(order)  # other batch-mates, other padding
        emb = np.empty((len(corpus), model.dim), dtype=np.float32)
        emb[order] = model.encode([corpus[i] for i in order], batch_size=batch_size)
        top = embedrt.top_k(model.encode(queries, batch_size=batch_size), emb, k=10)[0]
        np.testing.assert_array_equal(top, ref_top)


def test_gate_failure_writes_nothing(tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # int8 never reproduces fp32 exactly, so a mean cosine of 1.0 cannot be met
    with pytest.raises(QualityGateError, match=r"mean cosine [\d.]+ \(needs 1\.0\)"):
        export_model(str(tiny_bert[0]), tmp_path / "out", quantize="dynamic", min_mean_cosine=1.0)
    assert list(tmp_path.iterdir()) == []
    # every graph is judged and named: only the first graph's shortfall was reported, and not which graph
    with pytest.raises(QualityGateError, match=r"onnx graph: built-in check: mean cosine [\d.]+ \(needs 1\.0\).*; "
                                               r"openvino graph: built-in check: mean cosine [\d.]+ \(needs 1\.0\)"):
        export_model(str(tiny_bert[0]), tmp_path / "out", quantize="static", formats="onnx,openvino",
                     min_mean_cosine=1.0)
    assert list(tmp_path.iterdir()) == []


def test_targets() -> None:
    assert parse_target("avx2") == "avx2" and parse_target("AVX2") == "avx2"  # as --format takes ONNX
    with pytest.raises(ValueError, match="valid: auto, amx"):
        parse_target("sse2")
    assert detect_target(frozenset({"avx2", "fma"})) == "avx2"
    assert detect_target(frozenset({"avx2", "avx512f", "avx512_vnni"})) == "avx512_vnni"
    assert detect_target(frozenset({"asimd", "asimddp"})) == "arm64_dotprod"
    assert missing_features("avx512_vnni", frozenset({"avx2"})) == ["avx512f", "avx512_vnni"]


def test_runtime_warns_when_cpu_lacks_the_target(static_int8, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: frozenset({"sse2"}))
    with caplog.at_level(logging.WARNING, logger="embedrt"):
        embedrt.load(static_int8)
    assert any("was quantised for" in r.getMessage() and "lacks" in r.getMessage() for r in caplog.records)


def test_openvino_int8_on_a_cpu_without_vnni_says_it_is_slower(static_int8, tmp_path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "avx2"
    shutil.copytree(static_int8, folder)
    manifest = json.loads((folder / "embedrt.json").read_text())
    manifest["extra"]["quantization"]["target"] = "avx2"  # as exported on an AVX2-only CPU
    (folder / "embedrt.json").write_text(json.dumps(manifest))
    for flags, warned in ((frozenset({"avx2", "fma"}), True), (frozenset({"avx2", "avx512f", "avx512_vnni"}), False)):
        monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a, f=flags: f)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="embedrt"):
            embedrt.load(folder, device="openvino")
            embedrt.load(folder, device="cpu")  # ONNX Runtime's int8 is not slower there: no word
        said = [r.getMessage() for r in caplog.records if "without VNNI or AMX" in r.getMessage()]
        assert len(said) == int(warned), said
        assert not any("lacks" in r.getMessage() for r in caplog.records)


def test_openvino_int8_runs_f32_outside_int8_and_ignores_padding(static_int8) -> None:  # type: ignore[no-untyped-def]
    # OpenVINO would pick bf16 for the non-int8 ops on bf16 CPUs; its bf16 attention went wrong at one
    # sequence length (all-MiniLM-L6-v2, length 32 = head size), so every padded length must agree
    model = embedrt.load(static_int8, device="openvino")
    assert model.plan.inference_precision == "f32"
    assert model.plan.openvino_config["INFERENCE_PRECISION_HINT"] == "f32"
    texts = ["a short query about the weather", "rain and floods in the north of the country this week"]
    ids = model.tokenize(texts)
    exact = np.concatenate([model.encode_padded([x], len(x)) for x in ids])
    for length in range(max(map(len, ids)), 80):
        cos = row_cosine(model.encode_padded(ids, length), exact)
        assert cos.min() > 0.999, f"padded to {length}: cosine {cos.min():.4f} to the unpadded embedding"


@pytest.mark.parametrize("device", ["cpu", "openvino"])
def test_served_int8_vector_does_not_depend_on_batch_mates(static_int8, device) -> None:  # type: ignore[no-untyped-def]
    # what a server does: one user's text shares a call with others' texts, padded to the longest of them
    manifest = json.loads((static_int8 / "embedrt.json").read_text())
    assert manifest["extra"]["quantization"]["batch_invariant"] is True
    assert manifest["extra"]["quantization"]["smooth_quant"] is False
    model = embedrt.load(static_int8, device=device)
    texts = [*default_calibration_texts()[:24], "", "hello", "x " * 40]
    ids = model.tokenize(texts)
    alone = np.concatenate([model.encode_padded([x], len(x)) for x in ids])
    rng = random.Random(1)
    for _ in range(6):
        mates = rng.sample(range(len(ids)), 9)
        longest = max(len(ids[i]) for i in mates)
        got = model.encode_padded([ids[i] for i in mates], longest + rng.choice([0, 0, 5]))
        assert np.abs(got - alone[mates]).max() <= 1e-6


def test_dynamic_int8_is_marked_not_batch_invariant() -> None:
    from embedrt.export.quantize import Method, QuantConfig

    dynamic = QuantConfig(Method.DYNAMIC, "avx2", ())
    smooth = QuantConfig(Method.STATIC, "avx2", ("a",), smooth_quant=True)
    assert dynamic.describe()["batch_invariant"] is False
    assert smooth.describe()["batch_invariant"] is False
    assert QuantConfig(Method.STATIC, "avx2", ("a",)).describe()["batch_invariant"] is True


def _quantised_matmuls(xml: Path) -> dict[str, bool]:
    """Every MatMul of an IR and whether its weights are int8 (a Constant of i8 converted, then scaled)."""
    import openvino as ov

    def int8_weights(op: ov.Node) -> bool:
        for value in op.input_values():
            node = value.get_node()
            while node.get_type_name() in ("Multiply", "Subtract", "Convert", "Reshape", "Transpose"):
                source = node.input_value(0)
                if (node.get_type_name() == "Convert" and source.get_node().get_type_name() == "Constant"
                        and source.get_element_type() == ov.Type.i8):
                    return True
                node = source.get_node()
        return False

    ops = ov.Core().read_model(str(xml)).get_ops()
    return {op.get_friendly_name(): int8_weights(op) for op in ops if op.get_type_name() == "MatMul"}


def test_openvino_int8_keeps_ffn_outputs_fp32_unless_told(tiny_bert, static_int8, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = export_model(str(tiny_bert[0]), tmp_path / "all-int8", quantize="static", formats="onnx,openvino",
                       keep_ffn_output_fp32=False, min_agreement=0.5)
    quant = json.loads((static_int8 / "embedrt.json").read_text())["extra"]["quantization"]
    assert quant["fp32_ops"] == "FFN down-projections" and quant["batch_invariant"] is True
    assert json.loads((out / "embedrt.json").read_text())["extra"]["quantization"]["fp32_ops"] is None
    kept = _quantised_matmuls(static_int8 / "openvino_model.xml")  # the default
    plain = _quantised_matmuls(out / "openvino_model.xml")
    ffn = {name for name in kept if "/output/dense/" in name and "attention" not in name}
    assert len(ffn) == 2  # the tiny BERT's two layers
    assert all(plain[name] for name in ffn)  # quantised when told ...
    assert not any(kept[name] for name in ffn)  # ... and left in f32 by default
    assert all(kept[name] == plain[name] for name in kept if name not in ffn)
    # ONNX Runtime too: both inputs of each FFN down-projection dequantised (its input comes from the fused
    # BiasGelu, which the QDQ quantizer used to skip as untyped, leaving int8 weights on fp32 inputs)
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    down = [n for n in graph.node if n.op_type == "MatMul" and n.name in ffn]
    assert len(down) == 2
    assert all(producers.get(i) == "DequantizeLinear" for n in down for i in n.input)


def test_onnx_static_int8_quantises_weight_matmul_inputs_only(static_int8) -> None:  # type: ignore[no-untyped-def]
    import onnx

    graph = onnx.load(str(static_int8 / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    weights = {i.name for i in graph.initializer}

    def weight_of(node: onnx.NodeProto) -> bool:  # input B is a constant, directly or through DequantizeLinear
        b = node.input[1]
        return b in weights or (b in producers and producers[b].op_type == "DequantizeLinear"
                                and producers[b].input[0] in weights)

    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    quantised = {n.name for n in matmuls if any(i in producers and producers[i].op_type == "DequantizeLinear"
                                                for i in n.input)}
    ffn = {n.name for n in matmuls if "/output/dense/" in n.name and "attention" not in n.name}
    assert len(ffn) == 2 and not ffn & quantised  # the tiny BERT's FFN down-projections stay fp32
    by_weight = {n.name for n in matmuls if weight_of(n)}
    assert quantised == by_weight - ffn and len(quantised) == 10  # q, k, v, attention output, FFN up; 2 layers
    # activation x activation (attention scores and context) stays fp32, as the manifest says ...
    assert len([n for n in matmuls if not weight_of(n)]) == 4
    # ... and no MatMul output goes through uint8 (ONNX Runtime's QDQ default, which cost fidelity)
    assert not [n.name for n in matmuls if "QuantizeLinear" in consumers.get(n.output[0], [])]
    # ... nor does the residual stream: only MatMuls read a dequantised activation (ONNX Runtime's QDQ
    # quantizer pointed the residual Adds at it too)
    dequantised = {out for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] not in weights
                   for out in node.output}
    readers = {n.op_type for n in graph.node if set(n.input) & dequantised}
    assert readers == {"MatMul"}
    ops = json.loads((static_int8 / "embedrt.json").read_text())["extra"]["quantization"]["ops"]
    assert "activation x activation stays fp32" in ops and "outputs and the residual stream are fp32" in ops


def test_keep_ffn_fp32_refuses_a_graph_without_ffn_outputs() -> None:
    from embedrt.export.quantize import _ffn_outputs

    assert _ffn_outputs(["/l.0/ffn/lin2/MatMul", "/l.0/attention/output/dense/MatMul"], "x") == ["/l.0/ffn/lin2/MatMul"]
    with pytest.raises(QualityGateError, match=r"model\.xml has no MatMul named like one .*--no-keep-ffn-fp32"):
        _ffn_outputs(["/l.0/attention/output/dense/MatMul", "/pool/MatMul"], "model.xml")


def test_openvino_int8_export_on_a_cpu_without_vnni_advises_once(tiny_bert, tmp_path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """The export's own check loads of its scratch folders stay quiet; the advice comes once, for the folder."""
    monkeypatch.setattr("embedrt.cpu.cpu_flags", lambda *a: frozenset({"avx2", "fma"}))
    with caplog.at_level(logging.WARNING, logger="embedrt"):
        out = export_model(str(tiny_bert[0]), tmp_path / "ov-int8", formats="openvino", quantize="static",
                           min_agreement=0.0)
    said = [r.getMessage() for r in caplog.records if "without VNNI or AMX" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(str(out)), said


@pytest.mark.parametrize("architecture", ["mpnet", "albert", "electra", "xlm-roberta"])
def test_static_int8_on_other_architectures(architecture: str, stand_in_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The FFN down-projections are found by name in MPNet, ALBERT (one layer applied twice, named ffn_output
    then ffn_output_1), ELECTRA and XLM-R graphs, on both backends; ALBERT's and ELECTRA's embedding projection
    stays fp32 too; and the static recipe stays batch-invariant and close to fp32 there."""
    import onnx

    from embedrt.export.synthetic import StandIn

    checkpoint, fp32 = stand_in_factory(StandIn(architecture=architecture))
    out = export_model(str(checkpoint), tmp_path / "int8", quantize="static", formats="onnx,openvino",
                       min_agreement=0.5)
    graph = onnx.load(str(out / "model.onnx")).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    down = [n for n in matmuls if "ffn_output" in n.name or ("/output/dense/" in n.name and "attention" not in n.name)]
    assert len(down) == 2, [n.name for n in matmuls]  # two layers; kept fp32: no DequantizeLinear feeds them
    assert not any(producers.get(i) == "DequantizeLinear" for n in down for i in n.input)
    assert any(producers.get(n.input[1]) == "DequantizeLinear" for n in matmuls)  # ... while others are int8
    projection = [n for n in matmuls if "embedding_hidden_mapping_in" in n.name or "embeddings_project" in n.name]
    assert len(projection) == (architecture in ("albert", "electra"))
    assert not any(producers.get(i) == "DequantizeLinear" for n in projection for i in n.input)
    kept = _quantised_matmuls(out / "openvino_model.xml")
    assert sum(1 for name, quantised in kept.items() if not quantised and ("ffn_output" in name or (
        "/output/dense" in name and "attention" not in name))) == 2, kept
    assert not any(quantised for name, quantised in kept.items() if name in {n.name for n in projection}), kept
    texts = ["a short query", "a somewhat longer passage about semantic search and retrieval " * 8, "x"]
    reference = embedrt.load(fp32, device="cpu").encode(texts)
    for device in ("cpu", "openvino"):
        model = embedrt.load(out, device=device)
        together = model.encode(texts, batch_size=3)
        alone = np.vstack([model.encode([t]) for t in texts])
        np.testing.assert_allclose(together, alone, atol=1e-6, err_msg=device)
        assert row_cosine(together, reference).min() > 0.999, device
