"""The OpenAI embeddings protocol at the edge: request parsing, errors and response bodies.

Pure Python and numpy: no web framework here, so the rules are testable without a server.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import functools
import json
import re
import sys
from typing import Any, NoReturn

import numpy as np

ENCODINGS = ("float", "base64")


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        """The JSON error body."""
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400: the request is malformed or holds an invalid value (``param`` names the field and index)."""
    return ApiError(400, message, param=param, code=code)


def unauthorized() -> ApiError:
    # RFC 9110: a 401 names the scheme it wants
    return ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(name: str, served: list[str]) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(served)}.",
                    param="model", code="model_not_found")


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param=param, code="request_too_large")


def queue_full(retry_after: int) -> ApiError:
    return ApiError(429, f"The server's queue is full; retry in {retry_after} s.", type="rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(retry_after)})


def unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": "1"})


def body_too_slow(timeout: float) -> ApiError:
    return ApiError(408, f"The request body did not arrive within the request's deadline ({timeout:g} s).",
                    code="request_timeout", headers={"Connection": "close"})


def deadline_passed(timeout: float) -> ApiError:
    # x-should-retry: the openai client retries every 5xx twice by default unless told not to; the same request
    # would spend a whole deadline's compute again, and most likely again in vain
    return ApiError(504, f"The request was not answered within its deadline ({timeout:g} s); send fewer or "
                    "shorter inputs per request, or give the server more time (its --request-timeout).",
                    type="server_error", code="deadline_exceeded", headers={"x-should-retry": "false"})


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    """A parsed ``POST /v1/embeddings`` body.

    Attributes:
        model: the model asked for.
        texts: the inputs as text, or None for token-id inputs.
        token_ids: the inputs as token ids (text tokens, no special tokens), or None for text inputs.
        encoding: ``float`` or ``base64``.
        truncate: cut over-long inputs at the model's max length (True) or refuse them with a 400.
        dimensions: the ``dimensions`` field, if sent.
        prompt_name: the ``prompt_name`` field (an embedrt extension, as in TEI): one of the model's prompts,
            put before each text input; None: the model's default prompt, if any.
        prompt: the ``prompt`` field (extension): a text put before each text input instead (``""``: none).
    """

    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    encoding: str
    truncate: bool
    dimensions: int | None
    prompt_name: str | None = None
    prompt: str | None = None

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


def parse_embedding_request(body: bytes, max_inputs: int) -> EmbeddingRequest:
    """Parse and check a request body.

    Raises:
        ApiError: 400 naming the field (and input index) at fault; 413 for more than ``max_inputs`` inputs.
    """
    try:
        data = loads(body, max_inputs)
    except InputsOverLimit:
        raise too_large(f"'input' holds more than {max_inputs} inputs; this server takes at most {max_inputs} "
                        "per request.", "input") from None
    except ValuesOverLimit:
        raise too_large(f"The body holds more than {values_limit(max_inputs)} nested lists, objects and long "
                        f"strings; a request of at most {max_inputs} inputs holds fewer.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("The body is not valid JSON for this API: it is nested too deeply.",
                          code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string.", "model", "missing_required_parameter"
                          if model is None else "invalid_type")
    texts, token_ids = _parse_input(data.get("input", None), "input" in data, max_inputs)
    encoding = data.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise bad_request(f"'encoding_format' must be one of {', '.join(ENCODINGS)}; got {encoding!r}.",
                          "encoding_format")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string.", "user", "invalid_type")
    truncate = data.get("truncate", True)
    if not isinstance(truncate, bool):
        raise bad_request("'truncate' must be true or false.", "truncate", "invalid_type")
    dimensions = data.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise bad_request("'dimensions' must be an integer.", "dimensions", "invalid_type")
    prompts = {}
    for name in ("prompt_name", "prompt"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string.", name, "invalid_type")
        if value is not None and token_ids is not None:
            raise bad_request(f"'{name}' applies to text inputs; token-id inputs are embedded as given.", name)
        prompts[name] = value
    if prompts["prompt_name"] is not None and prompts["prompt"] is not None:
        raise bad_request("Send 'prompt_name' or 'prompt', not both.", "prompt")
    return EmbeddingRequest(model, texts, token_ids, encoding, truncate, dimensions, **prompts)


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
# bodies up to this size are one json.loads call (a few milliseconds at most): pieces only pay on large ones
PIECEWISE_FROM = 256 * 1024
# runs of whole items (or an object's key-value pairs) are decoded within this many characters: one
# json.loads call of about a millisecond or less
_WINDOW = 64 * 1024
# a large body's bytes are decoded this many at a time (a few milliseconds at most)
_DECODE_CHUNK = 256 * 1024
# a string item that runs this far without its closing quote is decoded alone (json's own scanner is fastest)
_LONG = 256
# nesting deeper than this in a large body is refused as too deep (RecursionError, as json.loads' own for
# deeper nesting): a request nests 3 levels; the pieces' own recursion is Python's, two frames a level
MAX_DEPTH = 100
# an item as JSON writes it: a string, a number or literal, a flat list of those without strings (a row of
# token ids), or a flat object; the run stops before an item the window's end cuts, so the next run takes it
# (possessive where Python has it, 3.11+: a string cut by the window's end then fails at once, instead of
# backtracking through it at ~75 ns a character)
_MORE = "*+" if sys.version_info >= (3, 11) else "*"
# (a number or literal likewise: one longer than the window backtracked through it, ~5 ms a number)
_SOME = "++" if sys.version_info >= (3, 11) else "+"
_STRING = rf'"[^"\\]{_MORE}(?:\\.[^"\\]{_MORE}){_MORE}"'
_FLAT_OBJECT = rf'\{{[^{{}}\[\]"]{_MORE}(?:{_STRING}[^{{}}\[\]"]{_MORE}){_MORE}\}}'
_ITEM = rf'(?:{_STRING}|[-+.0-9A-Za-z]{_SOME}|\[[^\[\]{{}}"]{_MORE}\]|{_FLAT_OBJECT})'
_IN_LIST = rf"{_ITEM}(?=[ \t\n\r]*[,\]])"
_RUN = re.compile(rf"{_IN_LIST}(?:[ \t\n\r]*,[ \t\n\r]*{_IN_LIST})*")
_PAIR = rf"{_STRING}[ \t\n\r]*:[ \t\n\r]*{_ITEM}(?=[ \t\n\r]*[,}}])"
_PAIRS = re.compile(rf"{_PAIR}(?:[ \t\n\r]*,[ \t\n\r]*{_PAIR})*")
# one-level documents that put json's scanner in the state the pieces are in, so an error the pieces meet
# is worded as json.loads words it there (the wording differs between Python versions); a value before the
# point is null, which nothing after it can extend (a 0 read on into ".6" as one number)
_AT_LIST_START, _AFTER_ITEM, _AFTER_COMMA = "[", "[null", "[0,"
_AT_OBJECT_START, _AFTER_KEY, _AFTER_VALUE, _AFTER_PAIR_COMMA = "{", '{""', '{"":null', '{"":0,'


class InputsOverLimit(Exception):
    """A large body's top-level ``input`` list holds more inputs (strings or token-id rows) than the limit;
    raised as soon as that is seen, before the rest is decoded."""


class ValuesOverLimit(Exception):
    """A large body holds more values decoded one at a time (nested lists and objects, long strings, keys
    outside runs) than a request of at most ``max_inputs`` inputs can: each costs ~10 us, so 16 MiB of
    ``[["a"]]`` or ``{"":{}}`` items took 10x ``json.loads``' time, in one of the server's edge threads."""


# values decoded one at a time a request of N inputs may hold: its inputs (a long text each) and its fields
def values_limit(max_inputs: int) -> int:
    return 2 * max_inputs + 1024


class _Work:
    """What the pieces of one body may still do: ``max_inputs`` for the top-level ``input`` list, and the
    values left to decode one at a time (None: no bound)."""

    def __init__(self, max_inputs: int | None) -> None:
        self.max_inputs = max_inputs
        self.left = None if max_inputs is None else values_limit(max_inputs)

    def one(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left < 0:
                raise ValuesOverLimit


def loads(body: bytes | str, max_inputs: int | None = None) -> Any:
    """``json.loads(body)``, without holding the GIL for long on a large body.

    One ``json.loads`` call is one C call: 2,048 rows of 1,024 token ids (13 MiB) held the GIL for ~0.45 s,
    and a server's event loop (every other client) waited that long, though the parse ran in an edge
    thread. A body over ``PIECEWISE_FROM`` bytes is decoded in pieces, so the interpreter can hand the GIL
    over between them: objects and lists item by item, runs of small items (or of an object's key-value
    pairs) of at most ``_WINDOW`` characters as one ``json.loads`` of their slice, and a long string or
    number alone. The result is ``json.loads``' own, and so is the error, its message and position: an
    error inside a piece is json's own, moved to where the piece lies in the body, and one between pieces
    is worded by json's scanner put in the same state. One difference: such a body nesting deeper than
    ``MAX_DEPTH`` raises RecursionError (``json.loads`` takes about 1,000 levels; a request nests 3).

    With ``max_inputs``, a large body whose top-level ``input`` list holds more inputs than that (strings,
    rows; not the token ids of one input) raises InputsOverLimit once the limit is passed: a hostile body of
    millions of tiny items costs a few runs, not the whole parse and the millions of objects it would make.
    One holding more values decoded one at a time (nested lists and objects, long strings) than
    ``values_limit(max_inputs)`` raises ValuesOverLimit likewise.
    """
    if len(body) <= PIECEWISE_FROM:
        return json.loads(body)
    if isinstance(body, str):
        if body.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", body, 0)
        text = body
    else:
        text = _decode(body)
    value, at = _value(text, _skip(text, 0), 0, _Work(max_inputs))
    at = _skip(text, at)
    if at != len(text):
        raise json.JSONDecodeError("Extra data", text, at)
    return value


def _decode(body: bytes) -> str:
    """``body`` decoded as json.loads decodes it (its encoding, ``surrogatepass``), to the same text or the same
    UnicodeDecodeError, ``_DECODE_CHUNK`` bytes at a time: one decode of 16 MiB of raw lone surrogates held
    the GIL for ~2.5 s (the error handler's path, ~120 ns a character). A character cut by a chunk's end is
    completed by the next (an incremental decoder); an error's position is the body's."""
    encoding = json.detect_encoding(body)
    if encoding == "utf-8-sig":  # (bytes.decode("utf-8-sig") names positions after the BOM, in the rest)
        body, encoding = body[3:], "utf-8"
    decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
    parts = []
    for start in range(0, len(body), _DECODE_CHUNK):
        pending = len(decoder.getstate()[0])  # bytes of a character the last chunk cut
        try:
            parts.append(decoder.decode(body[start:start + _DECODE_CHUNK], start + _DECODE_CHUNK >= len(body)))
        except UnicodeDecodeError as exc:
            raise UnicodeDecodeError(exc.encoding, body, exc.start + start - pending, exc.end + start - pending,
                                     exc.reason) from None
    return "".join(parts)


def _skip(text: str, at: int) -> int:
    """Past the whitespace at ``at``, a window at a time (16 MiB of it held the GIL for ~70 ms in one match)."""
    while True:
        match = _SPACE.match(text, at, at + _WINDOW)
        assert match is not None  # matches the empty string
        if match.end() < at + _WINDOW:
            return match.end()
        at = match.end()


def _value(text: str, at: int, depth: int, work: _Work) -> tuple[Any, int]:
    """The value at ``at``, decoded alone (one of ``work``'s values)."""
    work.one()
    first = text[at:at + 1]
    if first in ("{", "[") and depth >= MAX_DEPTH:
        raise RecursionError(f"a request body over {PIECEWISE_FROM} bytes nests deeper than {MAX_DEPTH} levels")
    if first == "{":
        return _object(text, at, depth + 1, work)
    if first == "[":
        return _list(text, at, depth + 1, work)
    return _DECODER.raw_decode(text, at)  # a string, number or literal: linear in its length; errors are json's


def _slice(text: str, start: int, stop: int, open_: str, close: str) -> Any:
    """json.loads of text[start:stop] wrapped in ``open_``/``close``, an error moved to where it lies in text."""
    try:
        return json.loads(f"{open_}{text[start:stop]}{close}")
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(exc.msg, text, exc.pos - 1 + start) from None


def _fail(text: str, at: int, state: str, comma: int = -1) -> NoReturn:
    """Raise json's error for ``text[at]`` met in ``state`` (one of the one-level documents above): json's
    scanner reads the state and what follows, and its error is moved to ``at`` (or to the comma at
    ``comma``, which a trailing-comma error names)."""
    try:
        json.loads(state + text[at:at + 16])
    except json.JSONDecodeError as exc:
        where = exc.pos - len(state) + at if exc.pos >= len(state) else comma
        assert where >= 0, (state, exc)
        raise json.JSONDecodeError(exc.msg, text, where) from None
    raise AssertionError(f"json read {state + text[at:at + 16]!r} where the pieces could not")


def _object(text: str, at: int, depth: int, work: _Work) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    at, state, comma = _skip(text, at + 1), _AT_OBJECT_START, -1
    if text[at:at + 1] == "}":
        return out, at + 1
    while True:
        if (run := _PAIRS.match(text, at, at + _WINDOW)) is not None:  # key-value pairs of small values
            out.update(_slice(text, at, run.end(), "{", "}"))  # later keys win, in the first one's place
            at = run.end()
        else:
            if text[at:at + 1] != '"':
                _fail(text, at, state, comma)
            key, at = _DECODER.raw_decode(text, at)
            at = _skip(text, at)
            if text[at:at + 1] != ":":
                _fail(text, at, _AFTER_KEY)
            at = _skip(text, at + 1)
            if at == len(text):
                _fail(text, at, _AFTER_KEY + ":")
            if key == "input" and depth == 1 and work.max_inputs is not None and text[at] == "[":
                work.one()
                out[key], at = _list(text, at, depth + 1, work, work.max_inputs)
            else:
                out[key], at = _value(text, at, depth, work)
        end, at = _after_item(text, at, "}", _AFTER_VALUE)
        if end:
            return out, at
        comma = at
        at, state = _skip(text, at + 1), _AFTER_PAIR_COMMA


def _list(text: str, at: int, depth: int, work: _Work, max_inputs: int | None = None) -> tuple[list[Any], int]:
    """The list at ``at``; ``max_inputs``: the top-level ``input`` list's bound (InputsOverLimit past it)."""
    out: list[Any] = []
    at, state, comma = _skip(text, at + 1), _AT_LIST_START, -1
    if text[at:at + 1] == "]":
        return out, at + 1
    while True:
        first = text[at:at + 1]
        items: list[Any] | None = None
        if first in ("", "]"):  # the end, or "]" after a comma
            _fail(text, at, state, comma)
        elif first == '"' and not _closes_soon(text, at):  # a long string (a passage): alone
            work.one()
            item, at = _DECODER.raw_decode(text, at)
            out.append(item)
        elif first not in '"[{':  # numbers and literals: a run up to "]" or a ",", else one alone (one longer
            # than the window, or a broken body), as no run of the window could hold it
            if (stop := _scalars_end(text, at)) > at:
                items, at = _slice(text, at, stop, "[", "]"), stop
            else:
                item, at = _value(text, at, depth, work)
                out.append(item)
        elif (run := _RUN.match(text, at, at + _WINDOW)) is not None:  # short strings, rows of ids, flat objects
            items, at = _slice(text, at, run.end(), "[", "]"), run.end()
        else:  # an item larger than the window, or a nested one
            item, at = _value(text, at, depth, work)
            out.append(item)
        if items is not None:
            if out:
                out.extend(items)
            else:
                out = items
        if max_inputs is not None and len(out) > max_inputs and not _is_int(out[0]):
            raise InputsOverLimit
        end, at = _after_item(text, at, "]", _AFTER_ITEM)
        if end:
            return out, at
        comma = at
        at, state = _skip(text, at + 1), _AFTER_COMMA


def _after_item(text: str, at: int, close: str, state: str) -> tuple[bool, int]:
    """After an item of a list or object: (True, just past ``close``) at the container's end, else (False,
    the comma's index); anything else is json's error for ``state``."""
    at = _skip(text, at)
    if text[at:at + 1] == close:
        return True, at + 1
    if text[at:at + 1] != ",":
        _fail(text, at, state)
    return False, at


def _closes_soon(text: str, at: int) -> bool:
    """Whether the string at ``at`` ends within ``_LONG`` characters: a quote after an even number of
    backslashes (``"C:\\\\"`` ends at its last quote; taking it for an escaped one counted such short
    strings as long ones, so a body json.loads takes could be refused as holding too many)."""
    quote = text.find('"', at + 1, at + _LONG)
    while quote >= 0:
        before = quote - 1
        while text[before] == "\\":
            before -= 1
        if (quote - 1 - before) % 2 == 0:
            return True
        quote = text.find('"', quote + 1, at + _LONG)
    return False


def _scalars_end(text: str, at: int) -> int:
    """Where a run of scalars from ``at`` ends: this list's "]", else the last "," before a string, list or
    object starts (or within ``_WINDOW`` characters); ``at`` where there is no such end. One scan, to the
    first of those characters: scanning the whole window per item made a list of objects 10x json.loads."""
    found = _STRUCTURE.search(text, at, at + _WINDOW)
    if found is not None and found.group() == "]":
        return found.start()
    stop = text.rfind(",", at, at + _WINDOW if found is None else found.start())
    # not past a comma that follows another (",,", a broken body): the slice would end in one, and json's
    # error for it differs with what follows ("[1,]" is a trailing comma on 3.13, "[1,,2]" a missing value)
    if stop > at:  # (one pass: the first comma of the commas and spaces the run would end in)
        head = at + len(text[at:stop].rstrip(" \t\n\r,"))
        if (first := text.find(",", head, stop)) >= 0:
            stop = first
    return stop if stop > at else at


_STRUCTURE = re.compile(r'[\[\]{"]')


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_input(value: Any, present: bool, max_inputs: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token-id rows) from the ``input`` field."""
    if not present or value is None:
        raise bad_request("'input' is required: a string, a list of strings, a list of token ids, "
                          "or a list of token-id lists.", "input", "missing_required_parameter")
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or a list.", "input", "invalid_type")
    if not value:
        raise bad_request("'input' must not be an empty list.", "input")
    if _is_int(value[0]):  # one input as token ids
        _check_id_row(value, "input")
        return None, [value]
    if len(value) > max_inputs:
        raise too_large(f"'input' holds {len(value)} inputs; this server takes at most {max_inputs} per request.",
                        "input")
    if isinstance(value[0], str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise bad_request(f"input[{i}] must be a string like the other inputs, got "
                                  f"{type(item).__name__}.", f"input[{i}]", "invalid_type")
        return value, None
    for i, row in enumerate(value):
        if not isinstance(row, list):
            want = "a list of token ids like input[0]" if i else "a string, a token id or a list of token ids"
            raise bad_request(f"input[{i}] must be {want}, got {type(row).__name__}.", f"input[{i}]", "invalid_type")
        _check_id_row(row, f"input[{i}]")
    return None, value


def _check_id_row(row: list[Any], where: str) -> None:
    """An input's token ids (``[]``, in a list of them, is the empty text's: it embeds as ``""`` does)."""
    for j, token in enumerate(row):
        if not _is_int(token):
            raise bad_request(f"{where}[{j}] must be an integer token id, got {type(token).__name__}.",
                              where, "invalid_type")


def embeddings_body(embeddings: np.ndarray, model: str, encoding: str, prompt_tokens: int) -> bytes:
    """The response body: ``data`` in input order, float lists or base64 of little-endian float32.

    Written a row at a time: one ``json.dumps`` of 2,048 x 384 floats holds the GIL for ~1 s in one C call,
    so even from an edge thread it stalled the event loop (every other client) that long; between rows the
    loop gets the GIL back within the interpreter's switch interval. The bytes are the same as one call's.
    """
    if encoding == "base64":
        rows = np.ascontiguousarray(embeddings, dtype="<f4")
        items: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        # float32 -> Python float is exact, and json writes the shortest repr that reads back to it
        items = embeddings.tolist()
    dumps = functools.partial(json.dumps, separators=(",", ":"))
    data = ",".join(f'{{"object":"embedding","embedding":{dumps(item)},"index":{i}}}' for i, item in enumerate(items))
    usage = dumps({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens})
    return f'{{"object":"list","data":[{data}],"model":{dumps(model)},"usage":{usage}}}'.encode()
