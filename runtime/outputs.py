"""Output paths: refused before long work starts, and write errors that name them."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from embedrt.errors import OutputPathError
from embedrt.manifest import MANIFEST_NAME

# the name of the file check_output_path creates (and removes) to learn whether a folder is writable
PROBE_PREFIX = ".embedrt-write-probe-"


def check_output_path(path: str | os.PathLike[str], *, folder: bool = False,
                      inputs: Iterable[str | os.PathLike[str] | None] = (),
                      model: str | os.PathLike[str] | None = None, writes_inside: bool = False) -> Path:
    """Refuse an output that cannot be written, before any model is loaded or exported.

    Missing parent folders are fine (writers create them), so the nearest existing ancestor is what must
    be a folder we can create files in.

    Args:
        path: the file (or, with ``folder``, the folder) that will be written.
        folder: the output is a folder; an existing folder is then accepted (overwriting is the caller's call).
        inputs: files or folders the command reads; the output may not be one of them, nor a folder holding one.
        model: the model folder the command loads; the output may not be in it (``-o MODEL/model.onnx``
            replaced the graph, and ``--json MODEL/embedrt.json`` the manifest), nor hold it.
        writes_inside: the folder's files are written inside it (a bulk job), not as a sibling renamed into
            place (an export): an existing folder then needs to be writable itself, not its parent.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: an ancestor is a file, the output exists as the wrong kind, it would replace an
            input, or nothing can be created where it would go; the message starts with the path.
    """
    out = Path(path)
    check_not_input(out, [*inputs, model])
    if model is not None and Path(model).is_dir():
        folder_real = Path(os.path.realpath(model))
        if folder_real in Path(os.path.realpath(out)).parents:
            raise OutputPathError(f"{out}: is inside the model folder {model}; writing there could replace the "
                                  "model's files, choose another output")
    if out.is_dir() and not folder:
        raise OutputPathError(f"{out}: is a folder, not a file")
    if folder and out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    ancestor = out if folder and writes_inside and out.is_dir() else out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{out}: {ancestor} is a file, not a folder")
    _probe_writable(out, ancestor)
    return out


def check_not_input(out: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse an output that is one of the inputs (by path, link or hard link) or a folder holding one:
    writing it would replace what the command reads (``encode -i a.jsonl -o a.jsonl``, ``export SRC -o SRC
    --overwrite``)."""
    real = Path(os.path.realpath(out))
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        if not source.exists():
            continue
        same = source == real or (real.exists() and os.path.samefile(real, source))
        if same or real in source.parents:
            what = "is the input" if same else "is a folder holding the input"
            raise OutputPathError(f"{out}: {what} {given}; writing it would replace the input, choose another "
                                  "output")


def check_replaceable(out: Path, source: str | os.PathLike[str] | None) -> None:
    """Refuse to replace an existing output folder that lies inside the ``source`` folder (``--overwrite``
    would delete part of it), that holds a file a link in ``source`` points to, that holds the current
    directory (it cannot be renamed away), or that is not empty and not a model folder (no ``embedrt.json``)."""
    if not out.exists():
        return
    real = Path(os.path.realpath(out))
    if source is not None and Path(source).is_dir() and Path(os.path.realpath(source)) in real.parents:
        raise OutputPathError(f"{out}: is inside the input {source}; replacing it would delete part of the "
                              "input, choose another output")
    if source is not None and Path(source).is_dir():
        # the input's files may be links into the output (the Hugging Face cache links snapshots to blobs/)
        for root, _, names in os.walk(source):
            for name in names:
                target = Path(os.path.realpath(Path(root) / name))
                if real in target.parents:
                    raise OutputPathError(f"{out}: holds {target}, which the input's {Path(root) / name} links "
                                          "to; replacing it would delete the input's file, choose another output")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputPathError(f"{out}: is the current folder or holds it, which cannot be replaced; choose "
                              "another output")
    # what --overwrite replaces is a model folder (an earlier export): a typo must not delete a home folder
    if out.is_dir() and not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
        raise OutputPathError(f"{out}: holds files but no embedrt.json, so it is not an embedrt model folder, the "
                              "only kind --overwrite replaces; choose another output, or empty it first")


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in its folder, fsynced and renamed over it: a reader sees the
    old file or the new one, never half of one, and an error or a kill leaves the old file as it was.

    The new file gets an existing file's permissions, else the umask's (as ``open`` would give it; a
    temporary file is private). A symbolic link is followed: its target is replaced and the link kept. A
    path that exists and is not a regular file (a FIFO, ``/dev/stdout``) is written in place.
    """
    given = Path(path)
    try:
        kind = os.stat(given).st_mode  # follows links; works on /dev/stdout bound to a pipe
    except FileNotFoundError:
        kind = None
    if kind is not None and not stat.S_ISREG(kind):  # a FIFO, a terminal, /dev/stdout: written in place
        with open(given, mode, encoding=encoding) as fh:
            yield fh
        return
    # a regular file through a link: its target is replaced; a dangling link is replaced itself
    target = Path(os.path.realpath(given)) if kind is not None else given
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _probe_writable(out: Path, folder: Path) -> None:
    # os.access answers yes to root even where the kernel refuses (/proc, some mounts); only a write tells
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot create files in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # a bulk job cleaning its folder may have removed it already
        os.unlink(probe)


@contextlib.contextmanager
def naming_write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into an ``OutputPathError`` that names it."""
    try:
        yield
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write: {exc.strerror or exc}") from exc
