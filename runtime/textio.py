"""Reading texts from .txt / .jsonl files, with errors that name the file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def read_records(path: str | Path, field: str = "text", unique: bool = False) -> tuple[list[str], list[str]]:
    """Read ``(ids, texts)`` from a text file.

    ``.jsonl``: one JSON object per line; the text is ``field``, and BEIR-style records with a ``title``
    get ``title + " " + text`` (as BEIR and MTEB embed them); the id is ``_id`` or ``id`` or the line
    number; blank lines are not records. Any other suffix: one text per line (blank lines are texts too:
    nothing is dropped). ``unique``: two records with the same id are an error. Lines end at ``\n``,
    ``\r\n`` or ``\r`` only (a U+2028 or a form feed inside a text is part of it); a UTF-8 byte order mark
    at the start is not part of the first line.

    Raises:
        InputFileError: the file is missing or unreadable, not UTF-8, or a line is not a usable record
            (names file:line), or (``unique``) two records have the same id.
    """
    file = Path(path)
    lines = read_lines(file)
    if file.suffix.lower() != ".jsonl":
        return [str(i) for i in range(len(lines))], lines
    ids, texts = [], []
    where: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{file}:{number}: not valid JSON: {exc.msg}") from exc
        except RecursionError:
            raise InputFileError(f"{file}:{number}: not valid JSON: nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InputFileError(f"{file}:{number}: expected an object with a string field {field!r}")
        text = join_title(record.get("title"), record[field], field)
        key = str(record.get("_id", record.get("id", number)))
        if unique and key in where:
            raise InputFileError(f"{file}:{number}: id {key!r} again (first on line {where[key]}); ids must be "
                                 "unique")
        where[key] = number
        ids.append(key)
        texts.append(text)
    return ids, texts


_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_END_BYTES = re.compile(rb"\r\n|\r|\n")
BOM = b"\xef\xbb\xbf"


def read_lines(path: Path) -> list[str]:
    """The file's lines (see ``read_records``), decoded as UTF-8; a bad byte is named by line and column."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read: {exc}") from exc
    if raw.startswith(BOM):  # not part of the first line (columns are counted after it)
        raw = raw[len(BOM):]
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = len(_LINE_END_BYTES.findall(raw, 0, exc.start)) + 1
        column = exc.start - max(raw.rfind(b"\n", 0, exc.start), raw.rfind(b"\r", 0, exc.start))
        raise InputFileError(f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x} at column {column})") from None
    if not content:
        return []
    lines = _LINE_END.split(content)
    if lines[-1] == "":  # the last line's end is not another line
        lines.pop()
    return lines
