"""Tokenization with the ``tokenizers`` library, truncation from the manifest, and length-sorted batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedrt._optional import require
from embedrt.errors import ModelFolderError

TYPE_IDS = "token_type_ids"


def check_texts(texts: Any) -> list[str]:
    """Return ``texts`` as a list of str, or raise TypeError naming the first bad item's index."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of str, not a single str; wrap it in a list")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return list(texts)


class TextTokenizer:
    """Turns texts into padded int64 feeds for the graph's inputs."""

    def __init__(self, path: Path, max_length: int, pad_id: int, input_names: Sequence[str]) -> None:
        tokenizers = require("tokenizers", "runtime")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
            raise ModelFolderError(f"{path}: cannot read tokenizer: {exc}") from exc
        # the manifest's max_seq_length wins over whatever tokenizer.json carries (all-MiniLM-L6-v2's
        # says 128 and pads to 128, its checkpoint says 256); padding is done per batch below
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.pad_id = pad_id
        self.input_names = tuple(input_names)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated, special tokens included, not padded."""
        if len(texts) == 1:
            # encode_batch wakes the tokenizers thread pool, whose spinning threads then take CPU from the
            # inference that follows: ~0.1 ms on an 18-token query with 2 cores
            return [self._tok.encode(texts[0], add_special_tokens=True).ids]
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=True)]

    def feeds(self, ids: Sequence[Sequence[int]], pad_to: int) -> dict[str, np.ndarray]:
        """Right-padded int64 feeds of shape ``[len(ids), pad_to]`` for the graph's inputs."""
        batch = np.full((len(ids), pad_to), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), pad_to), dtype=np.int64)
        for row, seq in enumerate(ids):
            batch[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": batch, "attention_mask": mask}
        if TYPE_IDS in self.input_names:
            feeds[TYPE_IDS] = np.zeros_like(batch)  # one segment: type 0 everywhere, as sentence-transformers
        return feeds

