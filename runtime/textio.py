"""Reading texts from .txt / .jsonl files, with errors that name the file and line."""

from __future__ import annotations

import json
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


def read_records(path: str | Path, field: str = "text") -> tuple[list[str], list[str]]:
    """Read ``(ids, texts)`` from a text file.

    ``.jsonl``: one JSON object per line; the text is ``field``, and BEIR-style records with a ``title``
    get ``title + " " + text`` (as BEIR and MTEB embed them); the id is ``_id`` or ``id`` or the line
    number. Any other suffix: one text per line (blank lines are texts too: nothing is dropped).

    Raises:
        InputFileError: the file is missing or unreadable, or a line is not a usable record (names file:line).
    """
    file = Path(path)
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{file}: cannot read: {exc}") from exc
    lines = content.splitlines()
    if file.suffix.lower() != ".jsonl":
        return [str(i) for i in range(len(lines))], lines
    ids, texts = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{file}:{number}: not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InputFileError(f"{file}:{number}: expected an object with a string field {field!r}")
        text = join_title(record.get("title"), record[field], field)
        ids.append(str(record.get("_id", record.get("id", number))))
        texts.append(text)
    return ids, texts
