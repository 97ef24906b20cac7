"""Embed a whole corpus into a Parquet dataset: streamed, written in atomic parts, resumable after a kill.

The output folder holds ``part-NNNNNN.parquet`` files (columns ``id`` string and ``embedding``
fixed-size list of float32 or float16, the model's name and dim in the schema metadata under
``embedrt``), ``_embedrt_bulk.json`` (the job's identity and how far it got) and, with ``skip_bad``,
``_bad_rows.jsonl``. Names starting with ``_`` or ``.`` are skipped by Parquet dataset readers, so
``pyarrow.parquet.read_table(folder)`` reads the embeddings only.

Memory is bounded by one part (``part_rows`` rows of embeddings) plus one chunk of texts, except for
the duplicate-id check (:class:`IdSet`, 8 bytes per id).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedrt._enums import parse_enum
from embedrt._optional import require
from embedrt.errors import EmbedrtError, OutputPathError
from embedrt.manifest import MANIFEST_NAME, resolve_prompt, write_json_atomic
from embedrt.outputs import PROBE_PREFIX, naming_write_errors
from embedrt.providers import parse_device
from embedrt.textio import BOM, InputFileError, byte_lines, join_title, not_utf8, repeated_key
from embedrt.tokenize import check_count, has_surrogates

if TYPE_CHECKING:
    from embedrt.model import EmbeddingModel

STATE_NAME = "_embedrt_bulk.json"
BAD_ROWS_NAME = "_bad_rows.jsonl"
METADATA_KEY = b"embedrt"
STATE_FORMAT = "embedrt-bulk"
STATE_VERSION = 1
# texts tokenized and embedded together: the model's own planning window, so the padding savings are kept
CHUNK = 1024
# embeddings per part by default: 16 MiB of them (10,922 rows of 384 float32), a bounded part and RSS
PART_BYTES = 16 << 20
# with --skip-bad, a job whose first this many rows all lack the id field stops: a wrong --id-field
WRONG_FIELD_ROWS = 1000


class InputFormat(str, enum.Enum):
    """The formats ``embedrt embed`` reads."""

    JSONL = "jsonl"
    PARQUET = "parquet"
    CSV = "csv"
    TSV = "tsv"

    @classmethod
    def parse(cls, value: str) -> InputFormat:
        """Return the member named ``value``; the error lists the valid names."""
        return parse_enum(cls, value, "input format")


class EmbedDtype(str, enum.Enum):
    """The element type of the ``embedding`` column."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @classmethod
    def parse(cls, value: str) -> EmbedDtype:
        """Return the member named ``value``; the error lists the valid names."""
        return parse_enum(cls, value, "dtype")


class BadRowError(InputFileError):
    """A row of the input cannot be embedded; the message names the row (file:line or row number)."""


class ResumeError(EmbedrtError):
    """The output folder holds another job (other model, input or options), or is not an embedrt output."""


