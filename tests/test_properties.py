"""Property-based checks of ``encode`` over hostile input: any unicode, any length, any batch size or order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedrt

# any code point, plus what real data smuggles in: lone surrogates, NUL and escape codes, zero-width and
# combining characters, emoji, right-to-left text
_ODD = ["\ud800", "\udfff", "\ud83d", "\x00", "\x1b", "\u200b", "\u0301", "\U0001f600", "\u05d0", "\r", "\t"]
_CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(_ODD))
_TEXT = st.one_of(st.text(_CHARS, max_size=40), st.text(_CHARS, min_size=500, max_size=5000),
                  st.builds(lambda word, n: word * n, st.text(_CHARS, min_size=1, max_size=8), st.integers(1, 700)))
_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])


@pytest.fixture(scope="module", params=["cpu", "openvino"])
def model(request: pytest.FixtureRequest, tiny_bert: Any) -> embedrt.EmbeddingModel:
    return embedrt.load(tiny_bert[1], device=request.param)


@_SETTINGS
@given(texts=st.lists(_TEXT, max_size=10), batch_size=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_rows_are_in_order_and_independent_of_batch_mates(
    model: embedrt.EmbeddingModel, texts: list[str], batch_size: int, seed: int
) -> None:
    out = model.encode(texts, batch_size=batch_size)
    assert out.shape == (len(texts), model.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    alone = np.stack([model.encode([t])[0] for t in texts]) if texts else out
    np.testing.assert_allclose(out, alone, atol=2e-6, rtol=0)
    order = np.random.default_rng(seed).permutation(len(texts))
    shuffled = model.encode([texts[i] for i in order], batch_size=max(1, batch_size - 1))
    np.testing.assert_allclose(shuffled, out[order], atol=2e-6, rtol=0)


@_SETTINGS
@given(texts=st.lists(st.text(_CHARS, max_size=20), max_size=6), bad=st.sampled_from([None, 3, 2.5, b"x", ["x"]]),
       at=st.integers(0, 6))
def test_a_non_str_item_is_a_type_error_naming_its_index(
    model: embedrt.EmbeddingModel, texts: list[str], bad: Any, at: int
) -> None:
    at = min(at, len(texts))
    items: list[Any] = [*texts[:at], bad, *texts[at:]]
    with pytest.raises(TypeError, match=rf"texts\[{at}\] is {type(bad).__name__}, not str"):
        model.encode(items)


def _tokenizer_files(tmp: Any, tiny_bert: Any) -> dict[str, Any]:
    """tokenizer.json of WordPiece (BERT), byte-level BPE (RoBERTa) and Metaspace BPE (SentencePiece-like)."""
    import tokenizers

    from embedrt.export.synthetic import _roberta_tokenizer
    from embedrt.export.validate import PROBE_TEXTS

    files = {"wordpiece": tiny_bert[1] / "tokenizer.json"}
    files["bytelevel"] = tmp / "roberta.json"
    _roberta_tokenizer().backend_tokenizer.save(str(files["bytelevel"]))
    sp = tokenizers.SentencePieceBPETokenizer()
    sp.train_from_iterator(list(PROBE_TEXTS) * 5, vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    sp.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", sp.token_to_id("<s>")), ("</s>", sp.token_to_id("</s>"))])
    files["metaspace"] = tmp / "metaspace.json"
    sp.save(str(files["metaspace"]))
    return files


_WORDS = st.sampled_from(["a", "the", "Café", "naïve", "e\u0301", "日本語", "😀", "!", "...", "12", "x" * 120,
                          "\u00a0", "\u3000", "\t", "\n", " ", "  ", "don't", "<mask>", "[MASK]", "\x00", "\u200b"])
_LONG = st.builds("".join, st.lists(st.one_of(_WORDS, st.text(_CHARS, max_size=6)), min_size=1, max_size=120))


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Any) -> dict[str, Any]:
    return _tokenizer_files(tmp_path_factory.mktemp("tokenizers"), tiny_bert)


@pytest.mark.parametrize("kind", ["wordpiece", "bytelevel", "metaspace"])
def test_long_texts_are_cut_before_tokenizing_and_keep_the_whole_texts_tokens(
    tokenizer_files: dict[str, Any], kind: str
) -> None:
    """A text far past max_length is tokenized cut at a space; its truncated tokens are the whole text's."""
    from embedrt.tokenize import TextTokenizer

    tok = TextTokenizer(tokenizer_files[kind], 12, 0, ("input_ids", "attention_mask"))
    assert tok.cut_at is not None, f"{kind}: the cut should apply to this tokenizer"
    tok.cut_at = 30  # cut short texts too, so that examples reach the cut and its fallback

    @_SETTINGS
    @given(texts=st.lists(_LONG, min_size=1, max_size=6))
    def check(texts: list[str]) -> None:
        texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        whole = [tok._tok.encode(t, add_special_tokens=True) for t in texts]
        got = tok.encode_compact(texts)
        assert [list(x) for x in got.ids] == [w.ids for w in whole]
        assert got.truncated.tolist() == [bool(w.overflowing) for w in whole]
        for t, w in zip(texts, whole, strict=True):  # one text alone takes the other path
            assert tok.encode([t]) == [w.ids]

    check()
    # cut where the text is long; a text with no token after the cut point is tokenized whole
    spaced = "word" + " " * 200 + "end " + "more words " * 10
    assert tok._cut(["word " * 20, spaced]) == {0: 34, 1: 207}
    assert tok.encode([spaced]) == [tok._tok.encode(spaced).ids]  # the cut text was short: tokenized whole


