"""STS evaluation: Spearman against scipy's, the file format and its errors, and the real model's figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedrt.sts import load_sts, spearman
from embedrt.textio import InputFileError

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, 300).astype(float)  # many ties
    b = a + rng.normal(scale=2.0, size=300)
    b[:40] = np.round(b[:40])
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_load_sts_reads_seven_fields_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "sts.csv"
    good.write_text('g\tf\t2012\t1\t2.5\tA "quoted\tsentence two\textra\tcols\ng\tf\t2012\t2\t0\tx\ty\n')
    data = load_sts(good)
    assert data.first == ['A "quoted', "x"] and data.second == ["sentence two", "y"]
    assert data.scores.tolist() == [2.5, 0.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("g\tf\t2012\t1\t2.5\tonly six\n")
    with pytest.raises(InputFileError, match=r"bad.csv:1: expected 7"):
        load_sts(bad)
    bad.write_text("g\tf\t2012\t1\thigh\ta\tb\n")
    with pytest.raises(InputFileError, match=r"bad.csv:1: score 'high'"):
        load_sts(bad)
    with pytest.raises(InputFileError, match="cannot read"):
        load_sts(tmp_path / "missing.csv")


def test_real_stsb_has_the_official_pair_count() -> None:
    if not (STSB / "sts-test.csv").is_file():
        pytest.skip(f"STS-B not found at {STSB}")
    data = load_sts(STSB)
    assert len(data.scores) == 1379 and data.scores.min() >= 0 and data.scores.max() <= 5
