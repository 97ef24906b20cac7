"""``export_model``: one build context through small steps, from checkpoint to a verified model folder.

load -> wrap -> export -> optimise -> precision / quantise / IR -> validate -> gate -> write the manifest.
Every graph is written once, stamped with the folder's contract; intermediate graphs stay in the work
folder's ``scratch``. The manifest is built in memory and written once, with the figures of the checks,
after they all passed; then the folder is renamed into place.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from pathlib import Path
from typing import Any

from embedrt._optional import require
from embedrt.errors import ProviderUnavailableError, SourceError
from embedrt.export.artifacts import (
    check_folder,
    embedding_dim,
    new_manifest,
    write_manifest,
    write_onnx,
    write_tokenizer,
)
from embedrt.export.gate import GateFailure, run_gate
from embedrt.export.graph import build_pipeline, export_onnx, graph_limits
from embedrt.export.openvino_ir import convert_to_ir
from embedrt.export.options import ExportOptions, Format
from embedrt.export.quantize import Method, QuantConfig, optimize_graph, quantize_onnx, quantize_openvino
from embedrt.export.source import CheckpointSpec, ResolvedSource, read_checkpoint, resolve_source
from embedrt.export.validate import BF16_MIN_COSINE, PROBE_TEXTS, check_parity, parity_figures, reference_embeddings
from embedrt.export.workdir import claim_work_dir
from embedrt.manifest import OPENVINO_XML, TOKENIZER_NAME, Manifest, Precision, describe_files
from embedrt.ops import FloatArray
from embedrt.outputs import check_not_input, check_replaceable
from embedrt.plan import parity_device
from embedrt.tokenize import TextTokenizer

log = logging.getLogger("embedrt.export")


@dataclasses.dataclass
class Build:
    """One export, passed from step to step; each step fills in what it made.

    Attributes:
        resolved: where the checkpoint is.
        spec: its contract, read from its files.
        options: what to produce.
        work: the export's locked work folder; ``work/model`` becomes the output, ``work/scratch`` does not.
        reference: sentence-transformers as the checkpoint ships (the ground truth).
        eager: the same checkpoint with eager attention (traceable).
        pad_id: the tokenizer's padding id.
        texts: the probe texts parity is checked on.
        expected: sentence-transformers' embeddings of ``texts``.
        fusion: fused-operator counts of ``fused``.
    """

    resolved: ResolvedSource
    spec: CheckpointSpec
    options: ExportOptions
    work: Path
    reference: Any
    eager: Any
    pad_id: int
    texts: list[str]
    expected: FloatArray
    fusion: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def scratch(self) -> Path:
        """Intermediate files, removed with the work folder."""
        return self.work / "scratch"

    @property
    def plain(self) -> Path:
        """The exported fp32 graph (OpenVINO and fp16 start from it); written by ``export``."""
        return self.scratch / "plain.onnx"

    @property
    def fused(self) -> Path:
        """``plain`` fused by ONNX Runtime's optimizer (what ONNX Runtime runs in fp32); written by ``optimise``."""
        return self.scratch / "fused.onnx"

    def check_dir(self, folder: Path) -> Path:
        """Where ``validate`` lays out ``folder`` for the runtime to load."""
        return self.scratch / f"check-{folder.name}"

    @property
    def limits(self) -> dict[str, int]:
        """The graph's position and vocabulary limits, stamped into it."""
        return graph_limits(self.eager[0].auto_model.config, self.spec.architecture, self.pad_id)


