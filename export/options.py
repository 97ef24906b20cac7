"""What an export produces and how strictly it is checked: typed, validated once, before any work."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from embedrt.cpu import parse_target
from embedrt.export.quantize import Method, QuantConfig, casual_calibration_texts, default_calibration_texts
from embedrt.export.validate import BF16_MIN_COSINE, FP16_MIN_COSINE, FP32_MIN_COSINE
from embedrt.manifest import Precision
from embedrt.ops import Similarity

log = logging.getLogger("embedrt.export")


class Format(str, enum.Enum):
    """Graph formats a model folder can hold."""

    ONNX = "onnx"
    OPENVINO = "openvino"


def parse_formats(value: str | Sequence[str]) -> tuple[Format, ...]:
    """``"onnx"``, ``"openvino"``, ``"onnx,openvino"`` (or a list) -> formats; the error lists valid ones."""
    names = value.split(",") if isinstance(value, str) else list(value)
    formats = []
    for name in (n.strip().lower() for n in names if n.strip()):
        try:
            formats.append(Format(name))
        except ValueError:
            raise ValueError(f"unknown format {name!r}; valid: onnx, openvino (comma-separated)") from None
    if not formats:
        raise ValueError("no format given; valid: onnx, openvino (comma-separated)")
    return tuple(dict.fromkeys(formats))


def default_formats(precision: Precision, quantize: QuantConfig | None) -> tuple[Format, ...]:
    """What an export without ``--format`` writes: the graphs that make ``load(folder)`` fast here and elsewhere.

    - fp32: the ONNX graph and the OpenVINO IR. ``load``'s default device (``auto``) then picks the faster
      CPU backend per CPU (:func:`embedrt.plan.auto_requests`), and on a CPU with bf16 units the export also
      checks the IR in bf16 against sentence-transformers, so that on AMX CPUs the folder runs in bf16 with
      that check behind it (:func:`embedrt.plan.openvino_cpu_precision`). Without openvino installed: ONNX
      only, with a warning saying what the folder will lack.
    - fp16 (for GPUs): ONNX (CUDA runs it). bf16: the IR (OpenVINO is the only bf16 path on x86 CPUs).
    - int8: ONNX (ONNX Runtime's recipe; ``--format openvino`` for NNCF's), the IR with ``--smooth-quant``
      (NNCF's only).
    """
    if quantize is not None and quantize.smooth_quant:
        return (Format.OPENVINO,)
    if quantize is not None or precision is Precision.FP16:
        return (Format.ONNX,)
    if precision is Precision.BF16:
        return (Format.OPENVINO,)
    if not _openvino_installed():
        log.warning("openvino is not installed (pip install 'embedrt[openvino]'), so this export writes the ONNX graph "
                    "only: the folder will run on ONNX Runtime, in f32 even on CPUs with bf16 matrix units (AMX)")
        return (Format.ONNX,)
    return (Format.ONNX, Format.OPENVINO)


def _openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to produce and how strictly to check it.

    Attributes:
        formats: graph formats to write; empty for :func:`default_formats` of the precision and quantisation.
        precision: fp32, fp16 (for GPUs) or bf16 (OpenVINO on CPUs with bf16 units; fp32 weights, checked
            in bf16); int8 comes from ``quantize``.
        similarity: override of the checkpoint's similarity function.
        revision: hub revision (hub ids only).
        parity_texts: more texts to check parity on, besides the built-in probe set.
        min_cosine: the smallest cosine to sentence-transformers an fp32 / fp16 graph may have on any text;
            None for the precision's default (0.99999 fp32, 0.9999 bf16, 0.999 fp16).
        overwrite: replace the output folder if it exists.
        quantize: the int8 recipe, or None for no quantisation.
        eval_dirs: evaluation sets for the int8 gate: BEIR folders (NDCG@10) and STS Benchmark files
            (Spearman); empty for the built-in gate.
        min_retained: with ``eval_dirs``, percent of the fp32 figure the int8 model must keep on each.
        min_p1_cosine: the least 1st-percentile cosine of int8 to fp32 embeddings over the texts the gate
            embeds (per dataset, and per part: a BEIR set's queries and corpus apart).
        min_agreement: built-in gate: minimum top-10 agreement of int8 with fp32.
        min_mean_cosine: built-in gate: minimum mean cosine of int8 to fp32 embeddings.
    """

    formats: tuple[Format, ...] = ()
    precision: Precision = Precision.FP32
    similarity: Similarity | None = None
    revision: str | None = None
    parity_texts: tuple[str, ...] = ()
    min_cosine: float | None = None
    overwrite: bool = False
    quantize: QuantConfig | None = None
    eval_dirs: tuple[Path, ...] = ()
    min_retained: float = 99.0
    min_p1_cosine: float = 0.95
    min_agreement: float = 0.85
    min_mean_cosine: float = 0.99

    def __post_init__(self) -> None:
        if self.precision is Precision.INT8:
            raise ValueError("int8 comes from quantisation, not precision; use --quantize dynamic|static")
        chosen = bool(self.formats)  # by the caller, or below from the other settings
        if not chosen:
            object.__setattr__(self, "formats", default_formats(self.precision, self.quantize))
        if self.quantize is not None and self.precision in (Precision.FP16, Precision.BF16):
            raise ValueError(f"--quantize and --precision {self.precision.value} exclude each other")
        if self.precision is Precision.BF16 and self.formats != (Format.OPENVINO,):
            raise ValueError("--precision bf16 runs on OpenVINO only (ONNX Runtime has no bf16 kernels for x86 CPUs): "
                             "use --format openvino")
        self._check_quantize(chosen)
        for name in ("min_cosine", "min_agreement", "min_mean_cosine", "min_p1_cosine"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between -1 and 1, got {value}")
        if not 0.0 <= self.min_retained <= 1000.0:
            raise ValueError(f"min_retained is a percentage between 0 and 1000, got {self.min_retained}")
        if 0.0 < self.min_retained <= 1.0:  # 0.99 for 99% would keep the gate from ever failing
            raise ValueError(f"--min-retained is a percentage of the fp32 figure (99 for 99%), got "
                             f"{self.min_retained}; 0 turns the check off")
        from embedrt.export.gate import load_eval_set

        for path in self.eval_dirs:  # a typo, a bad file or a set that cannot judge fails now, not after the export
            load_eval_set(path)
        resolved = [path.resolve() for path in self.eval_dirs]
        twice = sorted({str(path) for path in self.eval_dirs if resolved.count(path.resolve()) > 1})
        if twice:
            raise ValueError(f"--eval names the same set more than once: {', '.join(twice)}")

    def _check_quantize(self, formats_given: bool) -> None:
        """Refuse int8 settings the chosen formats would not honour, rather than ignore them."""
        quant = self.quantize
        if quant is None:
            return
        if Format.OPENVINO in self.formats:
            if quant.method is Method.DYNAMIC and quant.smooth_quant and not formats_given:
                raise ValueError("--smooth-quant is NNCF's, for the OpenVINO IR, whose int8 is calibrated; --quantize "
                                 "dynamic is ONNX Runtime's (scales per call): use --quantize static --smooth-quant, "
                                 "or --quantize dynamic without --smooth-quant")
            if quant.method is Method.DYNAMIC:
                raise ValueError("--quantize dynamic is ONNX Runtime's (scales per call); the OpenVINO IR's int8 is "
                                 "calibrated by NNCF: use --quantize static, or --format onnx")
        elif quant.smooth_quant:
            raise ValueError("--smooth-quant applies to the OpenVINO IR (NNCF) only: add --format openvino")

    @property
    def parity_threshold(self) -> float:
        """The smallest cosine to sentence-transformers the fp32 / fp16 graphs may have."""
        if self.min_cosine is not None:
            return self.min_cosine
        return {Precision.FP16: FP16_MIN_COSINE, Precision.BF16: BF16_MIN_COSINE}.get(self.precision, FP32_MIN_COSINE)

    @classmethod
    def parse(
        cls,
        *,
        formats: str | Sequence[str] | None = None,
        precision: str = "fp32",
        similarity: str | None = None,
        revision: str | None = None,
        parity_texts: Sequence[str] = (),
        min_cosine: float | None = None,
        overwrite: bool = False,
        quantize: str | None = None,
        target: str = "auto",
        calibration_texts: Sequence[str] | None = None,
        calibration_method: str = "minmax",
        keep_ffn_output_fp32: bool | None = None,
        smooth_quant: bool = False,
        eval_dir: str | Path | Sequence[str | Path] | None = None,
        min_retained: float = 99.0,
        min_agreement: float = 0.85,
        min_mean_cosine: float = 0.99,
        min_p1_cosine: float = 0.95,
    ) -> ExportOptions:
        """Options from the plain values a command line or a caller of ``export_model(**kwargs)`` gives.

        ``formats=None`` (no ``--format``) writes :func:`default_formats` for the precision and quantisation.

        Raises:
            ValueError: an unknown format, precision, similarity, quantisation method or target (the message
                lists the valid ones), or settings that exclude each other.
        """
        quant = None
        if calibration_texts is not None and not calibration_texts:
            raise ValueError("--calibration-texts (calibration_texts) holds no text: give at least one, or leave it "
                             "out for the shipped sets")
        if not quantize and (smooth_quant or calibration_texts or keep_ffn_output_fp32 is not None):
            raise ValueError("--smooth-quant, --calibration-texts and --keep-ffn-fp32/--no-keep-ffn-fp32 set up int8: "
                             "they need --quantize dynamic|static")
        parse_target(target)  # an unknown target is an error with or without --quantize
        if not quantize:  # int8 settings that an export without int8 would silently ignore
            given = [flag for flag, value, default in (
                ("--target", str(target).lower(), "auto"), ("--calibration-method", calibration_method, "minmax"),
                ("--eval", eval_dir or None, None), ("--min-retained", min_retained, 99.0),
                ("--min-agreement", min_agreement, 0.85), ("--min-mean-cosine", min_mean_cosine, 0.99),
                ("--min-p1-cosine", min_p1_cosine, 0.95)) if value != default]
            if given:
                raise ValueError(f"{', '.join(given)} set up or judge int8: they need --quantize dynamic|static "
                                 "(or --precision auto)")
        if quantize:  # gate settings that the gate asked for would not read: refused, not silently ignored
            if not eval_dir and min_retained != 99.0:
                raise ValueError("--min-retained judges the --eval sets, and none was given: the built-in check "
                                 "uses --min-agreement, --min-mean-cosine and --min-p1-cosine")
            if eval_dir and (min_agreement != 0.85 or min_mean_cosine != 0.99):
                raise ValueError("--min-agreement and --min-mean-cosine judge the built-in check, which --eval "
                                 "replaces: use --min-retained and --min-p1-cosine")
        if quantize == "dynamic" and calibration_texts:
            raise ValueError("--calibration-texts calibrate static int8; --quantize dynamic computes its scales per "
                             "call and would ignore them")
        if quantize:
            quant = QuantConfig(
                Method.parse(quantize), parse_target(target),
                tuple(calibration_texts) if calibration_texts else default_calibration_texts(),
                calibration_method, keep_ffn_output_fp32=keep_ffn_output_fp32 is not False,
                # the user's own texts are used as given; the shipped ones add the casual set for NNCF
                openvino_extra_texts=() if calibration_texts else casual_calibration_texts(),
                smooth_quant=smooth_quant,
            )
        return cls(
            formats=parse_formats(formats) if formats is not None else (), precision=Precision.parse(precision),
            similarity=Similarity.parse(similarity) if similarity else None, revision=revision,
            parity_texts=tuple(parity_texts), min_cosine=min_cosine, overwrite=overwrite, quantize=quant,
            eval_dirs=_paths(eval_dir), min_retained=min_retained,
            min_agreement=min_agreement, min_mean_cosine=min_mean_cosine, min_p1_cosine=min_p1_cosine,
        )


def _paths(value: str | Path | Sequence[str | Path] | None) -> tuple[Path, ...]:
    """One path or several (a sequence) as a tuple of paths; None or empty gives ()."""
    if not value:
        return ()
    if isinstance(value, (str, Path)):
        return (Path(value),)
    return tuple(Path(v) for v in value)