def test_tokenizers_that_do_not_split_at_spaces_are_never_cut(tmp_path: Any) -> None:
    import tokenizers

    from embedrt.tokenize import TextTokenizer

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.normalizer = tokenizers.normalizers.Replace("  ", " ")  # looks across the cut point
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(["some words here"] * 3, tokenizers.trainers.BpeTrainer(special_tokens=["<unk>"]))
    bpe.save(str(tmp_path / "a.json"))
    assert TextTokenizer(tmp_path / "a.json", 8, 0, ("input_ids",)).cut_at is None
    bpe.normalizer = None
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(use_regex=False)
    bpe.save(str(tmp_path / "b.json"))
    assert TextTokenizer(tmp_path / "b.json", 8, 0, ("input_ids",)).cut_at is None


def test_no_cut_where_a_normalized_added_token_holds_a_space(tmp_path: Any) -> None:
    """An added token is matched in the normalized text: under NFKC, "xq\u00a8" is "xq \u0308", and a cut at that
    space split it (a silently different token at the end of a long text)."""
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers

    from embedrt.tokenize import TextTokenizer

    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "so", "##x", "##q", "x", "q", "tail"])}
    wp = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    wp.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.BertNormalizer(lowercase=False)])
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.save(str(tmp_path / "plain.json"))
    assert TextTokenizer(tmp_path / "plain.json", 8, 0, ("input_ids",)).cut_at is not None
    wp.add_tokens([tokenizers.AddedToken("xq\u00a8", normalized=True)])
    wp.save(str(tmp_path / "added.json"))
    assert TextTokenizer(tmp_path / "added.json", 8, 0, ("input_ids",)).cut_at is None


def test_the_cut_never_splits_a_word(tmp_path: Any) -> None:
    """Metaspace splits at spaces only: a cut at a newline would split a word, here one WordPiece makes [UNK]."""
    import tokenizers

    from embedrt.tokenize import TextTokenizer

    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "▁ab", "▁x", "##x", "##y", "##\n", "▁more"])}
    wp = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    wp.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    wp.post_processor = tokenizers.processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                                 special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    wp.save(str(tmp_path / "wp.json"))
    tok = TextTokenizer(tmp_path / "wp.json", 12, 0, ("input_ids",))
    assert tok.cut_at is not None
    tok.cut_at = 30
    for gap in ("\n", "\t", "\u00a0", " "):
        text = "ab x" + "x" * 40 + gap + "y" * 70 + " more" * 20  # "x...x\ny...y" is one word of 112 characters
        assert tok.encode_compact([text]).ids[0].tolist() == tok._tok.encode(text).ids, repr(gap)