@dataclasses.dataclass(frozen=True)
class BulkOptions:
    """How ``embed_corpus`` reads, embeds and writes.

    Attributes:
        id_field: the column / JSON field holding each row's id (str, or int taken as its decimal string).
        field: the column / field holding the text; for ``text``, a non-empty ``title`` is joined in front
            as ``embedrt eval`` (BEIR, MTEB) does.
        dtype: element type of the ``embedding`` column.
        skip_bad: write bad rows to ``_bad_rows.jsonl`` and go on, instead of stopping at the first.
        part_rows: rows per Parquet part; default: ``PART_BYTES`` of embeddings.
        batch_size: most texts per inference call.
        max_tokens: most padded tokens per inference call (default: the device's budget).
        device: the device string the model was loaded with (the Ray path loads its actors on what it resolved
            to; the job's identity records ``model.device``, where it really ran).
        inference_precision: ``load``'s option of that name (the Ray path loads its actors with it); what the
            model really runs in, ``model.precision``, is part of the job's identity.
        show_progress: a progress bar on stderr (texts/s, tokens/s, ETA).
        prompt_name, prompt: as ``EmbeddingModel.encode``'s (default: the model's default prompt, if any); a
            non-empty prompt is part of the job's identity.
    """

    id_field: str = "_id"
    field: str = "text"
    dtype: EmbedDtype = EmbedDtype.FLOAT32
    skip_bad: bool = False
    part_rows: int | None = None
    batch_size: int = 32
    max_tokens: int | None = None
    device: str = "auto"
    show_progress: bool = False
    inference_precision: str | None = None
    prompt_name: str | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        check_count(self.batch_size, "batch_size")
        for name in ("prompt_name", "prompt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        for name in ("part_rows", "max_tokens"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)


@dataclasses.dataclass
class BulkSummary:
    """What a job did, cumulative over its runs (a resumed job counts the earlier runs too).

    Attributes:
        texts: rows embedded. tokens: their tokens (special tokens included, after truncation).
        truncated: texts cut at the model's max_seq_length. bad: rows written to the bad-rows file.
        input_rows: input rows consumed. parts: Parquet parts written. seconds: embedding time, all runs.
        resumed_texts: texts that earlier runs had already embedded when this run started.
        complete: the whole input is embedded.
    """

    texts: int = 0
    tokens: int = 0
    truncated: int = 0
    bad: int = 0
    input_rows: int = 0
    parts: int = 0
    seconds: float = 0.0
    resumed_texts: int = 0
    complete: bool = False

    def line(self) -> str:
        """One human-readable line."""
        rate = self.texts / self.seconds if self.seconds > 0 else 0.0
        resumed = f" ({self.resumed_texts} from an earlier run)" if self.resumed_texts else ""
        return (f"{self.texts} texts{resumed}, {self.tokens} tokens, {self.truncated} truncated, "
                f"{self.bad} bad rows, {self.parts} parts, {self.seconds:.1f}s ({rate:.1f} texts/s)")


# --------------------------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One input row before checking: where it is, its id and text values (``MISSING`` if absent)."""

    where: str
    id: Any
    text: Any
    title: Any = None
    problem: str | None = None  # the row could not even be parsed (bad JSON)


MISSING = object()


def resolve_input(path: str | os.PathLike[str]) -> tuple[Path, InputFormat]:
    """The file to read and its format: a BEIR folder means its ``corpus.jsonl``; else by suffix.

    Raises:
        InputFileError: the path is missing or its suffix is not one of .jsonl, .parquet, .csv, .tsv.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "corpus.jsonl"
    if not file.is_file():
        raise InputFileError(f"{file}: input not found (a .jsonl, .parquet, .csv or .tsv file, or a BEIR folder)")
    suffix = file.suffix.lower().lstrip(".")
    if suffix == "tab":
        suffix = "tsv"
    try:
        return file, InputFormat.parse(suffix)
    except ValueError as exc:
        raise InputFileError(f"{file}: {exc}") from exc


def count_rows(file: Path, fmt: InputFormat) -> int | None:
    """Rows in the input, for the progress bar's ETA: exact for Parquet, lines (not blank) for the others."""
    if fmt is InputFormat.PARQUET:
        return int(parquet_file(file).metadata.num_rows)
    count, last = 0, b"\n"
    with file.open("rb") as fh:
        while block := fh.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    count += last != b"\n"
    header = fmt in (InputFormat.CSV, InputFormat.TSV)
    return max(0, count - header)


def iter_rows(file: Path, fmt: InputFormat, id_field: str, field: str) -> Iterator[RawRow]:
    """Stream the rows of ``file``, one at a time, each with where it came from."""
    if fmt is InputFormat.JSONL:
        return _iter_jsonl(file, id_field, field)
    if fmt is InputFormat.PARQUET:
        return _iter_parquet(file, id_field, field)
    if fmt is InputFormat.TSV:
        return _iter_tsv(file, id_field, field)
    return _iter_csv(file, id_field, field)


def _iter_jsonl(file: Path, id_field: str, field: str) -> Iterator[RawRow]:
    return iter_jsonl_range(file, id_field, field)


def iter_jsonl_range(file: Path, id_field: str, field: str, start: int = 0, end: int | None = None,
                     first_line: int = 1) -> Iterator[RawRow]:
    """The rows of a JSONL file's bytes ``[start, end)``, whose first line is line ``first_line``.

    ``start`` is 0 or just after a ``\n`` (see ``jsonl_ranges``); only the file's start loses a byte order mark.
    """
    # bytes, decoded a line at a time: a bad byte is that line's problem (named, skippable), not the file's
    with _open_bytes(file) as fh:
        if start or end is not None:
            fh.seek(start)
            fh = io.BytesIO(fh.read(-1 if end is None else end - start))
        for number, raw in enumerate(byte_lines(fh, bom=start == 0), start=first_line):
            if not raw.strip(b" \t\r\n"):  # a blank line is no row (a trailing newline, an editor's last line)
                continue
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(where, MISSING, MISSING, problem=not_utf8(raw, exc))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow(where, MISSING, MISSING, problem=f"not valid JSON: {exc.msg}")
                continue
            except ValueError as exc:  # an integer of over 4,300 digits (sys.get_int_max_str_digits)
                yield RawRow(where, MISSING, MISSING, problem=f"not valid JSON here: {exc}")
                continue
            except RecursionError:
                yield RawRow(where, MISSING, MISSING, problem="not valid JSON: nested too deeply")
                continue
            if not isinstance(record, dict):
                yield RawRow(where, MISSING, MISSING, problem=f"not a JSON object but {type(record).__name__}")
                continue
            if (twice := repeated_key(line, (id_field, field, "title"))) is not None:
                yield RawRow(where, MISSING, MISSING, problem=f"the key {twice!r} more than once (which one "
                             "was meant?)")
                continue
            yield RawRow(where, record.get(id_field, MISSING), record.get(field, MISSING), record.get("title"))


def jsonl_ranges(file: Path, size: int = 32 << 20, block_size: int = 1 << 20) -> list[tuple[int, int, int]]:
    """``(start, end, first_line)`` of about ``size`` bytes each, cut just after a ``\n``, covering the file.

    Lines are counted as ``byte_lines`` yields them (``\n``, ``\r\n`` or a lone ``\r`` ends one), so each
    range's rows are named by their line in the whole file.
    """
    ranges: list[tuple[int, int, int]] = []
    start, line, position, lines, last = 0, 1, 0, 0, b""
    with _open_bytes(file) as fh:
        while block := fh.read(block_size):
            # a cut falls after a \n: never inside a \r\n; a \r\n across two blocks is counted once
            lines += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
            lines -= last == b"\r" and block[:1] == b"\n"
            position += len(block)
            last = block[-1:]
            if position - start >= size:
                cut = block.rfind(b"\n")
                if cut >= 0:
                    end = position - len(block) + cut + 1
                    tail = block[cut + 1:]
                    inside = lines - (tail.count(b"\n") + tail.count(b"\r") - tail.count(b"\r\n"))
                    ranges.append((start, end, line))
                    start, line, lines = end, line + inside, lines - inside
    if position > start or not ranges:
        ranges.append((start, position, line))
    return ranges


def _check_header(file: Path, header: list[str] | None, id_field: str, field: str) -> list[str]:
    """The header row of a CSV or TSV file, or InputFileError naming what it lacks."""
    if header is None:
        raise InputFileError(f"{file}: empty; a header row naming {id_field!r} and {field!r} comes first")
    if id_field not in header or field not in header:
        raise InputFileError(f"{file}:1: header {header} lacks {id_field!r} or {field!r}")
    twice = sorted({name for name in header if header.count(name) > 1} & {id_field, field, "title"})
    if twice:  # which of the columns is meant? (a dict of the row kept the last one, silently)
        raise InputFileError(f"{file}:1: the header names column {twice[0]!r} more than once")
    return header


def _row(where: str, header: list[str], values: list[str], id_field: str, field: str, tsv: bool) -> RawRow:
    """A CSV or TSV row's id, text and title by the header's names; a row of more fields than it is bad."""
    if len(values) > len(header):
        # the id is still known when its column comes before the text (and title) ones, where the extra
        # separator is: the bad-rows file then names it
        at = header.index(id_field)
        known = at < min(header.index(name) for name in (field, "title") if name in header)
        return RawRow(where, values[at] if known else MISSING, MISSING,
                      problem=f"{len(values)} fields, the header has {len(header)} (a "
                      f"{'tab' if tsv else 'comma'} in a text{'' if tsv else ' must be inside quotes'})")
    record = dict(zip(header, values))
    text = record.get(field)
    return RawRow(where, record.get(id_field), MISSING if text is None else text, record.get("title") or None)


def _iter_csv(file: Path, id_field: str, field: str) -> Iterator[RawRow]:
    """CSV rows as RFC 4180 reads them: a quote opens a field that may hold commas and newlines, and must
    close (an unclosed one stops the read, named by its line). A row with more fields than the header is bad;
    so is a row with text after a field's closing quote, unless its quotes do not pair up: then its quoted
    field may go on over the next lines, and where the next row starts cannot be known, so the read stops."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # passages can be longer than the 128 KiB default
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark; a bad byte becomes a lone surrogate
    # (surrogateescape), which a CSV cannot otherwise hold, and makes its row bad
    with _open_text(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        raw: list[str] = []  # the lines of the row being read, as they are in the file

        def lines() -> Iterator[str]:
            for text in fh:
                raw.append(text)
                yield text

        reader = csv.reader(lines(), strict=True)
        line = 1
        try:
            header = _check_header(file, next(reader, None), id_field, field)
            while True:
                line = reader.line_num + 1  # where the row starts (a quoted field may span lines)
                raw.clear()
                try:
                    values = next(reader, None)
                except csv.Error as exc:
                    if "unexpected end of data" in str(exc):  # a quote that never closes: the rest is one field
                        raise
                    text = "".join(raw)
                    if text.count('"') % 2:  # '1,"He said "hi, then"': the field may go on in the next lines
                        raise InputFileError(
                            f"{file}:{line}: not a valid CSV row: {exc}, and its quotes do not pair up, so its "
                            "quoted field may go on over the next lines and where the next row starts cannot be "
                            'told (a quote inside a quoted field is written "")') from None
                    # a text after a closing quote ('"Hello" he said'): this row is bad, the reader goes on
                    yield RawRow(f"{file}:{line}", _id_before_quotes(text, header, id_field), MISSING,
                                 problem=f"not a valid CSV row: {exc} (a field that opens a quote must end at its "
                                 'closing quote; a quote inside is "")')
                    continue
                if values is None:
                    return
                if not values:  # a blank line is no row
                    continue
                if any(has_surrogates(v) for v in values):
                    yield RawRow(f"{file}:{line}", MISSING, MISSING, problem="not UTF-8")
                    continue
                yield _row(f"{file}:{line}", header, values, id_field, field, tsv=False)
        except csv.Error as exc:
            raise InputFileError(f"{file}:{line}: not a valid CSV row: {exc} (a quote that opens a field must "
                                 "close it; every row after it was read as part of that field)") from None


def _id_before_quotes(text: str, header: list[str], id_field: str) -> Any:
    """The id of a CSV row that cannot be read, where its column comes before the first quote: the fields
    up to there are plain (so the bad-rows file names the row)."""
    plain = text[:text.find('"')].split(",")[:-1]
    at = header.index(id_field)
    return plain[at] if at < len(plain) and not has_surrogates(plain[at]) else MISSING


def _iter_tsv(file: Path, id_field: str, field: str) -> Iterator[RawRow]:
    """TSV rows, one a line (ended by ``\n`` or ``\r\n``), fields split at tabs, quotes as they are (the BEIR /
    MS MARCO convention: ``"Hello" he said`` is text). A lone ``\r`` is text, not a line end: a row is never
    cut in two, its first half embedded (the csv module's reading) and its second half a bad row."""
    with _open_bytes(file) as fh:
        first = fh.readline()
        if first.startswith(BOM):
            first = first[len(BOM):]
        if not first:
            _check_header(file, None, id_field, field)
        # a bad byte in a column name is kept (surrogateescape, as the CSV reader does): only the names of the
        # id, text and title columns are looked up, and a column of another name is not read
        header_line = first.decode("utf-8", "surrogateescape")
        header = _check_header(file, _strip_line_end(header_line).split("\t"), id_field, field)
        for number, raw in enumerate(fh, start=2):
            where = f"{file}:{number}"
            try:
                line = _strip_line_end(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield RawRow(where, MISSING, MISSING, problem=not_utf8(raw, exc))
                continue
            if line:  # a blank line is no row
                yield _row(where, header, line.split("\t"), id_field, field, tsv=True)


def _strip_line_end(line: str) -> str:
    return line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line


def _iter_parquet(file: Path, id_field: str, field: str) -> Iterator[RawRow]:
    source = parquet_file(file)
    columns = parquet_columns(source, file, id_field, field)
    number = 0
    for batch in source.iter_batches(batch_size=CHUNK, columns=columns):
        data = batch.to_pydict()
        titles = data.get("title", [None] * batch.num_rows)
        for rid, text, title in zip(data[id_field], data[field], titles):
            number += 1
            yield RawRow(f"{file}: row {number}", rid, text, title)  # a null text: "is NoneType", not "missing"


def _open_text(file: Path, newline: str | None = None, encoding: str = "utf-8", errors: str = "strict") -> Any:
    try:
        return file.open(encoding=encoding, newline=newline, errors=errors)
    except OSError as exc:
        raise InputFileError(f"{file}: cannot read: {exc.strerror or exc}") from exc


def _open_bytes(file: Path) -> Any:
    try:
        return file.open("rb")
    except OSError as exc:
        raise InputFileError(f"{file}: cannot read: {exc.strerror or exc}") from exc


def parquet_columns(source: Any, file: Path, id_field: str, field: str) -> list[str]:
    """The columns to read of a Parquet file: id, text, and ``title`` where it is joined; InputFileError
    naming a missing one."""
    names = source.schema_arrow.names
    for name in (id_field, field):
        if name not in names:
            raise InputFileError(f"{file}: no column {name!r} (columns: {', '.join(names)})")
    for name in (id_field, field, "title"):
        if names.count(name) > 1:  # pyarrow would read the last, silently (which one was meant?)
            raise InputFileError(f"{file}: the column {name!r} more than once")
    return [id_field, field] + (["title"] if field == "text" and "title" in names else [])


def parquet_file(file: Path) -> Any:
    """``pyarrow.parquet.ParquetFile`` of ``file``, or InputFileError naming it."""
    pq = require("pyarrow.parquet", "bulk")
    try:
        return pq.ParquetFile(file)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputFileError(f"{file}: not a readable Parquet file: {exc}") from exc


def check_row(row: RawRow, field: str, id_field: str) -> tuple[str, str] | str:
    """``(id, text)`` to embed, or the reason the row is bad (one short phrase)."""
    if row.problem is not None:
        return row.problem
    rid, text = row.id, row.text
    if rid is MISSING:
        return f"missing id field {id_field!r}"
    if rid is None:
        return f"id field {id_field!r} is null"
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f"id is {type(rid).__name__}, not a string"
    rid = str(rid)
    if not rid.strip():
        return "empty id"
    if has_surrogates(rid):  # a JSON escape of half a UTF-16 pair: Parquet cannot store it
        return "id is not valid Unicode (it holds a lone surrogate)"
    if text is MISSING:
        return f"missing text field {field!r}"
    if text is None:
        return f"text field {field!r} is null"
    if not isinstance(text, str):
        return f"text field {field!r} is {type(text).__name__}, not a string"
    return rid, join_title(row.title, text, field)


# ----------------------------------------------------------------------------------------- ids


class IdSet:
    """The ids seen so far, as 8-byte blake2b digests: ~8 bytes per id (800 MB for 100M ids).

    Recent digests sit in a Python set of at most ``pending_max`` (~70 bytes each), merged into one sorted
    uint64 array. Two different ids share a digest with probability ~n^2 / 2^65 (3e-4 at 100M ids); such
    a pair would be reported as a duplicate, never missed.
    """

    def __init__(self, pending_max: int = 1 << 20) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._pending: set[int] = set()
        self._pending_max = pending_max

    def __len__(self) -> int:
        return len(self._sorted) + len(self._pending)

    @staticmethod
    def digest(rid: str) -> int:
        """The 8-byte digest of an id, as an int."""
        raw = hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(raw, "little")

    def add(self, rid: str) -> bool:
        """Add ``rid``; False if it was already there."""
        d = self.digest(rid)
        if d in self._pending:
            return False
        pos = int(np.searchsorted(self._sorted, d))
        if pos < len(self._sorted) and int(self._sorted[pos]) == d:
            return False
        self._pending.add(d)
        if len(self._pending) >= self._pending_max:
            self._merge()
        return True

    def _merge(self) -> None:
        new = np.fromiter(self._pending, dtype=np.uint64, count=len(self._pending))
        merged = np.concatenate([self._sorted, new])
        merged.sort(kind="stable")  # timsort: two sorted runs merge in linear time
        self._sorted, self._pending = merged, set()


# ---------------------------------------------------------------------------------------- output


def embedding_schema(model: EmbeddingModel, dtype: EmbedDtype) -> Any:
    """The Arrow schema of the output: ``id`` string, ``embedding`` fixed-size list; metadata names the model."""
    pa = require("pyarrow", "bulk")
    value = pa.float16() if dtype is EmbedDtype.FLOAT16 else pa.float32()
    meta = {"model": model_name(model), "dim": model.dim, "dtype": dtype.value,
            "source": model.manifest.source, "similarity": model.manifest.similarity.value,
            "normalize": model.manifest.normalize, "max_seq_length": model.manifest.max_seq_length}
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(value, model.dim))],
                     metadata={METADATA_KEY: json.dumps(meta).encode()})


