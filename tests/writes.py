"""Count the files a block of code writes below a folder: Python's audit events plus two native writers.

Every Python-level write raises an ``open`` audit event (``open``, ``os.open``, ``onnx.save``,
``shutil.copyfile``, most of ``save_pretrained``) and every rename an ``os.rename`` one (``os.replace``
too), so a temporary file renamed into place counts as one write of its final name. OpenVINO writes IR
files from C++ and ``tokenizers`` writes ``tokenizer.json`` from Rust, where no audit event is raised, so
``openvino.save_model`` and the transformers method that calls the Rust writer are wrapped instead. A file
that appears without being counted fails ``tests/test_export_writes.py``: a new native writer shows up.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ACTIVE: list[WriteLog] = []
_HOOKED = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class WriteLog:
    """Writes below ``root``, by path relative to it: how many times each file was written."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.counts: collections.Counter[str] = collections.Counter()

    def _key(self, path: Any) -> str | None:
        if isinstance(path, int):  # an open file descriptor: the file was counted when it was opened
            return None
        full = Path(os.fsdecode(path)).resolve()
        return full.relative_to(self.root).as_posix() if full.is_relative_to(self.root) else None

    def opened(self, path: Any, mode: Any, flags: Any) -> None:
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        key = self._key(path) if writing else None
        if key is not None:
            self.counts[key] += 1

    def renamed(self, src: Any, dst: Any) -> None:
        old, new = self._key(src), self._key(dst)
        if old is not None and new is not None and old in self.counts:  # a file moved into place, not a folder
            self.counts[new] += self.counts.pop(old)

    def under(self, folder: str) -> dict[str, int]:
        """The counts of the files below ``folder`` (relative to ``root``), keyed by their path inside it."""
        prefix = folder.rstrip("/") + "/"
        return {k[len(prefix):]: n for k, n in self.counts.items() if k.startswith(prefix)}


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _ACTIVE:
        return
    if event == "open":
        for log in _ACTIVE:
            log.opened(*args[:3])
    elif event == "os.rename":
        for log in _ACTIVE:
            log.renamed(args[0], args[1])


@contextlib.contextmanager
def recording(root: Path, monkeypatch: Any) -> Iterator[WriteLog]:
    """Record the writes below ``root`` during the block (``monkeypatch`` wraps ``openvino.save_model``)."""
    global _HOOKED
    if not _HOOKED:  # an audit hook cannot be removed; it does nothing while no log is active
        sys.addaudithook(_hook)
        _HOOKED = True
    log = WriteLog(root)
    import openvino

    real = openvino.save_model

    def save_model(model: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        for name in (path, Path(path).with_suffix(".bin")):
            key = log._key(name)
            if key is not None:
                log.counts[key] += 1
        real(model, path, *args, **kwargs)

    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    real_tokenizer = TokenizersBackend._save_pretrained

    def save_tokenizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        names = real_tokenizer(self, *args, **kwargs)
        key = log._key(names[-1])  # the tokenizer.json the Rust writer wrote
        if key is not None:
            log.counts[key] += 1
        return names

    monkeypatch.setattr(openvino, "save_model", save_model)
    monkeypatch.setattr(TokenizersBackend, "_save_pretrained", save_tokenizer)
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)
        monkeypatch.setattr(openvino, "save_model", real)
        monkeypatch.setattr(TokenizersBackend, "_save_pretrained", real_tokenizer)
