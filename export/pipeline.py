"""``export_model``: a pipeline of small steps from checkpoint to a verified model folder."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedrt import __version__
from embedrt._optional import require
from embedrt.cpu import parse_target
from embedrt.errors import SourceError
from embedrt.export.gate import run_gate
from embedrt.export.graph import OPSET, build_pipeline, export_onnx, graph_inputs, graph_limits
from embedrt.export.openvino_ir import convert_to_ir
from embedrt.export.quantize import (
    Method,
    QuantConfig,
    default_calibration_texts,
    optimize_graph,
    quantize_onnx,
    quantize_openvino,
)
from embedrt.export.source import CheckpointSpec, ResolvedSource, read_checkpoint, resolve_source
from embedrt.export.validate import FP16_MIN_COSINE, FP32_MIN_COSINE, PROBE_TEXTS, check_parity, reference_embeddings
from embedrt.export.workdir import claim_work_dir
from embedrt.manifest import (
    MANIFEST_NAME,
    ONNX_NAME,
    OPENVINO_BIN,
    OPENVINO_XML,
    TOKENIZER_NAME,
    Manifest,
    Precision,
    describe_files,
    read_manifest,
    write_json_atomic,
)
from embedrt.ops import Similarity
from embedrt.tokenize import TextTokenizer

log = logging.getLogger("embedrt.export")
# recorded in every manifest (extra.exporter); folders written by another exporter may hold other graphs
EXPORTER = f"embedrt {__version__}, torch.onnx (TorchScript) opset {OPSET}, eager attention"


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


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to produce and how strictly to check it."""

    formats: tuple[Format, ...] = (Format.ONNX,)
    precision: Precision = Precision.FP32
    similarity: Similarity | None = None
    revision: str | None = None
    parity_texts: tuple[str, ...] = ()
    min_cosine: float = FP32_MIN_COSINE
    overwrite: bool = False
    quantize: QuantConfig | None = None
    eval_dir: Path | None = None
    min_retained: float = 99.0
    min_agreement: float = 0.85
    min_mean_cosine: float = 0.99