def model_name(model: EmbeddingModel) -> str:
    """The catalogue name of the model, else its source id."""
    source = model.manifest.source
    return str(source.get("catalogue") or source.get("id") or model.path.name)


def embedding_table(ids: list[str], embeddings: np.ndarray, schema: Any) -> Any:
    """A ``pyarrow.Table`` of ids and embeddings, in ``schema`` (flat values, no Python lists)."""
    pa = require("pyarrow", "bulk")
    value_type = schema.field("embedding").type.value_type
    # not value_type.to_pandas_dtype(): before pyarrow 26 it imports pandas, which embedrt[bulk] does not install
    flat = np.ascontiguousarray(embeddings, dtype=np.float16 if value_type == pa.float16() else np.float32)
    flat = flat.reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), embeddings.shape[1])
    return pa.Table.from_arrays([pa.array(ids, type=pa.string()), column], schema=schema)


def write_part(table: Any, path: Path) -> None:
    """Write ``table`` to ``path`` atomically: a dot-named temporary file, fsync, rename."""
    pq = require("pyarrow.parquet", "bulk")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a quota: name the part, leave nothing half-written
        tmp.unlink(missing_ok=True)
        raise OutputPathError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def part_name(index: int) -> str:
    """File name of the ``index``-th part."""
    return f"part-{index:06d}.parquet"


