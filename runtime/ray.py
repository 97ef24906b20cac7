"""Bulk embedding on Ray Data: ``map_batches`` over an actor pool, one model per actor.

Each actor loads the model once and runs ONNX Runtime (or OpenVINO) with as many intra-op threads as
the CPUs Ray gave it (``cpus_per_actor``): ONNX Runtime sizes its pool from the host's cores and
ignores ``OMP_NUM_THREADS``, so without ``threads=`` N actors x all cores would oversubscribe the CPU.
The tokenizers library's Rayon pool gets the same count (``RAYON_NUM_THREADS``).
Blocks leave the actors as Arrow tables with a flat float32 (or float16) fixed-size-list column, not as
Python lists, so the object store holds ``dim x 4`` bytes per row plus the id.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from embedrt._optional import require
from embedrt.bulk import (
    STATE_NAME,
    BadRowError,
    BulkOptions,
    BulkSummary,
    EmbedDtype,
    IdSet,
    InputFormat,
    JobState,
    RawRow,
    ResumeError,
    check_row,
    check_rows,
    check_utf8_path,
    embedding_schema,
    embedding_table,
    exclusive,
    iter_jsonl_range,
    iter_rows,
    job_identity,
    jsonl_ranges,
    parquet_columns,
    parquet_file,
    part_name,
    resolve_input,
    write_part,
)
from embedrt.manifest import read_manifest, resolve_prompt, write_json_atomic
from embedrt.providers import parse_device
from embedrt.textio import InputFileError
from embedrt.tokenize import repaired

log = logging.getLogger(__name__)

# rows per Ray batch: a quarter of the model's planning window (embedrt.model.WINDOW), which keeps most of its
# padding savings, while batches of a few seconds spread evenly over the actors (SciFact-length passages take
# ~30 ms each on one core: 1,024 rows would be half a minute, and the job's tail one actor working alone)
BATCH_ROWS = 256
# bytes of whole JSONL lines per Ray read task
JSONL_RANGE_BYTES = 32 << 20
# load()'s settings an actor takes from the caller besides device, threads and inference precision
ACTOR_LOAD_OPTIONS = ("allow_fallback", "openvino_cache_dir", "performance_hint", "huge_pages")


class EmbedBatch:
    """The callable class ``map_batches`` runs on each actor: the model is loaded once, in ``__init__``."""

    def __init__(self, model_dir: str, *, threads: int, device: str, id_field: str, field: str,
                 dtype: str, batch_size: int, max_tokens: int | None, inference_precision: str | None = None,
                 prompt_name: str | None = None, prompt: str | None = None,
                 load_options: dict[str, Any] | None = None) -> None:
        from embedrt.model import load

        self.model = load(model_dir, device=device, threads=threads, inference_precision=inference_precision,
                          **(load_options or {}))
        self.id_field, self.field, self.batch_size, self.max_tokens = id_field, field, batch_size, max_tokens
        self.schema = embedding_schema(self.model, EmbedDtype.parse(dtype))
        self.prompt_name, self.prompt = prompt_name, prompt

    def __call__(self, batch: Any) -> Any:
        """A ``pyarrow.Table`` batch of input rows -> a table of ``id`` and ``embedding``."""
        names = batch.column_names
        for name in (self.id_field, self.field):
            if name not in names:
                raise InputFileError(f"the dataset has no column {name!r} (columns: {', '.join(names)})")
        rids = batch.column(self.id_field).to_pylist()
        texts = batch.column(self.field).to_pylist()
        titles = batch.column("title").to_pylist() if "title" in names else [None] * len(rids)
        ids, good = [], []
        for rid, text, title in zip(rids, texts, titles):
            checked = check_row(RawRow(f"row with id {rid!r}", rid, text, title), self.field, self.id_field)
            if isinstance(checked, str):
                raise BadRowError(f"row with id {rid!r}: {checked} (Ray mode has no --skip-bad)")
            ids.append(checked[0])
            good.append(checked[1])
        tokens = self.model.tokenize_batch(good, prompt_name=self.prompt_name, prompt=self.prompt)
        embeddings = self.model.encode_tokens(tokens.ids, batch_size=self.batch_size, max_tokens=self.max_tokens)
        return embedding_table(ids, embeddings, self.schema)


def embed_dataset(
    dataset: Any,
    model_dir: str | os.PathLike[str],
    *,
    id_field: str = "_id",
    field: str = "text",
    dtype: str = "float32",
    device: str = "auto:cpu",
    num_actors: int | None = None,
    cpus_per_actor: int = 1,
    batch_rows: int = BATCH_ROWS,
    batch_size: int = 32,
    max_tokens: int | None = None,
    max_restarts: int = 4,
    inference_precision: str | None = None,
    prompt_name: str | None = None,
    prompt: str | None = None,
    load_options: Mapping[str, Any] | None = None,
) -> Any:
    """Add the embedding step to a Ray Dataset: rows with ``id_field`` and ``field`` -> ``id``, ``embedding``.

    Args:
        dataset: a ``ray.data.Dataset`` of input rows (a ``title`` column is joined as ``embedrt eval`` does).
        model_dir: a model folder every node can read at this path.
        id_field, field, dtype, batch_size, max_tokens: as for ``embedrt embed``.
        device: what each actor loads the model on; default ``auto:cpu``: called directly, each actor takes
            the faster CPU backend of its own node (actors reserve CPUs, not GPUs); ``embed_with_ray`` passes
            the device its driver's load resolved to, so that every actor runs alike.
        num_actors: actor pool size; default: the cluster's CPUs // ``cpus_per_actor``.
        cpus_per_actor: CPUs Ray reserves per actor, and its intra-op threads.
        batch_rows: rows per Ray batch (one ``__call__``).
        max_restarts: restarts per actor, and retries per batch, when an actor dies (killed, OOM, node lost).
        inference_precision: as ``load``'s; ``embed_with_ray`` passes what the driver's load chose, so every
            actor computes alike whatever CPU its node has.
        prompt_name, prompt: as ``EmbeddingModel.encode``'s (default: the model's default prompt, if any).
        load_options: more of ``load``'s settings for every actor: ``allow_fallback``, ``openvino_cache_dir``
            (a path on each node), ``performance_hint``, ``huge_pages``.

    Returns:
        The lazy ``ray.data.Dataset`` of ``id`` (string) and ``embedding`` (fixed-size list), with the
        model's name and dim in its schema metadata. Ids are not checked for duplicates here (that takes a
        pass over all ids; ``embed_with_ray`` does it before it publishes the output).
    """
    ray = require("ray", "ray")
    EmbedDtype.parse(dtype)
    extra = dict(load_options or {})
    unknown = sorted(set(extra) - set(ACTOR_LOAD_OPTIONS))
    if unknown:  # device, threads and inference_precision are this function's own arguments
        raise ValueError(f"load_options takes {', '.join(ACTOR_LOAD_OPTIONS)}; not {', '.join(unknown)}")
    resolve_prompt(read_manifest(model_dir), prompt_name, prompt)  # a bad prompt fails here, not in every actor
    if num_actors is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        num_actors = max(1, cpus // cpus_per_actor)
    kwargs = {"model_dir": str(Path(model_dir).resolve()), "threads": cpus_per_actor, "device": device,
              "id_field": id_field, "field": field, "dtype": dtype, "batch_size": batch_size,
              "max_tokens": max_tokens, "inference_precision": inference_precision, "prompt_name": prompt_name,
              "prompt": prompt, "load_options": extra}
    # Ray Data's own default is unlimited restarts; a bounded count turns an actor that dies on every
    # batch (out of memory on a huge text, a broken node) into an error instead of a job that never ends
    retries: Any = functools.partial(dict, max_restarts=max_restarts, max_task_retries=max_restarts)
    with warnings.catch_warnings():  # Ray 2.60 deprecates ray_remote_args_fn but names no other way to set these
        warnings.simplefilter("ignore", DeprecationWarning)
        return dataset.map_batches(
            EmbedBatch, fn_constructor_kwargs=kwargs, batch_size=batch_rows, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor, zero_copy_batch=True,
            ray_remote_args_fn=retries,
            # the tokenizers library sizes its Rayon pool from the host's cores too: one per actor CPU
            runtime_env={"env_vars": {"RAYON_NUM_THREADS": str(cpus_per_actor)}},
        )


def _drop_unused(options: dict[str, Any], model_dir: Any, asked: str, resolved: str) -> None:
    """Take OpenVINO's settings out of ``options`` where the actors will run ONNX Runtime, as ``load`` does:
    a warning where ``auto`` or a fallback chose that device, an error where it is the device asked for."""
    from embedrt.plan import LoadSettings

    given = LoadSettings(1, openvino_cache_dir=options.get("openvino_cache_dir"),
                         performance_hint=options.get("performance_hint"))
    unused = given.unused_by(parse_device(resolved).kind)
    if not unused:
        return
    if parse_device(asked).kind not in ("auto", "openvino"):
        raise ValueError(f"{', '.join(unused)}: OpenVINO only, but device={asked!r} runs ONNX Runtime; leave it "
                         "out, or use device='auto'")
    log.warning("%s: %s not used: the job runs on %s", model_dir, ", ".join(unused), resolved)
    options.pop("openvino_cache_dir", None)
    options.pop("performance_hint", None)


def read_input(file: Path, fmt: InputFormat, id_field: str, field: str) -> Any:
    """A Ray Dataset of the input file's rows; read tasks take no CPU slot, so a full actor pool cannot starve them."""
    if fmt is InputFormat.PARQUET:
        return _read_parquet(file, id_field, field)
    return _read_text_rows(file, fmt, id_field, field)