def export_model(
    source: str,
    output: str | Path | None = None,
    *,
    formats: str | Sequence[str] = "onnx",
    precision: str = "fp32",
    similarity: str | None = None,
    revision: str | None = None,
    parity_texts: Sequence[str] = (),
    overwrite: bool = False,
    quantize: str | None = None,
    target: str = "auto",
    calibration_texts: Sequence[str] | None = None,
    calibration_method: str = "minmax",
    keep_ffn_output_fp32: bool = False,
    eval_dir: str | Path | None = None,
    min_retained: float = 99.0,
    min_agreement: float = 0.85,
) -> Path:
    """Export a sentence-transformers checkpoint into a verified, self-contained model folder.

    Args:
        source: a local checkpoint folder, a catalogue name (``all-MiniLM-L6-v2``) or a hub id.
        output: the folder to create; default ``models/<name>`` under the current directory.
        formats: ``onnx``, ``openvino`` or both (comma-separated).
        precision: ``fp32`` (default) or ``fp16`` (for GPUs).
        similarity: override the checkpoint's similarity function (``cosine``, ``dot``, ``euclidean``).
        revision: hub revision to export (ignored for local folders).
        parity_texts: more texts to check parity on, besides the built-in probe set.
        overwrite: replace ``output`` if it exists.
        quantize: ``dynamic`` or ``static`` for an int8 folder (fused, then quantised, then gated).
        target: int8 target CPU (``auto`` = this one; ``avx2``, ``avx512_vnni``, ``amx``, ``arm64_dotprod``...).
        calibration_texts: texts for static calibration (default: the set shipped with embedrt).
        calibration_method: ``minmax``, ``entropy`` or ``percentile``.
        keep_ffn_output_fp32: leave the FFN down-projections in fp32 (more faithful, slower).
        eval_dir: a BEIR folder; the int8 model must keep ``min_retained`` percent of fp32's NDCG@10 on it.
        min_retained: the gate's threshold in percent.
        min_agreement: without ``eval_dir``, the built-in gate's minimum top-10 agreement with fp32.

    Returns:
        The written folder.

    Raises:
        SourceError: the checkpoint cannot be found or is not supported.
        ParityError: an artifact does not reproduce sentence-transformers; nothing is written.
        QualityGateError: the int8 model lost too much quality; nothing is written.
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    quant = None
    if quantize:
        quant = QuantConfig(
            Method.parse(quantize), parse_target(target),
            tuple(calibration_texts) if calibration_texts else default_calibration_texts(),
            calibration_method, keep_ffn_output_fp32=keep_ffn_output_fp32,
        )
    options = ExportOptions(
        formats=parse_formats(formats),
        precision=Precision.parse(precision),
        similarity=Similarity.parse(similarity) if similarity else None,
        revision=revision,
        parity_texts=tuple(parity_texts),
        overwrite=overwrite,
        quantize=quant,
        eval_dir=Path(eval_dir) if eval_dir else None,
        min_retained=min_retained,
        min_agreement=min_agreement,
    )
    if options.precision is Precision.INT8:
        raise ValueError("int8 comes from quantisation, not precision; use --quantize dynamic|static")
    if quant is not None and options.precision is Precision.FP16:
        raise ValueError("--quantize and --precision fp16 exclude each other")
    resolved = resolve_source(source, options.revision)
    target_dir = Path(output) if output else Path("models") / _default_name(resolved, quant)
    if target_dir.exists() and not options.overwrite:
        raise FileExistsError(f"{target_dir} exists; pass overwrite=True (--overwrite) to replace it")
    spec = read_checkpoint(resolved.path, resolved.catalogue)
    with claim_work_dir(target_dir) as work:  # also sweeps what exports killed earlier left behind
        _build_folder(resolved, spec, options, work)
        _publish(work, target_dir, options.overwrite)
    log.info("exported %s -> %s", resolved.source_id, target_dir)
    return target_dir


def _default_name(resolved: ResolvedSource, quant: QuantConfig | None) -> str:
    name = resolved.catalogue.name if resolved.catalogue else resolved.source_id.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}-int8-{quant.method.value}" if quant else name


def _build_folder(resolved: ResolvedSource, spec: CheckpointSpec, options: ExportOptions, work: Path) -> None:
    st = require("sentence_transformers", "export")
    reference_model = st.SentenceTransformer(str(resolved.path), device="cpu")
    _check_agrees_with_st(reference_model, spec, resolved.path)
    eager = st.SentenceTransformer(str(resolved.path), device="cpu", model_kwargs={"attn_implementation": "eager"})
    scratch = work / "scratch"
    scratch.mkdir()
    pad_id = reference_model.tokenizer.pad_token_id
    plain = scratch / "plain.onnx"
    export_onnx(build_pipeline(eager, spec), plain, pad_id if pad_id is not None else 0)
    fused = scratch / "fused.onnx"
    fusion = optimize_graph(plain, fused, *_heads_and_width(eager[0].auto_model.config))
    texts = list(PROBE_TEXTS) + list(options.parity_texts)
    reference = reference_embeddings(reference_model, texts)
    fp32_options = dataclasses.replace(options, quantize=None) if options.quantize else options
    base = work / "model" if options.quantize is None else scratch / "fp32"
    limits = graph_limits(eager[0].auto_model.config, spec.architecture, pad_id if pad_id is not None else 0)
    _assemble(base, (plain, fused), resolved, spec, fp32_options, reference_model, pad_id,
              {"fused_operators": fusion, "limits": limits})
    _check_all(base, texts, reference, fp32_options)
    if options.quantize is not None:
        _build_int8(work / "model", base, (plain, fused), resolved, spec, options, reference_model,
                    (texts, reference))


def _heads_and_width(config: Any) -> tuple[int, int]:
    # DistilBERT names them n_heads / dim
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    width = getattr(config, "hidden_size", None) or config.dim
    return int(heads), int(width)


def _assemble(folder: Path, graphs_in: tuple[Path, Path], resolved: ResolvedSource, spec: CheckpointSpec,
              options: ExportOptions, model: Any, pad_id: int | None, extra: dict[str, Any] | None = None,
              ) -> Manifest:
    """Write tokenizer, graphs and a manifest (without parity yet) into ``folder``.

    ``graphs_in`` is (plain, fused): ONNX Runtime gets the fused fp32 graph; OpenVINO and fp16 the plain one.
    """
    plain, fused = graphs_in
    folder.mkdir(parents=True)
    model.tokenizer.save_pretrained(str(folder))
    if not (folder / TOKENIZER_NAME).is_file():
        raise SourceError(f"{resolved.path}: the tokenizer has no fast (tokenizer.json) form; cannot export it")
    graphs: dict[str, dict[str, Any]] = {}
    if Format.ONNX in options.formats:
        graphs["onnx"] = {"file": ONNX_NAME, "opset": OPSET}
    if Format.OPENVINO in options.formats:
        graphs["openvino"] = {"xml": OPENVINO_XML, "bin": OPENVINO_BIN}
    manifest = _manifest(resolved, spec, options, model, graphs, pad_id, extra or {})
    if "onnx" in graphs:
        _finish_onnx(plain if options.precision is Precision.FP16 else fused, folder / ONNX_NAME, options.precision)
        _stamp_onnx(folder / ONNX_NAME, manifest)
    if "openvino" in graphs:
        convert_to_ir(plain, folder, manifest.contract(), fp16_weights=options.precision is Precision.FP16)
    manifest = dataclasses.replace(manifest, files=describe_files(folder))
    write_json_atomic(folder / MANIFEST_NAME, manifest.to_json())
    return manifest


def _check_all(folder: Path, texts: list[str], reference: Any, options: ExportOptions,
               threshold: float | None = None) -> dict[str, Any]:
    """Parity of every graph in ``folder``; stored in its manifest."""
    manifest = read_manifest(folder)
    parity = {fmt: _parity_of(folder, fmt, texts, reference, options, threshold) for fmt in manifest.graphs}
    final = dataclasses.replace(manifest, parity=parity)
    write_json_atomic(folder / MANIFEST_NAME, final.to_json())
    return parity


def _build_int8(folder: Path, base: Path, graphs_in: tuple[Path, Path], resolved: ResolvedSource, spec: CheckpointSpec,
                options: ExportOptions, model: Any, probe: tuple[list[str], Any]) -> None:
    """Fuse, quantise, record, and gate the int8 folder against the fp32 one."""
    from embedrt.model import load

    quant = options.quantize
    assert quant is not None  # callers check; not user input
    base_manifest = read_manifest(base)
    tokenizer = TextTokenizer(base / TOKENIZER_NAME, base_manifest.max_seq_length, base_manifest.pad_token_id,
                              base_manifest.inputs)
    fusion = base_manifest.extra.get("fused_operators", {})
    heads_width = _heads_and_width(model[0].auto_model.config)
    int8_options = dataclasses.replace(options, precision=Precision.INT8)
    skeleton = _assemble(folder, graphs_in, resolved, spec, dataclasses.replace(int8_options, formats=()), model,
                         base_manifest.pad_token_id, {"fused_operators": fusion, "quantization": quant.describe(),
                                                      "limits": base_manifest.extra.get("limits", {})})
    graphs: dict[str, dict[str, Any]] = {}
    if Format.ONNX in options.formats:
        # int8 graphs keep the embedding Gather unfused, so its table can be quantised per row; static (QDQ)
        # also keeps attention unfused, since the fused Attention's QKV weights cannot take QDQ
        source = graphs_in[0].with_name("fused-int8.onnx")
        fusion = optimize_graph(graphs_in[0], source, *heads_width, embed_fusion=False,
                                attention_fusion=quant.method is Method.DYNAMIC)
        quantize_onnx(source, folder / ONNX_NAME, quant, tokenizer)
        graphs["onnx"] = {"file": ONNX_NAME, "opset": OPSET}
    if Format.OPENVINO in options.formats:
        quantize_openvino(base / OPENVINO_XML, folder, quant, tokenizer, skeleton.contract())
        graphs["openvino"] = {"xml": OPENVINO_XML, "bin": OPENVINO_BIN}
    extra = {**skeleton.extra, "fused_operators": fusion}
    manifest = dataclasses.replace(skeleton, graphs=graphs, extra=extra)
    if "onnx" in graphs:
        _stamp_onnx(folder / ONNX_NAME, manifest)
    write_json_atomic(folder / MANIFEST_NAME, dataclasses.replace(manifest, files=describe_files(folder)).to_json())
    _check_all(folder, *probe, int8_options, threshold=0.0)  # int8 is judged by the gate below
    gates = {}
    for fmt in graphs:
        device = "openvino" if fmt == "openvino" else "cpu"
        gates[fmt] = run_gate(load(base, device=device), load(folder, device=device), options.eval_dir,
                              options.min_retained, options.min_agreement, options.min_mean_cosine)
    manifest = read_manifest(folder)
    extra = {**manifest.extra, "quantization": {**manifest.extra["quantization"], "gate": gates}}
    write_json_atomic(folder / MANIFEST_NAME, dataclasses.replace(manifest, extra=extra).to_json())


def _check_agrees_with_st(model: Any, spec: CheckpointSpec, path: Path) -> None:
    """The contract read from the files must be what sentence-transformers itself runs."""
    if model.max_seq_length != spec.max_seq_length:
        raise SourceError(
            f"{path}: sentence-transformers runs max_seq_length {model.max_seq_length}, the files say "
            f"{spec.max_seq_length}; refusing to guess"
        )


def _finish_onnx(plain: Path, dest: Path, precision: Precision) -> None:
    if precision is Precision.FP16:
        from embedrt.export.fp16 import convert_fp16

        convert_fp16(plain, dest)
    else:
        shutil.copyfile(plain, dest)


def _manifest(
    resolved: ResolvedSource,
    spec: CheckpointSpec,
    options: ExportOptions,
    model: Any,
    graphs: dict[str, dict[str, Any]],
    pad_id: int | None,
    extra: dict[str, Any],
) -> Manifest:
    similarity = options.similarity or spec.similarity
    manifest = Manifest(
        source={"id": resolved.source_id, "revision": resolved.revision,
                "catalogue": resolved.catalogue.name if resolved.catalogue else None},
        architecture=spec.architecture,
        dim=_embedding_dim(model),
        pooling=spec.pooling,
        normalize=spec.normalize,
        similarity=similarity,
        max_seq_length=spec.max_seq_length,
        do_lower_case=spec.do_lower_case,
        inputs=graph_inputs(spec.architecture),
        pad_token_id=int(pad_id if pad_id is not None else 0),
        precision=options.precision,
        graphs=graphs,
        files={},
        parity={},
        extra={
            "similarity_source": "override" if options.similarity else spec.similarity_source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "exporter": EXPORTER,
            "versions": _versions(),
            **extra,
        },
    )
    return manifest


def _stamp_onnx(path: Path, manifest: Manifest) -> None:
    """Write the contract into the graph's ``metadata_props`` so the .onnx file describes itself."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {"embedrt": json.dumps(manifest.contract()), "producer": "embedrt"}.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "embedrt"
    model.producer_version = __version__
    onnx.save(model, str(path))


