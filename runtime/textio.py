"""Reading texts from .txt / .jsonl files, with errors that name the file and line."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedrt.errors import EmbedrtError


class InputFileError(EmbedrtError):
    """An input file is missing or has a bad line."""


def join_title(title: object, text: str, field: str = "text") -> str:
    """The text BEIR and MTEB embed for a record: ``title + " " + text`` when the record has a title.

    Only the ``text`` field is joined with a title (another ``field`` is taken as it is).
    """
    if field == "text" and isinstance(title, str) and title:
        return f"{title} {text}".strip()
    return text


def read_package_records(package: str, name: str, field: str = "text") -> tuple[list[str], list[str]]:
    """``read_records`` for a data file shipped inside an installed package."""
    from importlib.resources import as_file, files

    with as_file(files(package).joinpath(name)) as path:
        return read_records(path, field)


def read_records(path: str | Path, field: str = "text", unique: bool = False,
                 check_ids: bool = False) -> tuple[list[str], list[str]]:
    """Read ``(ids, texts)`` from a text file.

    ``.csv``, ``.tsv``, ``.parquet``: rows as ``embedrt embed`` reads them (an ``_id`` column and ``field``).
    ``.json``: refused (one document, not texts).
    ``.jsonl``: one JSON object per line; the text is ``field``, and BEIR-style records with a ``title``
    get ``title + " " + text`` (as BEIR and MTEB embed them); the id is ``_id`` or ``id`` or the line
    number; blank lines are not records. Any other suffix: one text per line (blank lines are texts too:
    nothing is dropped). ``unique``: two records with the same id are an error. ``check_ids`` (where the ids
    are used: search prints them, eval matches them to qrels): a JSONL id that is not a string or an int
    (``1.0``, ``null``, ``true``), or is empty, is an error, as ``embedrt embed`` has it; else it is ``str()``.
    Lines end at ``\n``, ``\r\n`` or ``\r`` only (a U+2028 or a form feed inside a text is part of it); a
    UTF-8 byte order mark at the start is not part of the first line.

    Raises:
        InputFileError: the file is missing or unreadable, not UTF-8, or a line is not a usable record
            (names file:line), or (``unique``) two records have the same id.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv", ".parquet"):
        return _read_table_records(file, field, unique)
    if suffix == ".json":  # one JSON document, not a text per line: read as lines, it embedded its brackets
        raise InputFileError(f"{file}: a .json file is not read as texts; give one JSON object per line "
                             "(.jsonl), one text per line (.txt), or a .csv, .tsv or .parquet file")
    lines = read_lines(file)
    if suffix != ".jsonl":
        return [str(i) for i in range(len(lines))], lines
    ids, texts = [], []
    where: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip(" \t\r\n"):  # JSON's own whitespace: a line of U+00A0 or U+2028 is no JSON, and no blank
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{file}:{number}: not valid JSON: {exc.msg}") from exc
        except ValueError as exc:  # an integer of over 4,300 digits (sys.get_int_max_str_digits)
            raise InputFileError(f"{file}:{number}: not valid JSON here: {exc}") from exc
        except RecursionError:
            raise InputFileError(f"{file}:{number}: not valid JSON: nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InputFileError(f"{file}:{number}: expected an object with a string field {field!r}")
        if (twice := repeated_key(line, (field, "title", "_id", "id"))) is not None:
            raise InputFileError(f"{file}:{number}: the key {twice!r} more than once (which one was meant?)")
        text = join_title(record.get("title"), record[field], field)
        name = "_id" if "_id" in record else "id" if "id" in record else None
        if name is None:
            key = str(number)
        else:
            key = _checked_id(record[name], name, f"{file}:{number}") if check_ids else str(record[name])
        if unique and key in where:
            raise InputFileError(f"{file}:{number}: id {key!r} again (first on line {where[key]}); ids must be "
                                 "unique")
        where[key] = number
        ids.append(key)
        texts.append(text)
    return ids, texts


def _checked_id(rid: Any, name: str, where: str) -> str:
    """A JSONL record's id as ``embedrt embed`` takes it (a string, or an int as its decimal string), or
    InputFileError: ``str()`` of ``1.0``, ``null`` or ``true`` never matched a qrels id, and scored as a miss."""
    from embedrt.bulk import RawRow, check_row

    checked = check_row(RawRow(where, rid, ""), "text", name)
    if isinstance(checked, str):
        raise InputFileError(f"{where}: {checked}")
    return checked[0]


def _read_table_records(file: Path, field: str, unique: bool) -> tuple[list[str], list[str]]:
    """A CSV, TSV or Parquet file's ``(ids, texts)``, parsed as ``embedrt embed`` parses it (an ``_id`` column and
    ``field``; a title joined in front); a bad row is an error naming it."""
    from embedrt.bulk import check_rows, iter_rows, resolve_input

    if not file.is_file():
        raise InputFileError(f"{file}: input not found")
    _, fmt = resolve_input(file)
    ids, texts = [], []
    where: dict[str, str] = {}
    # a bad row raises BadRowError, an InputFileError
    for at, rid, text in check_rows(iter_rows(file, fmt, "_id", field), field, "_id"):
        if unique and rid in where:
            raise InputFileError(f"{at}: id {rid!r} again (first at {where[rid]}); ids must be unique")
        where[rid] = at
        ids.append(rid)
        texts.append(text)
    return ids, texts


BOM = b"\xef\xbb\xbf"


def byte_lines(fh: Any, bom: bool = True) -> Iterator[bytes]:
    """The lines of a binary file without their ends (``\n``, ``\r\n`` or a lone ``\r``), the first one
    without a UTF-8 byte order mark (``bom``: the file's start; a file of just a mark has no line)."""
    first = bom
    for chunk in fh:
        if first:
            first = False
            if chunk == BOM:
                continue
            chunk = chunk.removeprefix(BOM)
        for end in (b"\r\n", b"\n", b"\r"):
            if chunk.endswith(end):
                chunk = chunk[: -len(end)]
                break
        if b"\r" in chunk:
            yield from chunk.split(b"\r")
        else:
            yield chunk


@functools.lru_cache(maxsize=64)
def _spellings(name: str) -> frozenset[str]:
    """``name`` as JSON writes it as a key, escaped or not (``"\\u672c\\u6587"`` or ``"本文"``)."""
    return frozenset((json.dumps(name), json.dumps(name, ensure_ascii=False)))


def repeated_key(line: str, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that a JSON object line holds as a top-level key more than once, else None:
    json keeps the last one, silently (which one was meant?). Cheap where no name appears twice as text (a key
    spelt with escapes, ``"\\u0074ext"`` or ``"a\\/b"``, sends the line to the full check)."""
    escaped = "\\u" in line or "\\/" in line
    if not escaped and all(sum(line.count(spelling) for spelling in _spellings(name)) < 2 for name in names):
        return None
    keys: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal keys
        keys = [key for key, _ in items]  # the top-level object is decoded last
        return dict(items)

    json.loads(line, object_pairs_hook=pairs)
    return next((name for name in names if keys.count(name) > 1), None)


def not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    """The problem of a line that is not UTF-8: the byte and its column."""
    return f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"


def read_lines(path: Path) -> list[str]:
    """The file's lines (see ``read_records``), decoded as UTF-8; a bad byte is named by line and column."""
    lines = []
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(byte_lines(fh), start=1):
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise InputFileError(f"{path}:{number}: {not_utf8(raw, exc)}") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read: {exc}") from exc
    return lines