@pytest.mark.parametrize("deleted", ["\x00", "\u0301"])
def test_no_cut_after_a_character_the_normalizer_deletes(tmp_path: Any, deleted: str) -> None:
    """Byte-level BPE counts spaces as tokens: a cut after characters the normalizer deletes (NUL under
    clean_text, a combining mark under StripAccents) would end the cut text in spaces merged otherwise."""
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers, processors

    from embedrt.tokenize import TextTokenizer

    vocab = {"[CLS]": 0, "[SEP]": 1, "[PAD]": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    for t in ["ĠĠ", "ĠĠĠĠ", "Ġa", "Ġy"]:
        vocab[t] = len(vocab)
    merges = [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ġ", "a"), ("Ġ", "y")]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    bpe.normalizer = (normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                                 lowercase=False) if deleted == "\x00"
                      else normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 0), ("[SEP]", 1)])
    bpe.add_special_tokens(["[CLS]", "[SEP]", "[PAD]"])
    bpe.save(str(tmp_path / "t.json"))
    tok = TextTokenizer(tmp_path / "t.json", 10, 2, ("input_ids", "attention_mask"))
    assert tok.cut_at is not None
    text = "a" + " a" * 6 + "   " + deleted * 2100 + "  y"
    assert tok.encode([text]) == [tok._tok.encode(text).ids]


def test_texts_without_a_word_before_a_space_are_still_cut_where_spaces_are_no_tokens(
    tokenizer_files: dict[str, Any]
) -> None:
    """WordPiece (the BERT family) drops spaces, so any space after a non-space is a cut point: a 16 MB
    list of punctuation took ~25 s tokenized whole; a text whose cut did not fill max_length is cut further on."""
    from embedrt.tokenize import TextTokenizer

    tok = TextTokenizer(tokenizer_files["wordpiece"], 12, 0, ("input_ids", "attention_mask"))
    assert tok.cut_at is not None
    for text in ("_ " * 40_000, ", ".join(str(i) for i in range(20_000)), "\x00 " * 40_000 + "a b " * 10):
        assert tok._cut([text]), text[:20]
        assert tok.encode([text]) == [tok._tok.encode(text).ids]


# JSON the server's request parser must read exactly as json.loads: objects whose lists hold runs of numbers,
# strings, literals and nested lists, written with any JSON whitespace, then possibly mangled
_SCALAR = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                    st.none(), st.text(_CHARS, max_size=6))
_JSON = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.lists(st.integers(0, 99), max_size=40),
    st.dictionaries(st.text(_CHARS, max_size=4), inner, max_size=4)), max_leaves=40)


def _write(value: Any, space: str) -> str:
    import json

    if isinstance(value, list):
        return "[" + space + ("," + space).join(_write(x, space) for x in value) + space + "]"
    if isinstance(value, dict):
        pairs = (f"{json.dumps(k)}{space}:{space}{_write(v, space)}" for k, v in value.items())
        return "{" + space + ",".join(pairs) + "}"
    return json.dumps(value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.dictionaries(st.sampled_from(["model", "input", "user", "x"]), _JSON, max_size=4),
                     st.dictionaries(st.text(_CHARS, max_size=3), _SCALAR, min_size=5, max_size=30), _JSON),
       space=st.sampled_from(["", " ", "\n\t ", "\r"]), cut=st.integers(0, 2**16),
       mangle=st.sampled_from([None, "drop", "insert"]), char=st.sampled_from(list('[]{},:"0-. eE\\x\ufeff')),
       window=st.integers(1, 64), long=st.integers(1, 12), chunk=st.integers(1, 9),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32-be", "bom2", "str"]))
def test_the_request_parser_reads_json_as_json_loads_does(
    body: Any, space: str, cut: int, mangle: str | None, char: str, window: int, long: int, chunk: int,
    encoding: str,
) -> None:
    """The server decodes large bodies in pieces (so one parse does not hold the GIL for long); whatever it
    is given, its result or its error must be json.loads' own. Here every body is "large", and the pieces'
    window and a "long" string are a few characters, so runs end everywhere."""
    import json
    from unittest import mock

    from embedrt.serve import protocol

    text = _write(body, space)
    if mangle is not None:
        at = cut % (len(text) + 1)
        text = text[:at] + ("" if mangle == "drop" else char) + text[at + (mangle == "drop"):]
    raw: str | bytes = text if encoding == "str" else ("\ufeff" + text).encode("utf-8-sig") if encoding == "bom2" \
        else text.encode(encoding, "surrogatepass")

    def outcome(parse: Any) -> Any:
        try:
            return parse(raw)
        except (ValueError, RecursionError) as exc:
            return (type(exc), str(exc))

    expected = outcome(json.loads)
    with mock.patch.object(protocol, "PIECEWISE_FROM", 0), mock.patch.object(protocol, "_WINDOW", window), \
            mock.patch.object(protocol, "_LONG", long), mock.patch.object(protocol, "_DECODE_CHUNK", chunk):
        got = outcome(protocol.loads)
    assert got == expected and type(got) is type(expected)