def _parity_of(
    folder: Path, fmt: str, texts: list[str], reference: Any, options: ExportOptions, threshold: float | None
) -> dict[str, Any]:
    from embedrt.model import load

    device = "openvino" if fmt == "openvino" else _onnx_check_device(options.precision)
    model = load(folder, device=device)
    if threshold is None:
        threshold = options.min_cosine if options.precision is Precision.FP32 else FP16_MIN_COSINE
    batched = check_parity(fmt, reference, model.encode(texts, batch_size=16), threshold)
    # one text per batch too: padding must not change a text's embedding
    single = check_parity(fmt, reference[: len(PROBE_TEXTS)], model.encode(list(PROBE_TEXTS), batch_size=1),
                          threshold)
    return {**batched, "min_cosine_unbatched": single["min_cosine"], "device": model.device}


def _onnx_check_device(precision: Precision) -> str:
    """fp16 graphs are checked where they will run, on CUDA, if this machine has it; else on the CPU."""
    if precision is not Precision.FP16:
        return "cpu"
    import onnxruntime

    from embedrt.providers import cuda_unavailable_reason

    reason = cuda_unavailable_reason(onnxruntime)
    if reason is None:
        return "cuda"
    log.warning("checking the fp16 graph on the CPU (ONNX Runtime upcasts there), not on a GPU: %s", reason)
    return "cpu"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "openvino"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _publish(work: Path, target: Path, overwrite: bool) -> None:
    """Move the finished folder into place with renames, never leaving a half-written target."""
    built = work / "model"
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
        old = work / "previous"
        target.rename(old)
    built.rename(target)


def _embedding_dim(model: Any) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())