def export_model(
    source: str, output: str | Path | None = None, options: ExportOptions | None = None, **kwargs: Any
) -> Path:
    """Export a sentence-transformers checkpoint into a verified, self-contained model folder.

    Args:
        source: a local checkpoint folder, a catalogue name (``all-MiniLM-L6-v2``) or a hub id.
        output: the folder to create; default ``models/<name>`` under the current directory.
        options: what to produce and how strictly to check it.
        **kwargs: instead of ``options``, its plain values as :meth:`ExportOptions.parse` takes them
            (``formats="onnx,openvino"``, ``precision="fp16"``, ``quantize="dynamic"``, ``min_cosine=...``).

    Returns:
        The written folder.

    Raises:
        SourceError: the checkpoint cannot be found or is not supported.
        ParityError: an artifact does not reproduce sentence-transformers; nothing is written.
        QualityGateError: the int8 model lost too much quality; nothing is written.
        ProviderUnavailableError: ``precision="bf16"`` on a CPU without bf16 units (it cannot be checked here).
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        TypeError: both ``options`` and keyword values were given, or an unknown keyword.
        ValueError: an unknown or conflicting setting (the message lists the valid ones).
    """
    if options is not None and kwargs:
        raise TypeError(f"pass either options or keyword settings, not both (got {', '.join(kwargs)})")
    options = options if options is not None else ExportOptions.parse(**kwargs)
    _check_precision_runs_here(options.precision)
    resolved = resolve_source(source, options.revision)
    target_dir = Path(output) if output else Path("models") / _default_name(resolved, options.quantize)
    # --overwrite would delete the checkpoint it reads, or an --eval set
    check_not_input(target_dir, [resolved.path, *options.eval_dirs])
    if options.overwrite:
        check_replaceable(target_dir, resolved.path)
    if target_dir.exists() and not options.overwrite:
        raise FileExistsError(f"{target_dir} exists; pass overwrite=True (--overwrite) to replace it")
    spec = read_checkpoint(resolved.path, resolved.catalogue)
    from embedrt.model import openvino_int8_advice, without_speed_advice

    # the checks load scratch folders: the speed advice is given once below, for the published folder
    try:
        with claim_work_dir(target_dir) as work, without_speed_advice():
            build = load(resolved, spec, options, work)
            export(build)
            optimise(build)
            folder = work / "model"
            manifest = build_int8(build, folder) if options.quantize else build_float(build, folder, options.precision)
            write_manifest(folder, manifest)
            _publish(work, target_dir, options.overwrite)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or exc.filename is not None:
            raise
        # torch, onnx and the file writes below them say only "[Errno 28] No space left on device"
        raise OSError(exc.errno, f"{exc.strerror or 'No space left on device'} while exporting to {target_dir} (the "
                      "export is built in a work folder beside it, on the same file system, which holds the "
                      "intermediate graphs too)") from exc
    log.info("exported %s -> %s", resolved.source_id, target_dir)
    advice = openvino_int8_advice(target_dir) if options.quantize and Format.OPENVINO in options.formats else None
    if advice:
        log.warning("%s", advice)
    return target_dir


def _check_precision_runs_here(precision: Precision) -> None:
    """A bf16 folder's parity is checked in bf16, which needs this CPU's bf16 units (emulation is not the product)."""
    from embedrt.cpu import BF16_FLAGS, bf16_units

    if precision is Precision.BF16 and bf16_units() is None:
        raise ProviderUnavailableError(
            f"--precision bf16 is checked against sentence-transformers in bf16, which needs a CPU with bf16 units "
            f"({' or '.join(BF16_FLAGS)}); this one has none. Export it on such a CPU, or export fp32"
        )


def _default_name(resolved: ResolvedSource, quant: QuantConfig | None) -> str:
    name = resolved.catalogue.name if resolved.catalogue else resolved.source_id.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}-int8-{quant.method.value}" if quant else name


