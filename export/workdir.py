"""An export's work folder beside its output: locked while its export lives, swept once that export has died.

The lock is an exclusive ``flock`` (``msvcrt.locking`` on Windows) on a file inside the folder. The kernel
drops it when the process dies, however it dies (kill -9 included), and it cannot be confused by a reused
pid, so a folder whose lock can be taken belongs to an export that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from embedrt.outputs import naming_write_errors

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger("embedrt.export")
LOCK_NAME = ".embedrt-export.lock"
# a live export's folder has no lock file for the instant between mkdtemp and its lock; one that still has
# none after this long was left by an export that died in that instant, or by an embedrt that did not lock
UNLOCKED_GRACE_S = 60.0


def work_dir_prefix(target_dir: Path) -> str:
    """The name prefix of the work folders of exports into ``target_dir``."""
    return f".{target_dir.name}.tmp-"


@contextlib.contextmanager
def claim_work_dir(target_dir: Path) -> Iterator[Path]:
    """A fresh, locked work folder beside ``target_dir`` for the ``with`` block; removed when it ends.

    Leftovers of dead exports into the same ``target_dir`` are swept first (see ``sweep_stale``).

    Raises:
        OutputPathError: the folder cannot be created where ``target_dir`` would go (names ``target_dir``).
    """
    with naming_write_errors(target_dir):
        target_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target_dir)
    with naming_write_errors(target_dir):
        work = Path(tempfile.mkdtemp(prefix=work_dir_prefix(target_dir), dir=target_dir.parent))
    try:
        fd = _hold_lock(work)
        try:
            yield work
        finally:
            os.close(fd)  # before the removal: Windows cannot delete an open file
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sweep_stale(target_dir: Path) -> list[Path]:
    """Remove the work folders that dead exports into ``target_dir`` left beside it.

    A folder whose lock another process holds belongs to a running export and is left alone.

    Returns:
        The folders removed (each is also logged as a warning, with its size).
    """
    prefix = work_dir_prefix(target_dir)
    try:
        siblings = sorted(p for p in target_dir.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []
    except OSError as exc:  # a folder we may write in but not list: the export can still go ahead
        log.info("cannot look for leftover work folders in %s: %s", target_dir.parent, exc)
        return []
    return [p for p in siblings if p.is_dir() and not p.is_symlink() and _remove_if_dead(p)]


def _hold_lock(work: Path) -> int:
    """Lock ``work`` for this process; returns the descriptor to close when the export ends."""
    final = work / LOCK_NAME
    # POSIX: lock under another name, then rename into place, so a lock file that exists is held from its
    # first instant; Windows cannot rename an open file, but cannot delete one either, so no sweep removes it
    path = final.with_name(final.name + ".new") if fcntl is not None else final
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if not _try_lock(fd):
            log.info("cannot lock %s (the file system has no locks?); later exports will leave it alone", work)
        os.write(fd, f"{os.getpid()}\n".encode())
        if path != final:
            os.replace(path, final)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another process holds it or locks fail."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            return False  # no way to tell a live export from a dead one: treat every folder as live
    except OSError:  # held elsewhere (EWOULDBLOCK, EACCES), or no locks here (ENOLCK): either way, hands off
        return False
    return True


def _remove_if_dead(folder: Path) -> bool:
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        if time.time() - folder.stat().st_mtime < UNLOCKED_GRACE_S:
            log.info("leaving %s: it has no lock yet and may be an export that is starting", folder)
            return False
        return _remove(folder)
    except OSError as exc:
        log.info("leaving %s: cannot open its lock (%s)", folder, exc)
        return False
    try:
        if not _try_lock(fd):
            log.info("leaving %s: an export (pid %s) is still writing it", folder, _pid_of(folder))
            return False
    finally:
        # closing drops the lock again; a sweep racing this one may remove the folder too, which is harmless
        os.close(fd)
    return _remove(folder)


def _remove(folder: Path) -> bool:
    size = _size_of(folder)
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:  # another sweep got there first
        pass
    except OSError as exc:
        log.warning("cannot remove leftover temporary folder %s (%s): %s", folder, _human(size), exc)
        return False
    log.warning("removed leftover temporary folder %s (%s) from an export that did not finish", folder, _human(size))
    return True


def _size_of(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _human(size: float) -> str:
    for unit in ("bytes", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _pid_of(folder: Path) -> str:
    try:
        return (folder / LOCK_NAME).read_text().strip() or "unknown"
    except OSError:  # Windows: the locked byte cannot be read
        return "unknown"
