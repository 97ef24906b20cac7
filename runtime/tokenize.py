"""Tokenization with the ``tokenizers`` library, truncation from the manifest, and length-sorted batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np

from embedrt._optional import require
from embedrt.errors import ModelFolderError

TYPE_IDS = "token_type_ids"


def check_texts(texts: Any) -> list[str]:
    """Return ``texts`` as a list of str, or raise TypeError naming the first bad item's index.

    Lone UTF-16 surrogates (``"\\ud800"``, left by bad decoding or JSON escapes), which the tokenizer
    cannot take, become U+FFFD; a valid surrogate pair becomes the character it encodes.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of str, not a single str; wrap it in a list")
    # a dict would embed its keys and a set has no order to match rows to inputs: neither is a list of texts
    if isinstance(texts, (Mapping, AbstractSet)):
        raise TypeError(f"texts must be an ordered sequence of str (a list), not a {type(texts).__name__}")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        if not text.isascii() and _has_surrogates(text):
            items[i] = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return items


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_count(value: Any, name: str) -> int:
    """``value`` as a positive int, or TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Texts as the model sees them.

    Attributes:
        ids: each text's token ids (int32, special tokens included, truncated to ``max_seq_length``).
        truncated: per text, whether truncation cut tokens off.
    """

    ids: list[np.ndarray]
    truncated: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each text (int64)."""
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def check_token_ids(rows: Any, vocab_size: int, max_length: int) -> list[np.ndarray]:
    """Pre-tokenized inputs as int32 arrays, or TypeError / ValueError naming the first bad row.

    Each row must be a non-empty sequence of ints in ``[0, vocab_size)`` of at most ``max_length`` ids.
    """
    if isinstance(rows, (str, bytes, Mapping, AbstractSet)) or not isinstance(rows, Sequence):
        raise TypeError(f"token ids must be a list of lists of int, not a {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise TypeError(f"token ids [{i}] is {type(row).__name__}, not a list of int")
        arr = np.asarray(row)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"token ids [{i}] must be a flat list of int")
        if arr.size == 0:
            raise ValueError(f"token ids [{i}] is empty")
        if arr.size > max_length:
            raise ValueError(f"token ids [{i}] has {arr.size} ids; the model takes at most {max_length}")
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"token ids [{i}] holds an id outside the model's vocabulary [0, {vocab_size})")
        out.append(arr.astype(np.int32))
    return out


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
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.max_length = max_length
        self.prefix, self.suffix = self._special_template()

    def _special_template(self) -> tuple[list[int], list[int]]:
        """The special tokens the post-processor puts before and after a text's tokens ([CLS] / [SEP], <s> / </s>)."""
        probe = self._tok.encode("a", add_special_tokens=True)
        mask = probe.special_tokens_mask
        if all(mask):
            raise ModelFolderError("tokenizer.json: a probe text came out as special tokens only")
        first = mask.index(0)
        last = len(mask) - 1 - mask[::-1].index(0)
        return list(probe.ids[:first]), list(probe.ids[last + 1 :])

    def wrap_ids(self, rows: list[np.ndarray]) -> Tokenized:
        """Pre-tokenized text tokens as the model sees them: truncated, then the special tokens added.

        The same as the tokenizer does with a text: the content is cut to ``max_length`` less the special
        tokens, and the special tokens are added around what is left.
        """
        keep = self.max_length - len(self.prefix) - len(self.suffix)
        prefix = np.asarray(self.prefix, dtype=np.int32)
        suffix = np.asarray(self.suffix, dtype=np.int32)
        truncated = np.fromiter((len(r) > keep for r in rows), dtype=bool, count=len(rows))
        return Tokenized([np.concatenate([prefix, r[:keep], suffix]) for r in rows], truncated)

    def _encodings(self, texts: list[str]) -> list[Any]:
        if len(texts) == 1:
            # encode_batch wakes the tokenizers thread pool, whose spinning threads then take CPU from the
            # inference that follows: ~0.1 ms on an 18-token query with 2 cores
            return [self._tok.encode(texts[0], add_special_tokens=True)]
        return list(self._tok.encode_batch(texts, add_special_tokens=True))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated, special tokens included, not padded."""
        return [enc.ids for enc in self._encodings(texts)]

    def encode_compact(self, texts: list[str], chunk: int = 256) -> Tokenized:
        """``encode`` as int32 arrays with truncation flags, ``chunk`` texts at a time.

        A tokenizers Encoding keeps tokens, offsets and masks besides the ids (~70 bytes a token) and a
        list of ids ~36 bytes a token; an int32 array keeps 4. Tokenizing in chunks bounds the former.
        """
        ids: list[np.ndarray] = []
        truncated = np.zeros(len(texts), dtype=bool)
        for start in range(0, len(texts), chunk):
            for j, enc in enumerate(self._encodings(texts[start : start + chunk])):
                ids.append(np.array(enc.ids, dtype=np.int32))
                truncated[start + j] = bool(enc.overflowing)  # what truncation cut off
        return Tokenized(ids, truncated)

    def feeds(self, ids: Sequence[Sequence[int] | np.ndarray], pad_to: int) -> dict[str, np.ndarray]:
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

