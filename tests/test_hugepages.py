"""Huge pages for the memory a load allocates: range arithmetic, and the real move on this kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedrt import hugepages
from embedrt.hugepages import HUGE_PAGE

MB = 1 << 20


def test_subtract_keeps_only_what_is_new() -> None:
    before = [(10, 20), (30, 40)]
    after = [(0, 25), (30, 40), (40, 50), (60, 70)]  # grew both ways, unchanged, adjacent new, new
    assert hugepages.subtract(after, before) == [(0, 10), (20, 25), (40, 50), (60, 70)]
    assert hugepages.subtract(before, before) == []
    assert hugepages.subtract(after, []) == after


def test_huge_aligned_shrinks_to_whole_huge_pages_and_drops_small() -> None:
    ranges = [(HUGE_PAGE + 1, 5 * HUGE_PAGE + 7), (0, 3 * HUGE_PAGE), (8 * HUGE_PAGE, 9 * HUGE_PAGE)]
    assert hugepages.huge_aligned(ranges) == [(2 * HUGE_PAGE, 5 * HUGE_PAGE), (0, 3 * HUGE_PAGE)]
    assert hugepages.huge_aligned(ranges, min_size=4 * HUGE_PAGE) == []


def test_anonymous_ranges_skip_files_stacks_and_read_only(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "00400000-00500000 r-xp 00000000 08:01 123 /usr/bin/python3\n"
        "00600000-00800000 rw-p 00000000 00:00 0 [heap]\n"
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n"
        "7f0000400000-7f0000600000 r--p 00000000 00:00 0 \n"
        "7f0000600000-7f0000800000 rw-s 00000000 00:05 9 /dev/zero (deleted)\n"
        "7f0000800000-7f0000a00000 rw-p 00000000 08:01 77 /data/model.bin\n"
        "7f0000a00000-7f0000c00000 rw-p 00000000 00:00 0 [anon: glibc: malloc arena]\n"
        "7ffd00000000-7ffd00200000 rw-p 00000000 00:00 0 [stack]\n"
    )
    assert hugepages.anonymous_ranges(maps) == [
        (0x600000, 0x800000), (0x7F0000000000, 0x7F0000400000), (0x7F0000A00000, 0x7F0000C00000)]


@pytest.mark.parametrize(("text", "mode"), [("always [madvise] never\n", "madvise"),
                                             ("[always] madvise never\n", "always"), ("garbage", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path: Path, text: str, mode: str | None) -> None:
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages.thp_mode(path) == mode
    assert hugepages.thp_mode(tmp_path / "missing") is None


def _huge_bytes_in(ranges: list[tuple[int, int]]) -> int:
    """AnonHugePages of this process's mappings inside ``ranges``."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = any(start < b and a < end for a, b in ranges)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def _kernel_can_collapse() -> bool:
    """Linux >= 6.1 (MADV_COLLAPSE) with transparent huge pages in madvise mode."""
    release = os.uname().release.split("-")[0].split(".")
    version = tuple(int(x) for x in release[:2] if x.isdigit())
    return hugepages.thp_mode() == "madvise" and version >= (6, 1)


_MOVE_PROBE = """
import sys
from pathlib import Path
import numpy as np
import embedrt
sys.path.insert(0, sys.argv[2])
from test_hugepages import MB, _huge_bytes_in

model = embedrt.load(sys.argv[1], device="cpu", threads=1)
move = model.huge_pages
assert move is not None and move.wait(timeout=60), "no move started"
size = sum(b - a for a, b in move.ranges)
assert size >= 40 * MB, size  # all-MiniLM-L6-v2 holds 90 MB of fp32 weights
assert move.collapsed >= size // 2, (move.collapsed, size)
assert _huge_bytes_in(move.ranges) >= size // 2
text = ["huge pages change where the weights live, not what they are"]
before = model.encode(text)
plain = embedrt.load(sys.argv[1], device="cpu", threads=1, huge_pages=False)
assert plain.huge_pages is None
np.testing.assert_array_equal(before, plain.encode(text))
"""


@pytest.mark.skipif(not _kernel_can_collapse(), reason="needs Linux >= 6.1, transparent huge pages in madvise mode")
def test_load_moves_the_model_memory_into_huge_pages(minilm_dir: Path) -> None:
    # a fresh process: in a long-lived one (this test run) malloc may serve the load from memory an earlier
    # test freed, so the load maps nothing new and there is nothing to move
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _MOVE_PROBE, str(minilm_dir), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_no_move_where_the_host_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in ("always", "never", None):
        monkeypatch.setattr(hugepages, "thp_mode", lambda mode=mode: mode)
        assert hugepages.snapshot() is None
    assert hugepages.collapse_new(None) is None


def test_a_range_that_cannot_collapse_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    first, second = (0, 4 * HUGE_PAGE), (8 * HUGE_PAGE, 12 * HUGE_PAGE)

    def fake_madvise(self, start: int, length: int, advice: int) -> int:  # type: ignore[no-untyped-def]
        return errno.EINVAL if advice == hugepages.MADV_COLLAPSE and start < second[0] else 0

    monkeypatch.setattr(hugepages.Collapse, "_madvise", fake_madvise)
    move = hugepages.Collapse([first, second])
    assert move.wait(timeout=10)
    assert move.collapsed == second[1] - second[0]