# ------------------------------------------------------------------------------------ job state


@dataclasses.dataclass
class JobState:
    """The job's identity and how far it got; ``_embedrt_bulk.json``, rewritten after every part."""

    identity: dict[str, Any]
    summary: BulkSummary
    bad_bytes: int = 0  # size of the bad-rows file after the last complete part

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, "job": self.identity,
                "progress": dataclasses.asdict(self.summary), "bad_bytes": self.bad_bytes}


def job_identity(model: EmbeddingModel, file: Path, fmt: InputFormat, options: BulkOptions,
                 part_rows: int) -> dict[str, Any]:
    """What a resumed run must share with the run that started the job: model, input and options.

    ``batch_size``, ``max_tokens`` and threads are not part of it: they change how texts are grouped
    into calls, not the embeddings (beyond fp32 rounding, see ``EmbeddingModel.encode``). Nor is
    ``skip_bad``: a job stopped at a bad row goes on past it when rerun with it (the rows before were good).
    """
    files = hashlib.sha256()
    for name, entry in sorted(model.manifest.files.items()):
        files.update(f"{name}:{entry.sha256}\n".encode())
    stat = file.stat()
    manifest = hashlib.sha256((model.path / MANIFEST_NAME).read_bytes()).hexdigest()
    identity: dict[str, Any] = {
        "model": {"name": model_name(model), "dim": model.dim, "files_sha256": files.hexdigest(),
                  "manifest_sha256": manifest},
        "input": {"path": path_text(file.resolve()), "format": fmt.value, "bytes": stat.st_size,
                  "mtime_ns": stat.st_mtime_ns},
        "options": {"id_field": options.id_field, "field": options.field, "dtype": options.dtype.value,
                    "part_rows": part_rows, "device": model.device, "precision": model.precision},
    }
    if fmt is InputFormat.TSV:  # rows are lines (\n or \r\n) since 2026-12-07; before, a lone \r ended one too
        identity["input"]["rows"] = "lines"
    # the text put before each row; recorded only when there is one, so jobs from before prompts still resume
    prompt = resolve_prompt(model.manifest, options.prompt_name, options.prompt)
    if prompt:
        identity["options"]["prompt"] = prompt
    return identity


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(old.keys() | new.keys()):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"]