def _read_text_rows(file: Path, fmt: InputFormat, id_field: str, field: str) -> Any:
    """A JSONL, CSV or TSV file's rows, parsed and checked as ``embedrt embed`` does, in tasks with no CPU slot.

    Not ``ray.data.read_json`` / ``read_csv``: with ``lines=True`` the first reads through pandas, which turns
    ids like ``"007"`` into 7, drops titles like ``"2020"`` and fails on a byte order mark; pyarrow's CSV
    reader takes an unclosed quote to the end of the file as one text. A JSONL file is read in ranges of
    whole lines, one per task; a CSV or TSV file in one task, as a stream (a quoted CSV field may span
    lines, so a CSV cannot be cut by lines; reading is far faster than embedding). A ``Datasource``, so Ray
    splits a task's output into blocks for every actor. A bad row stops the job, named by file and line. The
    tables hold the id and the text to embed (a title already joined) as strings.
    """
    ray = require("ray", "ray")
    pa = require("pyarrow", "bulk")
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    path = file.resolve()
    schema = pa.schema([(id_field, pa.string()), (field, pa.string())])
    size = path.stat().st_size
    # one scan of the file, on the driver, here: Ray asks for the read tasks several times per job. Ranges of
    # 32 MiB: each read task may start a worker process (~1 s), so small ranges made the read 10-20x slower
    # than parsing; Ray splits each task's output into blocks for the actors
    ranges: list[tuple[int, int | None, int]] = (
        list(jsonl_ranges(path, JSONL_RANGE_BYTES)) if fmt is InputFormat.JSONL else [(0, None, 1)])

    def read(start: int, end: int | None, first: int) -> Any:
        rows = (iter_jsonl_range(path, id_field, field, start, end, first) if fmt is InputFormat.JSONL
                else iter_rows(path, fmt, id_field, field))
        ids, texts = [], []
        for _, rid, text in check_rows(rows, field, id_field, " (Ray mode has no --skip-bad)"):
            ids.append(rid)
            # a lone surrogate (a JSON escape of half a UTF-16 pair) becomes U+FFFD, as the local command
            # embeds it: Arrow cannot hold it, and the read task failed with a UnicodeEncodeError
            texts.append(repaired(text))
            if len(ids) >= BATCH_ROWS * 4:
                yield pa.table([ids, texts], schema=schema)
                ids, texts = [], []
        yield pa.table([ids, texts], schema=schema)

    class TextRows(Datasource):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]

        def estimate_inmemory_data_size(self) -> int:
            return size

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [ReadTask(functools.partial(read, start, end, first),
                             BlockMetadata(num_rows=None, size_bytes=(end or size) - start, exec_stats=None,
                                           input_files=(str(path),)),
                             schema=schema)
                    for start, end, first in ranges]

    return ray.data.read_datasource(TextRows(), num_cpus=0)


