"""Semantic textual similarity evaluation (STS Benchmark format): Spearman of cosine against gold scores."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from embedrt.ops import row_cosine
from embedrt.textio import InputFileError


@dataclasses.dataclass(frozen=True)
class StsData:
    """Sentence pairs with gold similarity scores."""

    first: list[str]
    second: list[str]
    scores: np.ndarray


def load_sts(path: str | Path) -> StsData:
    """Read an STS Benchmark file (tab-separated: genre, file, year, id, score, sentence1, sentence2[, ...]).

    A folder is read as ``sts-test.csv`` inside it. The sentences hold unbalanced quotes, so no quoting.

    Raises:
        InputFileError: the file is missing, or a line has fewer than 7 fields or a score that is not a
            finite number (names file:line).
    """
    file = Path(path)
    if file.is_dir():
        file = file / "sts-test.csv"
    first, second, scores = [], [], []
    try:
        with file.open(encoding="utf-8", newline="") as fh:
            for number, row in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if len(row) < 7:
                    raise InputFileError(f"{file}:{number}: expected 7 tab-separated fields, got {len(row)}")
                try:
                    score = float(row[4])
                except ValueError as exc:
                    raise InputFileError(f"{file}:{number}: score {row[4]!r} is not a number") from exc
                if not math.isfinite(score):  # NaN ranks above every score: a Spearman of it is no figure
                    raise InputFileError(f"{file}:{number}: score {row[4]!r} is not a finite number")
                scores.append(score)
                first.append(row[5])
                second.append(row[6])
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{file}: cannot read: {exc}") from exc
    return StsData(first, second, np.asarray(scores, dtype=np.float64))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties), as scipy.stats.spearmanr."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    # ties share the mean of their ranks
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def evaluate_sts(model: Any, data: StsData, batch_size: int = 32) -> dict[str, float]:
    """Spearman (in percent) of the cosine of each pair's embeddings against the gold scores."""
    a = model.encode(data.first, batch_size=batch_size)
    b = model.encode(data.second, batch_size=batch_size)
    return {"spearman": 100.0 * spearman(row_cosine(a, b), data.scores), "pairs": len(data.scores)}