@settings(max_examples=300, deadline=None)
@given(text=st.text(_CHARS, min_size=1, max_size=12),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                                 "utf-32-be"]),
       damage=st.lists(st.tuples(st.integers(0, 2**16),
                                 st.sampled_from(b"\xff\x80\xed\xa0\xc3\x00\xd8\xdc\xef\xbb\xbf")), max_size=2),
       chunk=st.integers(1, 9))
def test_the_request_parser_decodes_bytes_as_json_loads_does(text: str, encoding: str, damage: list[tuple[int, int]],
                                                             chunk: int) -> None:
    """A large body is decoded a chunk at a time (one decode of 16 MiB of raw lone surrogates held the GIL
    for seconds): the text, or the UnicodeDecodeError and its message, must be json.loads' own decode's, with
    a character or a BOM cut by a chunk's end."""
    import json
    from unittest import mock

    from embedrt.serve import protocol

    raw = bytearray(text.encode(encoding, "surrogatepass"))
    for at, byte in damage:
        raw.insert(at % (len(raw) + 1), byte)
    body = bytes(raw)

    def outcome(decode: Any) -> Any:
        try:
            return decode(body)
        except UnicodeDecodeError as exc:
            return (str(exc), exc.start, exc.end)

    expected = outcome(lambda b: b.decode(json.detect_encoding(b), "surrogatepass"))
    with mock.patch.object(protocol, "_DECODE_CHUNK", chunk):
        assert outcome(protocol._decode) == expected


@pytest.mark.parametrize("window", [1, 5, 12, 40, 1000])
def test_the_request_parser_keeps_a_key_sent_twice_and_refuses_a_bom_as_json_loads_does(window: int) -> None:
    """json.loads keeps a repeated key where it first came, with its last value; runs of pairs decoded
    apart must merge the same way (later runs win)."""
    import json
    from unittest import mock

    from embedrt.serve import protocol

    text = '{"a": 1, "b": [1, 2], "c": "x", "a": {"k": 2}, "d": null, "b": 3, "a": [4], "e": {"a": 1, "a": 2}}'
    for body in (text, text.replace(" ", "")):
        with mock.patch.object(protocol, "PIECEWISE_FROM", 0), mock.patch.object(protocol, "_WINDOW", window):
            got = protocol.loads(body.encode())
        want = json.loads(body)
        assert got == want and list(got) == list(want) == ["a", "b", "c", "d", "e"]
    # an error right after a number: json's scanner, shown the state with a 0 before the rest, read "0.6" on
    # as one number, and named a later error (found by the property test above)
    for bad in ('{"": 1e+1.6, "\\u001f\\u001f": 0}', '[1e+1.6, "\\u001f\\u001f"]', '{"a": [1, 2.5.5, 3]}'):
        with mock.patch.object(protocol, "PIECEWISE_FROM", 0), mock.patch.object(protocol, "_WINDOW", 1), \
                mock.patch.object(protocol, "_LONG", 1), pytest.raises(json.JSONDecodeError) as error:
            protocol.loads(bad.encode())
        with pytest.raises(json.JSONDecodeError) as want_error:
            json.loads(bad)
        assert str(error.value) == str(want_error.value), bad
    for body in ("\ufeff" + text, "\ufeff\ufeff" + text):  # json.loads refuses a BOM in a str
        with mock.patch.object(protocol, "PIECEWISE_FROM", 0), pytest.raises(json.JSONDecodeError) as error:
            protocol.loads(body)
        with pytest.raises(json.JSONDecodeError) as want_error:
            json.loads(body)
        assert str(error.value) == str(want_error.value)
