"""Tokenization with the ``tokenizers`` library, truncation from the manifest, and length-sorted batches."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np

from embedrt._optional import require
from embedrt.errors import ModelFolderError
from embedrt.manifest import MANIFEST_NAME, TOKENIZER_CONFIG_NAME

TYPE_IDS = "token_type_ids"
# a single text up to this many characters is tokenized with ``encode``, which holds the GIL (~30 us here)
SHORT_TEXT = 2048
# texts longer than this many characters per token of max_length are first tokenized cut short (see _cut)
CUT_CHARS_PER_TOKEN = 64
# the normalizers and pre-tokenizers under which a text's tokens up to a whitespace character do not depend
# on what follows it: per-character normalization, splitting at whitespace
_LOCAL_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents",
                                "Strip", "Prepend"})
_SPLITTING_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation",
                                       "Digits", "ByteLevel", "Metaspace"})
# a cut point: a plain space (every such pre-tokenizer splits there; a tab or a newline is no split point of
# Metaspace) after a character that is not whitespace
_AFTER_NON_SPACE = re.compile(r"(?<=\S) ")
# where spaces are tokens (byte-level BPE, Metaspace) and the normalizer deletes characters (NUL under
# clean_text, a combining mark under StripAccents), a space after a deleted character could leave the cut
# text ending in spaces merged otherwise than in the whole text: there, only a space after a letter or
# digit, which every such normalizer keeps
_AFTER_WORD = re.compile(r"(?<=[^\W_]) ")
_DELETING_NORMALIZERS = frozenset({"BertNormalizer", "StripAccents"})
_SPACE_TOKEN_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace"})
# a cut text that did not fill max_length is cut again this many times further on, before the whole text
CUT_GROWTH = 16


def check_texts(texts: Any) -> list[str]:
    """Return ``texts`` as a list of str, or raise TypeError naming the first bad item's index.

    Lone UTF-16 surrogates (``"\\ud800"``, left by bad decoding or JSON escapes), which the tokenizer
    cannot take, become U+FFFD; a valid surrogate pair becomes the character it encodes.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, not a single str; wrap it in a list")
    if isinstance(texts, (bytes, bytearray, memoryview)):  # iterated, they are ints
        raise TypeError(f"texts must be a sequence of str, not {type(texts).__name__}; decode it and wrap it in "
                        "a list")
    # a dict would embed its keys and a set has no order to match rows to inputs: neither is a list of texts
    if isinstance(texts, (Mapping, AbstractSet)):
        raise TypeError(f"texts must be an ordered sequence of str (a list), not a {type(texts).__name__}")
    try:
        items = list(texts)
    except TypeError:  # None, a number: "'NoneType' object is not iterable" named neither texts nor what it was
        raise TypeError(f"texts must be a sequence of str (a list), not {type(texts).__name__}") from None
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        if not text.isascii() and has_surrogates(text):
            items[i] = repaired(text)
    return items


def repaired(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate made U+FFFD (a valid pair becomes its character)."""
    if text.isascii() or not has_surrogates(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def has_surrogates(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (it cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# a count past this is no bound (no input has 2^53 texts or tokens); kept exact in float64, and within int64
# (batch_size=2**63 raised OverflowError, max_tokens=10**20 wrapped negative in the planner)
UNBOUNDED = 2**53


def check_count(value: Any, name: str) -> int:
    """``value`` as a positive int (at most ``UNBOUNDED``, which any larger one means), or TypeError /
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return min(int(value), UNBOUNDED)


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


def check_token_ids(rows: Any, vocab_size: int, max_length: int, allow_empty: bool = False) -> list[np.ndarray]:
    """Pre-tokenized inputs as int32 arrays, or TypeError / ValueError naming the first bad row.

    Each row must be a sequence of ints in ``[0, vocab_size)`` of at most ``max_length`` ids, and not empty
    unless ``allow_empty`` (a text's ids without special tokens: the empty text's are empty).
    """
    if isinstance(rows, (str, bytes, Mapping, AbstractSet)) or not isinstance(rows, Sequence):
        raise TypeError(f"token ids must be a list of lists of int, not a {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise TypeError(f"token ids [{i}] is {type(row).__name__}, not a list of int")
        arr = np.asarray(row)
        if arr.ndim == 1 and arr.size and arr.dtype.kind not in "iu" and all(type(x) is int for x in row):
            # Python ints numpy could not hold as int64 (past 64 bits: object; 2**63 with others: float64)
            raise ValueError(f"token ids [{i}] holds an id outside the model's vocabulary [0, {vocab_size})")
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"token ids [{i}] must be a flat list of int")
        if not isinstance(row, np.ndarray) and any(isinstance(x, (bool, np.bool_)) for x in row):
            # numpy takes [True, 5] as int64 [1, 5]; a bool is no token id (the server refuses it too)
            raise TypeError(f"token ids [{i}] holds a bool, not an int")
        if arr.size == 0:
            if not allow_empty:
                raise ValueError(f"token ids [{i}] is empty")
            out.append(np.empty(0, dtype=np.int32))
            continue
        if arr.size > max_length:
            raise ValueError(f"token ids [{i}] has {arr.size} ids; the model takes at most {max_length}")
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"token ids [{i}] holds an id outside the model's vocabulary [0, {vocab_size})")
        out.append(arr.astype(np.int32))
    return out