def _read_parquet(file: Path, id_field: str, field: str) -> Any:
    """A Parquet file's rows, read a row group per task with no CPU slot.

    Not ``ray.data.read_parquet``: in Ray 2.60 it lists the files in a task that takes one CPU, whatever
    ``num_cpus`` says, and waits forever once the actor pool holds every CPU.
    """
    ray = require("ray", "ray")
    pa = require("pyarrow", "bulk")
    source = parquet_file(file)
    columns = parquet_columns(source, file, id_field, field)
    path = str(file.resolve())

    def read(groups: Any) -> Any:
        pq = require("pyarrow.parquet", "bulk")
        reader = pq.ParquetFile(path)
        for group in groups.column("row_group").to_pylist():
            for batch in reader.iter_batches(batch_size=BATCH_ROWS * 4, row_groups=[group], columns=columns):
                yield pa.Table.from_batches([batch])

    groups = [{"row_group": i} for i in range(source.metadata.num_row_groups)]
    if not groups:
        return ray.data.from_arrow(source.schema_arrow.empty_table().select(columns))
    return ray.data.from_items(groups).map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=0)


def _embedrt_cause(exc: BaseException) -> BaseException | None:
    """The embedrt error (a bad row, a missing column) an actor raised, which Ray hands back only as text.

    A task's exception reaches the driver as a ``RayTaskError`` whose chain ends at Ray's
    ``UserCodeException``; the actor's own exception survives in the traceback text only. A read task's
    comes back as a ``RayTaskError`` that is also a ``BadRowError``, whose text is still Ray's traceback.
    """
    found = _ACTOR_ERROR.findall(str(exc))
    if not found:
        return exc if isinstance(exc, (BadRowError, InputFileError)) else None
    kind, message = found[-1]
    return (BadRowError if kind == "BadRowError" else InputFileError)(message.strip())