def load(resolved: ResolvedSource, spec: CheckpointSpec, options: ExportOptions, work: Path) -> Build:
    """Load the checkpoint twice (as shipped, and traceable) and embed the probe texts with it."""
    st = require("sentence_transformers", "export")
    reference = _load_st(st, resolved.path)
    if reference.max_seq_length != spec.max_seq_length:  # the files' contract must be what ST itself runs
        raise SourceError(
            f"{resolved.path}: sentence-transformers runs max_seq_length {reference.max_seq_length}, the files "
            f"say {spec.max_seq_length}; refusing to guess (set max_seq_length in the Transformer module's "
            f"sentence_bert_config.json, at most {spec.max_seq_length})"
        )
    added = len(reference.tokenizer("")["input_ids"])  # the special tokens around every text
    if spec.max_seq_length <= added:  # named here: the runtime's check named a file of the scratch folder
        raise SourceError(f"{resolved.path}: max_seq_length {spec.max_seq_length} leaves no room for a token beside "
                          f"the {added} special tokens the tokenizer adds; set a larger one in the Transformer "
                          "module's sentence_bert_config.json")
    _check_tokenizer_fits(resolved.path, reference)
    # the prompts as sentence-transformers runs them (it adds empty query / document ones, which its
    # encode_query / encode_document then pick before any default), and the tokenizer's call-time setting
    prompts = {name: text or "" for name, text in dict(getattr(reference, "prompts", None) or {}).items()}
    spec = dataclasses.replace(
        spec, prompts=prompts, default_prompt_name=getattr(reference, "default_prompt_name", None),
        split_special_tokens=bool(getattr(reference.tokenizer, "split_special_tokens", False)))
    eager = _load_st(st, resolved.path, say_dtype=False, model_kwargs={"attn_implementation": "eager"})
    # a text holding the special tokens' strings ("[SEP]", "<s>"): whether they stay text or become the
    # tokens is the tokenizer's setting (split_special_tokens), which the runtime must follow
    specials = [t for t in reference.tokenizer.all_special_tokens if isinstance(t, str) and t.strip()]
    texts = [*PROBE_TEXTS, *options.parity_texts, " and ".join(["special tokens as text:", *specials])]
    pad_id = reference.tokenizer.pad_token_id
    build = Build(resolved, spec, options, work, reference, eager, int(pad_id if pad_id is not None else 0),
                  texts, reference_embeddings(reference, texts))
    build.scratch.mkdir()
    return build


def _check_tokenizer_fits(path: Path, reference: Any) -> None:
    """Refuse a tokenizer far smaller than the model's embedding table: without its tokenizer.json or vocab
    file, a checkpoint's tokenizer can come out with a handful of special tokens, every word [UNK], and
    parity with sentence-transformers (which loads the same tokenizer) still perfect."""
    words = len(reference.tokenizer)
    config = getattr(getattr(reference[0], "auto_model", None), "config", None)
    table = getattr(config, "vocab_size", None)
    if isinstance(table, int) and words < table // 2:
        raise SourceError(f"{path}: the tokenizer has {words} tokens but the model's embedding table has {table}; "
                          "its vocabulary is missing (tokenizer.json, vocab.txt or vocab.json + merges.txt)")
    if isinstance(table, int) and words > table:  # an added token past the table: an id the model cannot embed
        raise SourceError(f"{path}: the tokenizer has {words} tokens (added tokens included) but the model's "
                          f"embedding table has {table} (config.json vocab_size); an added token's id would be "
                          "outside it")
    if reference.tokenizer.pad_token_id is None:
        raise SourceError(f"{path}: the tokenizer has no padding token (tokenizer_config.json pad_token); "
                          "batches cannot be padded")


def _load_st(st: Any, path: Path, say_dtype: bool = True, **kwargs: Any) -> Any:
    """``SentenceTransformer(path)`` in fp32 (bf16 / fp16 weights cast, logged if ``say_dtype``), or SourceError
    naming the folder and what failed (a truncated ``model.safetensors`` raised safetensors' own error, a
    traceback at the CLI)."""
    try:
        model = st.SentenceTransformer(str(path), device="cpu", **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:  # safetensors' error is an Exception
        raise SourceError(f"{path}: sentence-transformers cannot load this checkpoint: {type(exc).__name__}: "
                          f"{exc}") from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise SourceError(f"{path}: a weights file is damaged: {exc}") from exc
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:  # bf16 / fp16 weights: upcast exactly; the graph and its reference are fp32
        if say_dtype:
            log.info("%s: the weights are %s: cast to fp32, then exported and checked against sentence-transformers "
                     "on the cast weights",
                     path, ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)))
        model.float()
    return model


def export(build: Build) -> None:
    """Wrap encoder + pooling + head in one torch module and export it to ONNX (``plain``)."""
    export_onnx(build_pipeline(build.eager, build.spec), build.plain, build.pad_id)


def optimise(build: Build) -> None:
    """Fuse ``plain`` with ONNX Runtime's transformer optimizer (``fused``)."""
    build.fusion = optimize_graph(build.plain, build.fused, *_heads_and_width(build.eager))