def _never_recorded_now(device: str) -> bool:
    """Whether a job state holding ``device`` can only be an old one (``auto``, ``openvino``, ``cuda``): new
    states record ``model.device``, always in its canonical form (``openvino:CPU``, ``cuda:0``, ``cpu``)."""
    try:
        request = parse_device(device)
    except ValueError:
        return False
    return request.kind == "auto" or str(request) != device


def _open_output(out: Path, identity: dict[str, Any], legacy_precision: str | None = None,
                 legacy_device: str | None = None) -> JobState:
    """Start a fresh job in ``out``, or pick up the one there after checking it is the same job.

    ``legacy_precision``: what this model ran in before job states recorded ``options.precision``
    (2026-11-23), used for states without it, so that those jobs still resume. ``legacy_device``: the device
    string asked for now; job states before 2026-12-02 recorded that string (``openvino``, ``auto``) rather
    than the device it resolved to (``openvino:CPU``), so such a state resumes when the same string is asked.
    """
    state_path = out / STATE_NAME
    if not state_path.is_file():
        # a progress file killed while first written leaves only its temporary file, and a second run's
        # writability probe (check_output_path) may be there for a moment: the folder is still new
        if out.is_dir() and any(not p.name.startswith((f".{STATE_NAME}.", PROBE_PREFIX)) for p in out.iterdir()):
            raise ResumeError(f"{out}: not empty and holds no {STATE_NAME}; choose a new or empty folder")
        for stale in out.glob(f".{STATE_NAME}.*") if out.is_dir() else ():
            stale.unlink()
        out.mkdir(parents=True, exist_ok=True)
        state = JobState(identity, BulkSummary())
        _write_state(state_path, state)
        return state
    try:
        data = json.loads(state_path.read_text(encoding="utf-8"))
        state = JobState(data["job"], BulkSummary(**data["progress"]), int(data["bad_bytes"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{state_path}: unreadable progress file ({exc}); start in a new folder") from exc
    if _did_nothing(state):  # it stopped before its first part (a bad option, a bad first row): start over
        _clean_output(out, state)
        (out / BAD_ROWS_NAME).unlink(missing_ok=True)  # the bad rows of a run that recorded none
        state = JobState(identity, BulkSummary())
        _write_state(state_path, state)
        return state
    recorded = state.identity.get("model")
    if isinstance(recorded, dict) and "manifest_sha256" not in recorded:  # states before 2026-12-02
        recorded["manifest_sha256"] = identity["model"]["manifest_sha256"]
    _tsv_counted_alike(state, identity)
    options = state.identity.get("options")
    if isinstance(options, dict):  # states before 2026-12-07 recorded skip_bad, which no longer binds a job
        options.pop("skip_bad", None)
    if isinstance(options, dict) and "precision" not in options and legacy_precision is not None:
        options["precision"] = legacy_precision
    if (isinstance(options, dict) and legacy_device is not None and options.get("device") == legacy_device
            and _never_recorded_now(legacy_device)):
        options["device"] = identity["options"]["device"]
    diffs = _differences(state.identity, identity)
    if diffs:
        ran = options.get("device") if isinstance(options, dict) else None
        hint = f"; to resume on the device it ran on, pass --device {ran}" if any(
            d.startswith("options.device:") for d in diffs) and ran else ""
        raise ResumeError(f"{out} holds another job; refusing to resume with a different "
                          f"{'; '.join(diffs)} (use a new output folder, or the original model, input and options"
                          f"{hint})")
    _clean_output(out, state)
    return state


def _tsv_counted_alike(state: JobState, identity: dict[str, Any]) -> None:
    """Let a TSV job started before 2026-12-07 resume where its rows were counted as they are now.

    Its runs read a lone ``\r`` as the end of a row (Python's csv module); now it is text. The rows done
    are skipped by count, so where the file holds a lone ``\r`` the counts differ and a row would be lost
    unnoticed: that job is refused. Elsewhere the two readings give the same rows.
    """
    recorded, now = state.identity.get("input"), identity["input"]
    if not (isinstance(recorded, dict) and now.get("rows") == "lines" and "rows" not in recorded):
        return
    if _has_lone_cr(Path(now["path"])):
        raise ResumeError(f"{now['path']}: this TSV job was started by an embedrt that ended a row at a lone "
                          "\\r, which this file holds, so its rows were counted differently; start it again in a "
                          "new folder")
    recorded["rows"] = "lines"


def _has_lone_cr(file: Path) -> bool:
    """Whether ``file`` holds a ``\r`` that is not the start of a ``\r\n``."""
    with _open_bytes(file) as fh:
        last = b""
        while block := fh.read(1 << 20):
            data = last + block
            # a \r at the block's end waits for the next block's first byte
            body = data[:-1] if data.endswith(b"\r") else data
            if body.count(b"\r") != body.count(b"\r\n"):
                return True
            last = data[len(body):]
        return bool(last)


def _write_state(path: Path, state: JobState) -> None:
    """Write the job's progress file; a write error (a full disk) names it."""
    with naming_write_errors(path):
        write_json_atomic(path, state.to_json())


def check_rows(rows: Iterator[RawRow], field: str, id_field: str, note: str = "") -> Iterator[tuple[str, str, str]]:
    """``(where, id, text)`` of each row; the first bad one raises BadRowError naming it (``note`` appended)."""
    for row in rows:
        checked = check_row(row, field, id_field)
        if isinstance(checked, str):
            raise BadRowError(f"{row.where}: {checked}{note}")
        yield row.where, *checked


def _did_nothing(state: JobState) -> bool:
    """Whether a job state records no work: no part, no input row, no bad row kept."""
    summary = state.summary
    return not summary.complete and summary.parts == 0 and summary.input_rows == 0 and state.bad_bytes == 0


def _clean_output(out: Path, state: JobState) -> None:
    """Drop what a killed run left after its last complete part: temporary files, unrecorded parts, bad rows."""
    # a part's and the progress file's temporary files, left by a kill mid-write; a write probe left likewise
    for path in (*out.glob(".part-*.tmp"), *out.glob(f".{STATE_NAME}.*"), *out.glob(f"{PROBE_PREFIX}*")):
        path.unlink(missing_ok=True)
    for path in out.glob("part-*.parquet"):
        number = path.stem.split("-", 1)[1]
        # not a name this job writes (part-000000 (1).parquet, part-0.parquet): kept, it would add rows to the
        # dataset; deleted, a user's file would be lost
        if not (number.isascii() and number.isdigit()) or path.name != part_name(int(number)):
            raise ResumeError(f"{path}: not a part this job wrote, in its folder; move it away to resume")
        if int(number) >= state.summary.parts:  # renamed, but killed before the state said so
            path.unlink()
    for index in range(state.summary.parts):
        if not (out / part_name(index)).is_file():
            raise ResumeError(f"{out / part_name(index)}: part recorded as complete is missing; "
                              "the folder was changed, start in a new folder")
    bad = out / BAD_ROWS_NAME
    if state.summary.complete:  # nothing more is written: a bad-rows file moved away since is the user's
        return
    if bad.exists() or state.bad_bytes:
        if not bad.is_file() or bad.stat().st_size < state.bad_bytes:
            raise ResumeError(f"{bad}: shorter than recorded ({state.bad_bytes} bytes); start in a new folder")
        os.truncate(bad, state.bad_bytes)


def _known_ids(out: Path, parts: int) -> IdSet:
    """The ids of the complete parts, read back (ids only) so duplicates across runs are caught."""
    pq = require("pyarrow.parquet", "bulk")
    seen = IdSet()
    for index in range(parts):
        path = out / part_name(index)
        try:
            source = pq.ParquetFile(path)
            schema = source.schema_arrow
            if "id" not in schema.names:
                raise ValueError(f"no 'id' column (columns: {', '.join(schema.names)})")
            if str(schema.field("id").type) not in ("string", "large_string"):
                raise ValueError(f"its 'id' column holds {schema.field('id').type}, not strings")
            for batch in source.iter_batches(columns=["id"], batch_size=65536):
                for rid in batch.column(0).to_pylist():
                    seen.add(rid)
        except (OSError, ValueError, IndexError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ResumeError(f"{path}: a part this job recorded cannot be read back ({exc}); it was changed or "
                              "damaged since it was written: restore it, or start the job again in a new "
                              "folder") from exc
    return seen


# ------------------------------------------------------------------------------------------ the job


class _Job:
    """One run of a bulk job: the chunk -> part loop, with its counters and the bad-rows file."""

    def __init__(self, model: EmbeddingModel, out: Path, file: Path, options: BulkOptions, part_rows: int,
                 state: JobState, on_part: Callable[[BulkSummary], None] | None) -> None:
        self.model, self.out, self.file, self.options = model, out, file, options
        self.part_rows, self.state, self.on_part = part_rows, state, on_part
        self.summary = state.summary
        self.schema = embedding_schema(model, options.dtype)
        # grown as rows come, up to part_rows: sized up front, --part-rows 20000000 asked for 29 GiB at once
        self.buffer = np.empty((min(part_rows, CHUNK), model.dim), dtype=np.float32)
        self.ids: list[str] = []
        self.bad_file: Any = None
        self.first_bad: str | None = None
        self.bad_problems: set[str] = set()  # the first few kinds of bad row: a wrong field name is one kind
        self.started = time.perf_counter()
        self.seconds_before = self.summary.seconds
        self.run_texts = self.run_tokens = 0
        self.bar: Any = None

    def run(self, rows: Iterator[RawRow], seen: IdSet) -> None:
        texts: list[str] = []
        ids: list[str] = []
        position = self.summary.input_rows
        for raw in rows:
            position += 1
            checked = check_row(raw, self.options.field, self.options.id_field)
            if isinstance(checked, tuple) and not seen.add(checked[0]):
                checked = f"duplicate id {checked[0]!r}"
            if isinstance(checked, str):
                self._bad(raw, checked)
                if self.summary.bad == WRONG_FIELD_ROWS and self._all_bad_lack({"id"}):
                    raise BadRowError(self._nothing_good(f"the first {WRONG_FIELD_ROWS} rows all lack the id field "
                                                         f"{self.options.id_field!r}"))
                continue
            ids.append(checked[0])
            texts.append(checked[1])
            if len(texts) == CHUNK or len(self.ids) + len(texts) == self.part_rows:
                self._embed(ids, texts, position)
                ids, texts = [], []
            if len(self.ids) == self.part_rows:
                self._write_part(position)
        self._embed(ids, texts, position)
        if self.summary.texts + len(self.ids) == 0 and self.summary.bad:
            raise BadRowError(self._nothing_good(f"all {self.summary.bad} rows are bad"))
        self._write_part(position, last=True)

    def _all_bad_lack(self, kinds: set[str]) -> bool:
        """Whether no row has been embedded yet and every bad one so far lacks one of these fields ("id",
        "text"). The early stop asks for the id field only: a text field may be left out of rows whose text
        is null (Spark writes JSON so), an id field is not."""
        names = {"id": self.options.id_field, "text": self.options.field}
        return self.summary.texts + len(self.ids) == 0 and bool(self.bad_problems) and self.bad_problems <= {
            f"missing {kind} field {names[kind]!r}" for kind in kinds}

    def _nothing_good(self, what: str) -> str:
        """The error of a --skip-bad job that finds nothing to embed (most likely a wrong field name)."""
        fields = (f"check --id-field {self.options.id_field!r} and --field {self.options.field!r} against the "
                  "input; " if self._all_bad_lack({"id", "text"}) else "")
        return (f"{what} and none could be embedded (the first: {self.first_bad or 'in an earlier run'}); "
                f"--skip-bad goes on past bad rows, not past a whole input of them: {fields}every bad row is in "
                f"{self.out / BAD_ROWS_NAME}")

    def _embed(self, ids: list[str], texts: list[str], position: int) -> None:
        if texts:
            tokens = self.model.tokenize_batch(texts, prompt_name=self.options.prompt_name, prompt=self.options.prompt)
            filled = len(self.ids)
            if filled + len(texts) > len(self.buffer):
                grown = np.empty((min(self.part_rows, max(filled + len(texts), 2 * len(self.buffer))),
                                  self.buffer.shape[1]), dtype=np.float32)
                grown[:filled] = self.buffer[:filled]
                self.buffer = grown
            self.buffer[filled : filled + len(texts)] = self.model.encode_tokens(
                tokens.ids, batch_size=self.options.batch_size, max_tokens=self.options.max_tokens)
            self.ids += ids
            count = int(tokens.lengths.sum())
            self.summary.tokens += count
            self.summary.truncated += int(tokens.truncated.sum())
            self.run_texts += len(texts)
            self.run_tokens += count
        if self.bar is not None:
            self.bar.update(position - self.bar.n)
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rates = f"{self.run_texts / elapsed:.1f} texts/s, {self.run_tokens / elapsed:.0f} tokens/s"
            self.bar.set_postfix_str(rates, refresh=False)

    def _bad(self, raw: RawRow, problem: str) -> None:
        if not self.options.skip_bad:
            raise BadRowError(f"{raw.where}: {problem} (--skip-bad writes such rows to {BAD_ROWS_NAME} and goes on)")
        if self.bad_file is None:
            self.bad_file = (self.out / BAD_ROWS_NAME).open("a", encoding="utf-8")
        rid = raw.id if isinstance(raw.id, (str, int)) and not isinstance(raw.id, bool) else None
        record = {"row": raw.where, "id": rid, "problem": problem}
        if self.first_bad is None:
            self.first_bad = f"{raw.where}: {problem}"
        if len(self.bad_problems) < 3:
            self.bad_problems.add(problem)
        line = json.dumps(record, ensure_ascii=False)
        if has_surrogates(line):  # an id holding a lone surrogate: kept as its JSON escape
            line = json.dumps(record)
        self.bad_file.write(line + "\n")
        self.summary.bad += 1

    def _write_part(self, position: int, last: bool = False) -> None:
        # a job with no text to embed still writes one (empty) part, so that the dataset has its schema
        written = bool(self.ids) or (last and self.summary.parts == 0)
        if written:
            n = len(self.ids)
            table = embedding_table(self.ids, self.buffer[:n], self.schema)
            write_part(table, self.out / part_name(self.summary.parts))
            self.summary.parts += 1
            self.summary.texts += n
            self.ids = []
        if self.bad_file is not None:
            self.bad_file.flush()
            os.fsync(self.bad_file.fileno())
            self.state.bad_bytes = self.bad_file.tell()
        self.summary.input_rows = position
        self.summary.seconds = self.seconds_before + time.perf_counter() - self.started
        self.summary.complete = last
        _write_state(self.out / STATE_NAME, self.state)
        if self.on_part is not None and written:
            self.on_part(self.summary)

    def close(self) -> None:
        if self.bad_file is not None:
            self.bad_file.close()
        if self.bar is not None:
            self.bar.close()


def embed_corpus(
    model: EmbeddingModel,
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    options: BulkOptions | None = None,
    on_part: Callable[[BulkSummary], None] | None = None,
) -> BulkSummary:
    """Embed every row of a corpus file into a Parquet dataset, resuming a job the folder already holds.

    Rows are read one at a time, embedded ``CHUNK`` at a time and written ``part_rows`` at a time, each
    part atomically; after each part the progress file records how many input rows are done. A rerun
    after a kill drops what followed the last complete part and goes on from the next input row, so
    every id ends up in exactly one part.

    Args:
        model: the loaded model.
        input_path: a .jsonl, .parquet, .csv or .tsv file, or a BEIR folder (its ``corpus.jsonl``).
        output_dir: the dataset folder (created; an existing one must hold this same job, or be empty).
        options: see :class:`BulkOptions`.
        on_part: called with the running totals after every part (for logs without a progress bar).

    Returns:
        The job's totals over all its runs; ``complete`` is True.

    Raises:
        InputFileError: the input is missing, unreadable or lacks the id / text column.
        BadRowError: a bad row without ``skip_bad`` (the message names file:line or row number).
        ResumeError: the folder holds another job (the message names what differs), was tampered with, or
            another run is writing to it.
    """
    require("pyarrow", "bulk")  # before the output folder and its job record are made
    opts = options or BulkOptions()
    file, fmt = resolve_input(input_path)
    item = 2 if opts.dtype is EmbedDtype.FLOAT16 else 4
    part_rows = opts.part_rows or max(1, PART_BYTES // (model.dim * item))
    out = Path(output_dir)
    check_utf8_path(out)
    resolve_prompt(model.manifest, opts.prompt_name, opts.prompt)  # a bad prompt before the folder is made
    with exclusive(out):
        return _embed_corpus(model, file, fmt, out, opts, part_rows, on_part)


def check_utf8_path(out: Path) -> None:
    """Refuse an output path whose name is not UTF-8 (pyarrow, which writes the parts, cannot take it)."""
    try:
        os.fsencode(out.absolute()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OutputPathError(f"{path_text(out)}: the output path is not valid UTF-8 ({exc.reason} at byte "
                              f"{exc.start}); Parquet writing needs a UTF-8 path") from None


def path_text(path: Path) -> str:
    """``path`` as text that can be written as UTF-8: a byte that is not UTF-8 in its name becomes ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the output folder (made if missing), as every run of ``embedrt embed``, local
    or Ray, does: two runs writing one folder would interleave or overwrite each other's parts. Yields
    whether this call made the folder."""
    try:
        out.mkdir(parents=True)
        made = True
    except FileExistsError:
        if not out.is_dir():
            raise
        made = False
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield made
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResumeError(f"{out}: another run of embedrt embed is writing to this folder; wait for it "
                              "to end (or stop it), then rerun to resume") from None
        yield made
    finally:
        os.close(fd)


def _embed_corpus(model: EmbeddingModel, file: Path, fmt: InputFormat, out: Path, opts: BulkOptions,
                  part_rows: int, on_part: Callable[[BulkSummary], None] | None) -> BulkSummary:
    # before precision was recorded, an fp32 folder always ran fp32 (it may now run bf16 on AMX CPUs)
    legacy = "fp32" if model.precision == "bf16" and model.manifest.precision.value == "fp32" else model.precision
    state = _open_output(out, job_identity(model, file, fmt, opts, part_rows), legacy, opts.device)
    if state.summary.complete:
        return state.summary
    state.summary.resumed_texts = state.summary.texts
    seen = _known_ids(out, state.summary.parts)
    rows = iter_rows(file, fmt, opts.id_field, opts.field)
    for _ in range(state.summary.input_rows):  # rows done by earlier runs: read past, not checked again
        next(rows, None)
    job = _Job(model, out, file, opts, part_rows, state, on_part)
    if opts.show_progress:
        from tqdm.auto import tqdm

        job.bar = tqdm(total=count_rows(file, fmt), initial=state.summary.input_rows, unit="row", desc="embed",
                       smoothing=0.05)
    try:
        job.run(rows, seen)
    finally:
        job.close()
    return state.summary
