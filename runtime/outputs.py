"""Output paths: refused before long work starts, and write errors that name them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embedrt.errors import OutputPathError


def check_output_path(path: str | os.PathLike[str], *, folder: bool = False) -> Path:
    """Refuse an output that cannot be written, before any model is loaded or exported.

    Missing parent folders are fine (writers create them), so the nearest existing ancestor is what must
    be a folder we can create files in.

    Args:
        path: the file (or, with ``folder``, the folder) that will be written.
        folder: the output is a folder; an existing folder is then accepted (overwriting is the caller's call).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: an ancestor is a file, the output exists as the wrong kind, or nothing can be
            created where it would go; the message starts with the path.
    """
    out = Path(path)
    if out.is_dir() and not folder:
        raise OutputPathError(f"{out}: is a folder, not a file")
    if folder and out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{out}: {ancestor} is a file, not a folder")
    _probe_writable(out, ancestor)
    return out


def _probe_writable(out: Path, folder: Path) -> None:
    # os.access answers yes to root even where the kernel refuses (/proc, some mounts); only a write tells
    try:
        fd, probe = tempfile.mkstemp(prefix=".embedrt-write-probe-", dir=folder)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot create files in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def naming_write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into an ``OutputPathError`` that names it."""
    try:
        yield
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write: {exc.strerror or exc}") from exc