def build_float(build: Build, folder: Path, precision: Precision) -> Manifest:
    """Write the fp32 / fp16 graphs into ``folder`` and check them against sentence-transformers.

    Returns:
        The folder's manifest with its files and parity figures (not written yet).
    """
    manifest = _skeleton(build, precision, build.options.formats, {"fused_operators": build.fusion})
    write_tokenizer(build.reference, folder, build.resolved.path)
    if Format.ONNX in build.options.formats:
        write_onnx(_float_onnx(build, precision), folder / "model.onnx", manifest)
    if Format.OPENVINO in build.options.formats:
        convert_to_ir(build.plain, folder, manifest.contract(), fp16_weights=precision is Precision.FP16)
    manifest = dataclasses.replace(manifest, files=describe_files(folder))
    return validate(build, folder, manifest, build.options.parity_threshold)


def _float_onnx(build: Build, precision: Precision) -> Any:
    import onnx

    if precision is Precision.FP16:
        from embedrt.export.fp16 import convert_fp16

        return convert_fp16(build.plain)  # from the plain graph: fp16 needs no contrib ops of ONNX Runtime
    return onnx.load(str(build.fused))


def build_int8(build: Build, folder: Path) -> Manifest:
    """An fp32 folder in scratch (checked), the int8 graphs in ``folder`` (quantised from it), then the gate.

    Returns:
        The int8 folder's manifest with files, parity and gate figures (not written yet).
    """
    quant = build.options.quantize
    if quant is None:
        raise ValueError("build_int8 needs options.quantize")
    base = build.scratch / "fp32"
    base_manifest = build_float(build, base, Precision.FP32)
    write_manifest(base, base_manifest)  # a folder the runtime loads: the gate's fp32 side
    tokenizer = TextTokenizer(base / TOKENIZER_NAME, base_manifest.max_seq_length, base_manifest.pad_token_id,
                              base_manifest.inputs)
    # the fp32 graphs int8 is built from passed their own parity check (--min-cosine bounds that one); the
    # int8 graphs' parity entries carry threshold 0, since the gate judges them
    base_parity = {fmt: {k: record[k] for k in ("min_cosine", "threshold") if k in record}
                   for fmt, record in base_manifest.parity.items()}
    manifest = _skeleton(build, Precision.INT8, build.options.formats,
                         {"quantization": {**quant.describe(build.options.formats), "fp32_parity": base_parity}})
    write_tokenizer(build.reference, folder, build.resolved.path)
    fusion = build.fusion
    if Format.ONNX in build.options.formats:
        # int8 graphs keep the embedding Gather unfused, so its table can be quantised per row; static (QDQ)
        # also keeps attention unfused, since the fused Attention's QKV weights cannot take QDQ
        source = build.scratch / "fused-int8.onnx"
        fusion = optimize_graph(build.plain, source, *_heads_and_width(build.eager), embed_fusion=False,
                                attention_fusion=quant.method is Method.DYNAMIC)
        write_onnx(quantize_onnx(source, build.scratch / "quantized.onnx", quant, tokenizer), folder / "model.onnx",
                   manifest)
    if Format.OPENVINO in build.options.formats:
        quantize_openvino(base / OPENVINO_XML, folder, quant, tokenizer, manifest.contract())
    manifest = dataclasses.replace(manifest, files=describe_files(folder),
                                   extra={**manifest.extra, "fused_operators": fusion})
    manifest = validate(build, folder, manifest, threshold=0.0)  # int8 is judged by the gate, below
    return gate(build, base, folder, manifest)


def validate(build: Build, folder: Path, manifest: Manifest, threshold: float) -> Manifest:
    """Parity of every graph in ``folder`` with sentence-transformers, run through the runtime.

    Raises:
        ParityError: a graph's smallest cosine is below ``threshold``; nothing is published.
    """
    checked = check_folder(folder, manifest, build.check_dir(folder))
    parity = {fmt: _parity_of(checked, fmt, build, manifest.precision, threshold) for fmt in manifest.graphs}
    if manifest.precision is Precision.FP32 and "openvino" in parity:
        bf16 = _bf16_parity_of(checked, build)
        if bf16 is not None:
            parity["openvino"]["bf16"] = bf16
    return dataclasses.replace(manifest, parity=parity)


