"""The export's gates at their documented strength: these fail if a threshold is loosened.

Each check builds embeddings a known distance from the reference, so the figure the gate sees is set
here, not read back from an export that already passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from embedrt.errors import ParityError, QualityGateError
from embedrt.export import ExportOptions, Method, QuantConfig
from embedrt.export.gate import run_gate
from embedrt.export.validate import check_parity
from embedrt.manifest import Precision


def rotated(reference: np.ndarray, cosine: float, seed: int = 0) -> np.ndarray:
    """Each row of ``reference`` turned by the angle whose cosine is ``cosine`` (same norm)."""
    rng = np.random.default_rng(seed)
    ref = reference.astype(np.float64)
    noise = rng.standard_normal(ref.shape)
    noise -= (noise * ref).sum(1, keepdims=True) / (ref * ref).sum(1, keepdims=True) * ref  # orthogonal part
    noise *= np.linalg.norm(ref, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    sine = np.sqrt(1.0 - cosine**2)
    return cosine * ref + sine * noise


@pytest.mark.parametrize(("precision", "passes", "fails"), [("fp32", 0.999995, 0.99998), ("fp16", 0.9995, 0.998)])
def test_parity_gate_strength(precision: str, passes: float, fails: float) -> None:
    threshold = ExportOptions(precision=Precision(precision)).parity_threshold
    ref = np.random.default_rng(1).standard_normal((8, 384))
    figures = check_parity("onnx", ref, rotated(ref, passes), threshold)
    assert figures["min_cosine"] == pytest.approx(passes, abs=1e-9)
    with pytest.raises(ParityError):
        check_parity("onnx", ref, rotated(ref, fails), threshold)


def test_min_cosine_is_settable_and_checked() -> None:
    assert ExportOptions(min_cosine=0.9).parity_threshold == 0.9
    assert ExportOptions.parse(precision="fp16", min_cosine=0.99).parity_threshold == 0.99
    with pytest.raises(ValueError, match="min_cosine must be between -1 and 1"):
        ExportOptions(min_cosine=1.5)
    with pytest.raises(ValueError, match=r"unknown calibration method 'entropy'; valid: minmax \(entropy and"):
        ExportOptions.parse(quantize="static", calibration_method="entropy")


def test_a_quant_config_from_embedrt_export_as_the_readme_shows() -> None:
    options = ExportOptions(quantize=QuantConfig(Method.STATIC, "avx2", ("a text",)))
    assert options.quantize is not None and options.quantize.method is Method.STATIC
    assert options.formats == ("onnx",)  # int8's default format


@pytest.mark.parametrize(("settings", "message"), [
    ({"quantize": "dynamic", "formats": "onnx,openvino"}, "--quantize dynamic is ONNX Runtime's"),
    ({"quantize": "static", "formats": "onnx", "smooth_quant": True}, "--smooth-quant applies to the OpenVINO IR"),
    # no --format: --smooth-quant chose the IR, and the refusal says so (it said only "dynamic is ONNX Runtime's")
    ({"quantize": "dynamic", "smooth_quant": True}, "--smooth-quant is NNCF's, for the OpenVINO IR"),
    ({"quantize": "dynamic", "formats": "openvino", "smooth_quant": True}, "--quantize dynamic is ONNX Runtime's"),
])
def test_int8_settings_the_formats_would_ignore_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExportOptions.parse(**settings)
    ok = {k: v for k, v in settings.items() if k != "smooth_quant"}
    ExportOptions.parse(**(ok | {"quantize": "static"}))  # the same formats without the ignored setting


@pytest.mark.parametrize(("settings", "message"), [
    ({"smooth_quant": True}, "they need --quantize"),
    ({"keep_ffn_output_fp32": False}, "they need --quantize"),
    ({"calibration_texts": ["a text"]}, "they need --quantize"),
    ({"quantize": "dynamic", "calibration_texts": ["a text"]}, "--quantize dynamic computes its scales per call"),
    ({"quantize": "static", "calibration_texts": []}, "--calibration-texts \\(calibration_texts\\) holds no text"),
])
def test_int8_settings_without_their_int8_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExportOptions.parse(**settings)
    assert ExportOptions.parse(quantize="static", keep_ffn_output_fp32=False).quantize.keep_ffn_output_fp32 is False
    assert ExportOptions.parse(quantize="static").quantize.keep_ffn_output_fp32 is True


class Fake:
    """A model whose embedding of text ``i`` of the corpus is row ``i`` of a fixed matrix."""

    similarity_metric = "cosine"

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        self.rows = rows

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.rows[t] for t in texts]).astype(np.float32)

    encode_query = encode_document = encode  # no prompts


def _pair(cosine: float) -> tuple[Fake, Fake]:
    from embedrt.export.gate import builtin_texts

    corpus, queries = builtin_texts()
    texts = sorted(set(corpus) | set(queries))
    ref = np.random.default_rng(2).standard_normal((len(texts), 64))
    return Fake(dict(zip(texts, ref, strict=True))), Fake(dict(zip(texts, rotated(ref, cosine), strict=True)))


def test_builtin_int8_gate_strength() -> None:
    options = ExportOptions()
    gate = (None, options.min_retained, options.min_agreement, options.min_mean_cosine)
    figures = run_gate(*_pair(0.9999), *gate)  # barely moved: same ranking, mean cosine 0.9999
    assert figures["builtin"]["top10_agreement"] >= 0.95
    with pytest.raises(QualityGateError, match=r"mean cosine 0\.98500 \(needs 0\.99\)"):
        run_gate(*_pair(0.985), *gate)


def test_builtin_gate_per_text_floor() -> None:
    """A recipe that keeps the average but wrecks a few texts fails the 1st-percentile floor."""
    fp32, int8 = _pair(0.9999)
    names = sorted(int8.rows)
    for name in names[: max(2, len(names) // 30)]:  # ~3% of the texts turned far away
        int8.rows[name] = rotated(fp32.rows[name][None], 0.8, seed=3)[0]
    options = ExportOptions()
    gate = (None, options.min_retained, options.min_agreement, options.min_mean_cosine)
    figures = run_gate(fp32, int8, *gate, 0.0)  # without the floor this recipe would ship
    assert figures["builtin"]["mean_cosine"] >= 0.99 and figures["builtin"]["p1_cosine"] < 0.81
    with pytest.raises(QualityGateError, match=r"built-in check: 1st-percentile cosine 0\.8\d+ .*needs 0\.95"):
        run_gate(fp32, int8, *gate, options.min_p1_cosine)


class Hashed:
    """Embeds any text: a fixed random vector per text; ``turn(text)`` gives the cosine to the fp32 one."""

    similarity_metric = "cosine"

    def __init__(self, turn=None) -> None:  # type: ignore[no-untyped-def]
        self.turn = turn

    def encode(self, texts: list[str], **_: object) -> np.ndarray:
        import zlib

        def vector(text: str) -> np.ndarray:  # texts on one topic (their first two words) lie close together
            topic = " ".join(text.split()[:2])
            return (np.random.default_rng(zlib.crc32(topic.encode())).standard_normal(32)
                    + 0.5 * np.random.default_rng(zlib.crc32(text.encode())).standard_normal(32))

        rows = np.stack([vector(t) for t in texts])
        if self.turn is None:
            return rows.astype(np.float32)
        return np.stack([rotated(r[None], self.turn(t), seed=7)[0] for r, t in zip(rows, texts, strict=True)])

    encode_query = encode_document = encode  # no prompts


def _eval_sets(root) -> tuple[object, object]:  # type: ignore[no-untyped-def]
    import json

    beir = root / "tiny-beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [f"topic {i % 7} document {i}" for i in range(42)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": str(i), "title": "", "text": d}) + "\n"
                                               for i, d in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{k}", "text": f"topic {k} query"}) + "\n"
                                                for k in range(7)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i % 7}\t{i}\t1\n" for i in range(42)))
    sts = root / "tiny-sts.csv"
    rows = [(f"topic {i % 9} first {i}", f"topic {i % 9} second {i}", 4.0) if i % 2 else
            (f"topic {i % 9} first {i}", f"topic {(i + 1) % 9} other {i}", 1.0) for i in range(60)]
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{score}\t{a}\t{b}\n" for i, (a, b, score) in enumerate(rows)))
    return beir, sts


def test_gate_judges_every_dataset_and_names_the_one_that_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    beir, sts = _eval_sets(tmp_path)
    options = ExportOptions.parse(eval_dir=[str(beir), str(sts)], quantize="static")
    assert options.eval_dirs == (beir, sts)
    gate = (options.eval_dirs, options.min_retained, options.min_agreement, options.min_mean_cosine,
            options.min_p1_cosine)
    figures = run_gate(Hashed(), Hashed(lambda t: 0.99999), *gate)
    kinds = {d["dataset"]: (d["kind"], d["metric"]) for d in figures["datasets"]}
    assert kinds == {"tiny-beir": ("beir", "ndcg@10"), "tiny-sts": ("sts", "spearman")}
    assert all(d["retained_percent"] == pytest.approx(100.0, abs=0.5) and d["p1_cosine"] > 0.9999
               for d in figures["datasets"])
    assert figures["passed"] == ["tiny-beir", "tiny-sts"] and figures["min_p1_cosine"] == 0.95
    assert set(figures["datasets"][0]["per_part"]) == {"corpus", "queries"}
    # the STS set's "other" sentences (a quarter of its texts) are wrecked: only that set fails, on its floor
    fails = r"^int8 fails the quality gate: tiny-sts: .*1st-percentile cosine"
    with pytest.raises(QualityGateError, match=fails) as err:
        run_gate(Hashed(), Hashed(lambda t: 0.5 if " other " in t else 0.99999), *gate)
    assert "tiny-beir" not in str(err.value)


def test_gate_tells_apart_two_sets_with_one_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    _, sts = _eval_sets(tmp_path)
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / sts.name
    shutil.copy(sts, twin)
    figures = run_gate(Hashed(), Hashed(lambda t: 0.99999), (sts, twin), 99.0, 0.85, 0.99)
    assert figures["passed"] == [str(sts), str(twin)]
    assert [d["path"] for d in figures["datasets"]] == [str(sts), str(twin)]
    with pytest.raises(ValueError, match="--eval names the same set more than once"):
        ExportOptions.parse(quantize="static", eval_dir=[str(sts), str(tmp_path / "." / sts.name)])


def test_gate_refuses_what_is_not_an_evaluation_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.textio import InputFileError

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match=r"empty: not an evaluation set"):
        run_gate(Hashed(), Hashed(), [tmp_path / "empty"], 99.0, 0.85, 0.99, 0.95)


def test_sets_that_cannot_judge_are_refused_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedrt.textio import InputFileError

    flat = tmp_path / "flat.csv"  # every pair the same gold score: no Spearman
    flat.write_text("".join(f"g\tf\t2012\t{i:04d}\t3.0\tsentence {i}\tother {i}\n" for i in range(5)))
    with pytest.raises(InputFileError, match=r"flat\.csv: needs at least two pairs with different gold scores"):
        run_gate(Hashed(), Hashed(), [flat], 99.0, 0.85, 0.99, 0.95)
    beir, _ = _eval_sets(tmp_path)  # retrieval where fp32 finds nothing relevant: 0 NDCG@10
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tnot-a-doc\t1\n")
    with pytest.raises(InputFileError, match=r"corpus\.jsonl: none of the 1 documents the qrels judge relevant"):
        run_gate(Hashed(), Hashed(), [beir], 99.0, 0.85, 0.99, 0.95)
    # a path that is no evaluation set fails when the options are made, before any export work
    with pytest.raises(InputFileError, match=r"nowhere: not an evaluation set"):
        ExportOptions.parse(quantize="static", eval_dir=str(tmp_path / "nowhere"))


def test_gate_settings_it_would_not_read_and_sets_that_cannot_judge_are_refused_before_any_work(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each of these exported with exit 0: the threshold ignored, or the set found unable to judge only after the
    export (with --precision auto, every int8 candidate 'rejected' and fp32 published)."""
    from embedrt.errors import shown_below as _below
    from embedrt.textio import InputFileError

    _, sts = _eval_sets(tmp_path)
    refused = [
        ({"min_retained": 99.5}, "--min-retained judges the --eval sets, and none was given"),
        ({"eval_dir": str(sts), "min_agreement": 0.9}, "--min-agreement and --min-mean-cosine judge the built-in"),
        ({"eval_dir": str(sts), "min_mean_cosine": 0.999}, "--min-agreement and --min-mean-cosine judge the built-in"),
        ({"eval_dir": str(sts), "min_retained": 0.99}, r"--min-retained is a percentage of the fp32 figure \(99 for"),
    ]
    for settings, error in refused:
        with pytest.raises(ValueError, match=error):
            ExportOptions.parse(quantize="static", **settings)
    assert ExportOptions.parse(quantize="static", eval_dir=str(sts), min_retained=0).min_retained == 0  # gate off
    with pytest.raises(ValueError, match=r"--min-retained is a percentage"):  # the constructor checks it too
        ExportOptions(eval_dirs=(sts,), min_retained=0.99)
    # --min-cosine bounds the fp32 graph an int8 export is quantised from: taken with --quantize
    assert ExportOptions.parse(quantize="dynamic", min_cosine=0.9999).parity_threshold == 0.9999
    assert ExportOptions.parse(target="AUTO").quantize is None  # the default target, in any case
    lines = sts.read_text().splitlines()
    bad = tmp_path / "nan.csv"
    fields = lines[2].split("\t")
    fields[4] = "nan"  # NaN ranked above every gold score, and the gate passed on the figure it gave
    bad.write_text("\n".join([*lines[:2], "\t".join(fields), *lines[3:]]) + "\n")
    with pytest.raises(InputFileError, match=r"nan\.csv:3: score 'nan' is not a finite number"):
        ExportOptions.parse(quantize="static", eval_dir=str(bad))
    flat = tmp_path / "flat.csv"
    flat.write_text("".join(f"g\tf\t2012\t{i:04d}\t3.0\tsentence {i}\tother {i}\n" for i in range(5)))
    with pytest.raises(InputFileError, match=r"flat\.csv: needs at least two pairs with different gold scores"):
        ExportOptions.parse(quantize="static", eval_dir=str(flat))
    beir, _ = _eval_sets(tmp_path / "b")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t0\n")
    with pytest.raises(InputFileError, match=r"the qrels judge no document relevant"):
        ExportOptions.parse(quantize="static", eval_dir=str(beir))
    # a figure is printed with the digits that show it below its threshold (0.99998 read 1.0000, a pass)
    assert _below(0.9999796, 0.99999) == "0.99998" and _below(0.8123456, 0.95) == "0.8123"