def _split_special_tokens(config: Path) -> bool:
    if not config.is_file():
        return False
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("split_special_tokens", False)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelFolderError(f"{config}: cannot read: {exc}") from exc
    if not isinstance(value, bool):
        raise ModelFolderError(f"{config}: split_special_tokens must be true or false, got {value!r}")
    return value


class TextTokenizer:
    """Turns texts into padded int64 feeds for the graph's inputs."""

    def __init__(self, path: Path, max_length: int, pad_id: int, input_names: Sequence[str],
                 split_special_tokens: bool | None = None) -> None:
        """``split_special_tokens``: the manifest's (a tokenizer_config.json beside ``path`` must agree);
        None: the tokenizer_config.json's, False without one."""
        tokenizers = require("tokenizers", "runtime")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a corrupt file
            raise ModelFolderError(f"{path}: cannot read tokenizer: {exc}") from exc
        # the manifest's max_seq_length wins over whatever tokenizer.json carries (all-MiniLM-L6-v2's
        # says 128 and pads to 128, its checkpoint says 256); padding is done per batch below
        self._tok.no_padding()
        self._tok.no_truncation()  # the probe of the special tokens must not be cut
        # transformers' split_special_tokens (tokenizer_config.json, not kept in tokenizer.json): "[SEP]" in a
        # text is tokenized as the text it is, not as the special token
        config = path.parent / TOKENIZER_CONFIG_NAME
        in_config = _split_special_tokens(config)
        if split_special_tokens is not None and config.is_file() and in_config != split_special_tokens:
            # which one the folder was checked with, the export's parity run knows; a load must not guess
            raise ModelFolderError(f"{config}: split_special_tokens is {str(in_config).lower()}, but the "
                                   f"manifest's field 'split_special_tokens' is {str(split_special_tokens).lower()}; "
                                   "the folder was changed after export (re-export it)")
        self._tok.encode_special_tokens = in_config if split_special_tokens is None else split_special_tokens
        self.prefix, self.suffix = self._special_template()
        if max_length < len(self.prefix) + len(self.suffix) + 1:
            raise ModelFolderError(f"{path.parent / MANIFEST_NAME}: field 'max_seq_length' is {max_length}, which "
                                   f"leaves no room for a token beside the {len(self.prefix) + len(self.suffix)} "
                                   f"special tokens {path.name} adds")
        self._tok.enable_truncation(max_length=max_length)
        self.pad_id = pad_id
        self.input_names = tuple(input_names)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.max_length = max_length
        # None: every text is tokenized whole
        self._cut_point = _cut_point(self._tok)
        self.cut_at = max(SHORT_TEXT, CUT_CHARS_PER_TOKEN * max_length) if self._cut_point else None

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
        cut = self._cut(texts)
        todo = [text[: cut[i]] if i in cut else text for i, text in enumerate(texts)] if cut else texts
        if len(todo) == 1 and len(todo[0]) <= SHORT_TEXT:
            # encode_batch wakes the tokenizers thread pool, whose spinning threads then take CPU from the
            # inference that follows: ~0.1 ms on an 18-token query with 2 cores
            encodings = [self._tok.encode(todo[0], add_special_tokens=True)]
        else:
            # encode holds the GIL throughout (a 1 MB text: ~1.5 s in which no other Python thread runs, a
            # server's event loop included); encode_batch releases it
            encodings = list(self._tok.encode_batch(todo, add_special_tokens=True))
        for i in cut:  # a cut text that did not fill max_length (spaces, dropped characters): cut further on
            if not encodings[i].overflowing:
                encodings[i] = self._encode_further(texts[i], cut[i])
        return encodings

    def _encode_further(self, text: str, end: int) -> Any:
        """The tokens of ``text``, cut ``CUT_GROWTH`` times further on than ``end`` as long as that fills
        max_length, else whole (``encode_batch``, which releases the GIL)."""
        assert self._cut_point is not None
        while True:
            found = self._cut_point.search(text, end * CUT_GROWTH)
            if found is None:
                return self._tok.encode_batch([text], add_special_tokens=True)[0]
            end = found.start()
            encoding = self._tok.encode_batch([text[:end]], add_special_tokens=True)[0]
            if encoding.overflowing:
                return encoding

    def _cut(self, texts: list[str]) -> dict[int, int]:
        """Where to cut each text longer than ``cut_at`` characters: at the first space after it.

        Tokenizing 16 MB for 256 tokens takes ~25 s; the cut keeps the tokens exact. The tokenizer
        normalizes per character and splits at spaces (``_cut_point``), so the tokens of the text before a
        space are those of the whole text up to there; if the cut text still fills ``max_length``, its
        truncated tokens are the whole text's. ``_encodings`` checks that it did, and tokenizes the whole
        text where it did not.
        """
        limit, point = self.cut_at, self._cut_point
        if limit is None or point is None:
            return {}
        cut = {}
        for i, text in enumerate(texts):
            if len(text) > limit:
                found = point.search(text, limit)
                if found is not None:
                    cut[i] = found.start()
        return cut

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