def _bf16_parity_of(folder: Path, build: Build) -> dict[str, Any] | None:
    """The fp32 IR run in bf16 against sentence-transformers, on a CPU with bf16 units (None elsewhere).

    Not a gate: a folder that misses :data:`BF16_MIN_COSINE` is still published, and runs in f32. One that
    passes runs in bf16 where that pays (AMX; see :func:`embedrt.plan.openvino_cpu_precision`).
    """
    from embedrt.cpu import bf16_units
    from embedrt.model import load as load_model

    units = bf16_units()
    if units is None:
        return None
    batched_run, single_run = _parity_runs(load_model(folder, device="openvino", inference_precision="bf16"), build)
    batched = parity_figures(build.expected, batched_run)
    single = parity_figures(build.expected[: len(PROBE_TEXTS)], single_run)
    worst = min(batched["min_cosine"], single["min_cosine"])
    log.info("bf16 check of the IR on %s: min cosine %.6f (needs %g to run in bf16)", units, worst, BF16_MIN_COSINE)
    return {**batched, "min_cosine_unbatched": single["min_cosine"], "threshold": BF16_MIN_COSINE,
            "passed": worst >= BF16_MIN_COSINE, "units": units}


def gate(build: Build, base: Path, folder: Path, manifest: Manifest) -> Manifest:
    """The int8 quality gate against the fp32 folder ``base``, per graph format; figures go into the manifest.

    Raises:
        QualityGateError: int8 lost too much quality; nothing is published.
    """
    from embedrt.model import load as load_model

    opts = build.options
    checked = build.check_dir(folder)  # validate laid it out
    gates, failures = {}, []
    for fmt in manifest.graphs:
        device = "openvino" if fmt == "openvino" else "cpu"
        # the reference is exactly fp32 (an fp32 folder may run bf16 by default on AMX CPUs)
        try:
            gates[fmt] = run_gate(load_model(base, device=device, inference_precision="f32"),
                                  load_model(checked, device=device), opts.eval_dirs,
                                  opts.min_retained, opts.min_agreement, opts.min_mean_cosine, opts.min_p1_cosine)
        except GateFailure as exc:  # every graph is judged, and each shortfall named with its graph
            failures += [f"{fmt} graph: {failure}" for failure in exc.failures]
    if failures:
        raise GateFailure(failures)
    quantization = {**manifest.extra["quantization"], "gate": gates}
    return dataclasses.replace(manifest, extra={**manifest.extra, "quantization": quantization})


def _skeleton(build: Build, precision: Precision, formats: tuple[Format, ...], extra: dict[str, Any]) -> Manifest:
    return new_manifest(build.resolved, build.spec, dim=embedding_dim(build.reference), pad_id=build.pad_id,
                        precision=precision, formats=tuple(f.value for f in formats),
                        similarity=build.options.similarity, extra={**extra, "limits": build.limits})


def _heads_and_width(st_model: Any) -> tuple[int, int]:
    config = st_model[0].auto_model.config
    # DistilBERT names them n_heads / dim
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    width = getattr(config, "hidden_size", None) or config.dim
    return int(heads), int(width)


def _parity_of(folder: Path, fmt: str, build: Build, precision: Precision, threshold: float) -> dict[str, Any]:
    from embedrt.model import load as load_model

    exact = "f32" if fmt == "openvino" and precision is Precision.FP32 else None  # never bf16 by default here
    model = load_model(folder, device="openvino" if fmt == "openvino" else parity_device(precision),
                       inference_precision=exact)
    batched_run, single_run = _parity_runs(model, build)
    batched = check_parity(fmt, build.expected, batched_run, threshold)
    single = check_parity(fmt, build.expected[: len(PROBE_TEXTS)], single_run, threshold)
    return {**batched, "min_cosine_unbatched": single["min_cosine"], "device": model.device}


def _parity_runs(model: Any, build: Build) -> tuple[FloatArray, FloatArray]:
    """The parity texts in batches of 16, and the probe texts one per call: padding must not change a text."""
    return model.encode(build.texts, batch_size=16), model.encode(list(PROBE_TEXTS), batch_size=1)


def _publish(work: Path, target: Path, overwrite: bool) -> None:
    """Move the finished folder into place with renames, never leaving a half-written target."""
    built = work / "model"
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
        old = work / "previous"
        target.rename(old)
    built.rename(target)