# how an actor's bad row or bad input reads in Ray's text of the failed task
_ACTOR_ERROR = re.compile(r"embedrt\.(?:\w+\.)*?(BadRowError|InputFileError): (.+)")


def _check_ray_output(out: Path) -> None:
    """Refuse a folder that holds anything, naming the leftovers of an interrupted Ray job."""
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    staging = [e for e in entries if e.name.startswith(".ray-") and e.is_dir()]
    if staging and len(staging) == len(entries):
        raise ResumeError(f"{out}: holds only {', '.join(e.name for e in staging)}, the staging folder of a Ray "
                          "job that was interrupted before it published; delete it to reuse the folder")
    if entries:
        raise ResumeError(f"{out}: not empty; a Ray job is not resumable, choose a new or empty folder")


def embed_with_ray(
    model_dir: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    options: BulkOptions | None = None,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    cpus_per_actor: int = 1,
    load_options: Mapping[str, Any] | None = None,
) -> BulkSummary:
    """``embedrt embed --ray``: the local command's job on a Ray cluster, same output format and folder layout.

    Ray writes into a hidden folder inside ``output_dir``; the ids are checked (each exactly once, 8 bytes
    per id on the driver), and only then are the files renamed into place as ``part-NNNNNN.parquet``.
    A Ray job is not resumable: a failed one leaves no parts, and a rerun starts over.

    Args:
        model_dir: the model folder (the same path on every node).
        input_path, output_dir, options: as for ``embedrt.bulk.embed_corpus``; ``skip_bad`` is refused.
        address: a Ray cluster address; None starts a local Ray for the job and stops it afterwards.
        num_actors, cpus_per_actor, load_options: see ``embed_dataset``; ``allow_fallback`` applies to the
            driver's load too, which resolves the device every actor runs on.

    Returns:
        Totals: texts, parts and seconds (tokens and truncation are not counted in Ray mode).

    Raises:
        ValueError: ``skip_bad`` was asked for.
        ResumeError: the output folder is not empty.
        BadRowError: a bad or duplicate row (names the id).
    """
    ray = require("ray", "ray")
    opts = options or BulkOptions()
    if opts.skip_bad:
        raise ValueError("--skip-bad is not supported with --ray: a bad row stops the job (run without --ray)")
    if opts.part_rows is not None:  # Ray writes a file per block; taking the option and ignoring it misled
        raise ValueError("--part-rows is not supported with --ray: Ray Data writes a part per block of rows "
                         "(run without --ray for parts of a set size)")
    file, fmt = resolve_input(input_path)
    out = Path(output_dir)
    check_utf8_path(out)
    _check_ray_output(out)  # before the folder is made
    # the lock a local run holds too: without it, a second run (Ray or local) into the folder wrote its parts
    # beside, or over, this one's, and both said they succeeded
    with exclusive(out) as made:
        try:
            _check_ray_output(out)  # again, now that no other run can write to it
            return _ray_job(ray, model_dir, file, fmt, out, opts, address, num_actors, cpus_per_actor, load_options)
        except BaseException:
            if made:  # the folder is left as the job found it: not there (removed while still this job's)
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise


def _ray_job(ray: Any, model_dir: str | os.PathLike[str], file: Path, fmt: InputFormat, out: Path,
             opts: BulkOptions, address: str | None, num_actors: int | None, cpus_per_actor: int,
             load_options: Mapping[str, Any] | None) -> BulkSummary:
    """``embed_with_ray``'s job, its arguments checked and its folder locked."""
    started = not ray.is_initialized()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if started:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
        # ray.init makes SIGTERM sys.exit(15); a handler already there (the CLI's, which cleans up and exits
        # 143) keeps it. Under the default one, Ray's SystemExit still runs the clean-up below.
        if callable(previous) and main_thread:
            signal.signal(signal.SIGTERM, previous)
    staging = out / f".ray-{uuid.uuid4().hex}"
    try:
        _check_actor_fits(ray, cpus_per_actor, local=started and address in (None, "", "local"))
        start = time.perf_counter()
        from embedrt.model import load

        # metadata for the job record, and the device every actor runs on: actors reserve CPUs, not GPUs, so
        # the default auto is the CPU-side auto here
        device = "auto:cpu" if parse_device(opts.device).kind == "auto" else opts.device
        actor_options = dict(load_options or {})
        model = load(model_dir, device=device, threads=1, huge_pages=False,
                     inference_precision=opts.inference_precision,
                     allow_fallback=bool(actor_options.get("allow_fallback", False)))
        _drop_unused(actor_options, model_dir, device, model.device)
        identity = job_identity(model, file, fmt, opts, 0)
        identity["options"]["mode"] = "ray"
        dataset = embed_dataset(
            _in_order(read_input(file, fmt, opts.id_field, opts.field)), model_dir, id_field=opts.id_field,
            field=opts.field,
            dtype=opts.dtype.value, device=model.device, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
            batch_size=opts.batch_size, max_tokens=opts.max_tokens,
            inference_precision=model.plan.inference_precision or "f32", prompt_name=opts.prompt_name,
            prompt=opts.prompt, load_options=actor_options)
        with warnings.catch_warnings():  # write_parquet has no num_cpus= of its own in Ray 2.60
            warnings.simplefilter("ignore", DeprecationWarning)
            # like the reads, writes take no CPU slot: the actor pool holds them all
            # and with one thread: pyarrow's writer, on more (it sizes its pool from OMP_NUM_THREADS, which
            # Ray sets to 1 only where it is unset), wrote a block's chunks out of order
            dataset.write_parquet(str(staging), ray_remote_args={
                "num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
        summary = _publish(staging, out, time.perf_counter() - start, model, opts.dtype)
        write_json_atomic(out / STATE_NAME, JobState(identity, summary).to_json())
        return summary
    except BaseException as exc:  # a bad row, Ctrl-C, SIGTERM: the folder is left as the job found it
        if started:  # first, so that no write task of the job puts a file in the staging folder after it goes
            started = False
            _shutdown(ray)
        # the folder was empty before the job: whatever parts are in it now, this job moved there
        shutil.rmtree(staging, ignore_errors=True)
        for part in out.glob("part-*.parquet"):
            part.unlink(missing_ok=True)
        cause = _embedrt_cause(exc) if isinstance(exc, Exception) else None
        if cause is not None and cause is not exc:
            raise cause from None  # the bad row, not Ray's wrapping of it
        raise
    finally:
        if started:
            _shutdown(ray)
        if previous is not None and main_thread and signal.getsignal(signal.SIGTERM) is not previous:
            signal.signal(signal.SIGTERM, previous)  # not Ray's sys.exit after the job


def _in_order(dataset: Any) -> Any:
    """``dataset`` with Ray Data told to keep its blocks' order: the parts then hold the rows in input order,
    as a local run writes them (blocks used to come out in the order the actors finished them). Set on the
    dataset's own context, which every dataset derived from it shares: the driver's current context, and so
    a caller's other datasets, are left alone."""
    context = dataset.context
    context.execution_options.preserve_order = True
    return dataset


def _check_actor_fits(ray: Any, cpus_per_actor: int, local: bool) -> None:
    """Refuse actors of more CPUs than any node of the local Ray has: none could start, and Ray Data waits for
    one forever. On a cluster an autoscaler may still add such a node: there it is a warning."""
    largest = max((float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                  default=0.0)
    if cpus_per_actor <= largest:
        return
    message = (f"--threads {cpus_per_actor}: each actor reserves that many CPUs, and the largest node of this Ray "
               f"has {largest:g}")
    if local:
        raise ValueError(f"{message}; no actor could start (the job would wait forever): use --threads "
                         f"{max(1, int(largest))} or fewer")
    log.warning("%s now; the job waits until a node that large joins (an autoscaler's)", message)


def _shutdown(ray: Any) -> None:
    """Stop the Ray this job started; a second Ctrl-C meanwhile cuts the shutdown short, not the clean-up
    that follows it (the staging folder and parts are still removed)."""
    with contextlib.suppress(KeyboardInterrupt):
        ray.shutdown()


def _publish(staging: Path, out: Path, seconds: float, model: Any, dtype: EmbedDtype) -> BulkSummary:
    """Check every id is there once, then rename Ray's files into ``out`` as numbered parts.

    An input without rows gives one empty part, as ``embed_corpus`` writes, so the dataset has its schema.
    """
    pq = require("pyarrow.parquet", "bulk")
    # Ray names a write's files by one prefix and the write task's index, which follows the blocks' order: in
    # (length, name) order for indexes past the zero-padding's 6 digits too
    files = sorted(staging.glob("*.parquet"), key=lambda p: (len(p.name), p.name)) if staging.is_dir() else []
    seen = IdSet()
    texts = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=["id"], batch_size=65536):
            for rid in batch.column(0).to_pylist():
                if not seen.add(rid):
                    raise BadRowError(f"duplicate id {rid!r} in the input; nothing was published")
            texts += batch.num_rows
    out.mkdir(parents=True, exist_ok=True)
    if not files:
        write_part(embedding_table([], np.empty((0, model.dim), np.float32), embedding_schema(model, dtype)),
                   out / part_name(0))
    for index, path in enumerate(files):
        os.replace(path, out / part_name(index))
    shutil.rmtree(staging, ignore_errors=True)
    return BulkSummary(texts=texts, input_rows=texts, parts=max(1, len(files)), seconds=seconds, complete=True)