def _cut_point(tok: Any) -> re.Pattern[str] | None:
    """Where a long text may be cut for this tokenizer, or None: never.

    Only where the normalizer works per character and the pre-tokenizer splits at spaces: then the tokens
    of the text before a space are those of the whole text up to there.
    """
    spec = json.loads(tok.to_str())
    normalizers = set(_kinds(spec.get("normalizer"), "normalizers"))
    pre = spec.get("pre_tokenizer")
    pre_tokenizers = set(_kinds(pre, "pretokenizers"))
    if not pre_tokenizers or not normalizers <= _LOCAL_NORMALIZERS or not pre_tokenizers <= _SPLITTING_PRE_TOKENIZERS:
        return None
    # a pre-tokenizer sequence must split at spaces in one of its steps: Punctuation or Digits alone do not
    whitespace = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"}
    # an added token with a space in it could straddle the cut; a normalized one is matched in the normalized
    # text, so a space its normalization gives counts too (NFKC turns "¨" into a space and a combining mark)
    norm = tok.normalizer

    def spaced_token(token: dict[str, Any]) -> bool:
        content = str(token.get("content", ""))
        if token.get("normalized") and norm is not None:
            content += norm.normalize_str(content)
        return any(c.isspace() for c in content)

    spaced = any(spaced_token(t) for t in spec.get("added_tokens") or [])
    if not _splits(pre) or not whitespace & pre_tokenizers or spaced:
        return None
    deletes = bool(normalizers & _DELETING_NORMALIZERS)
    return _AFTER_WORD if deletes and pre_tokenizers & _SPACE_TOKEN_PRE_TOKENIZERS else _AFTER_NON_SPACE


def _kinds(node: Any, key: str) -> list[str]:
    """The types of a normalizer or pre-tokenizer, its ``Sequence`` steps flattened."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [k for child in node.get(key, []) for k in _kinds(child, key)]
    return [node.get("type", "")]


def _splits(node: Any) -> bool:
    """False for a ByteLevel without its regex or a Metaspace that does not split: they split nowhere."""
    if node.get("type") == "Sequence":
        return all(_splits(child) for child in node.get("pretokenizers", []))
    if node.get("type") == "ByteLevel":
        return bool(node.get("use_regex", True))
    if node.get("type") == "Metaspace":
        return bool(node.get("split", True))
    return True
