"""The OpenAI embeddings protocol at the edge: request parsing, errors and response bodies.

Pure Python and numpy: no web framework here, so the rules are testable without a server.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
import sys
from typing import Any

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
    return ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                    code="invalid_api_key")


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
        data = loads(body)
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
# a list's items are decoded in runs of whole items within this many characters: one json.loads call of
# about a millisecond or less
_WINDOW = 64 * 1024
# a string item that runs this far without its closing quote is decoded alone (json's own scanner is fastest)
_LONG = 256
# the top-level object of a request has a handful of keys; more is not a request, and goes to json.loads whole
_MAX_KEYS = 64
# a list item as JSON writes it: a string, a number or literal, or a flat list of those (a row of token
# ids); each must be followed by "," or "]", so that an item cut by the window's end is left to the next run
# (possessive where Python has it, 3.11+: a string cut by the window's end then fails at once, instead of
# backtracking through it at ~75 ns a character)
_MORE = "*+" if sys.version_info >= (3, 11) else "*"
_ITEM = (rf'(?:"[^"\\]{_MORE}(?:\\.[^"\\]{_MORE}){_MORE}"|[-+.0-9A-Za-z]+|\[[^\[\]{{}}"]{_MORE}\])'
         r"(?=[ \t\n\r]*[,\]])")
_RUN = re.compile(rf"{_ITEM}(?:[ \t\n\r]*,[ \t\n\r]*{_ITEM})*")


class _Surprise(Exception):
    """The piecewise decoder met something it does not decode itself; ``json.loads`` of the whole body decides."""


def loads(body: bytes | str) -> Any:
    """``json.loads(body)``, without holding the GIL for long on a large body.

    One ``json.loads`` call is one C call: 2,048 rows of 1,024 token ids (13 MiB) held the GIL for ~0.45 s,
    and a server's event loop (every other client) waited that long, though the parse ran in an edge
    thread. A body over ``PIECEWISE_FROM`` bytes is decoded in pieces, so the interpreter can hand the GIL
    over between them: the top-level object's values one at a time, and a list (and a list in it) in runs
    of whole items of at most ``_WINDOW`` characters, each run one ``json.loads`` of its slice (an item
    larger than that alone). Whatever the pieces cannot take (a malformed body, an object inside a list, a
    body of many keys, nesting the pieces' own recursion cannot reach) goes to ``json.loads`` of the whole
    body, in one call as before, so the result, or the error, is always that of ``json.loads``.
    """
    if len(body) <= PIECEWISE_FROM:
        return json.loads(body)
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass") if isinstance(body, (bytes, bytearray)) \
            else body
        return _object(text)
    except (_Surprise, ValueError, IndexError, RecursionError):
        return json.loads(body)


def _skip(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    assert match is not None  # matches the empty string
    return match.end()


def _object(text: str) -> dict[str, Any]:
    at = _skip(text, 0)
    if text[at] != "{":
        raise _Surprise
    out: dict[str, Any] = {}
    at = _skip(text, at + 1)
    if text[at] == "}":
        at += 1
    else:
        for _ in range(_MAX_KEYS):
            if text[at] != '"':
                raise _Surprise
            key, at = _DECODER.raw_decode(text, at)
            at = _skip(text, at)
            if text[at] != ":":
                raise _Surprise
            at = _skip(text, at + 1)
            out[key], at = _list(text, at, 1) if text[at] == "[" else _DECODER.raw_decode(text, at)
            at = _skip(text, at)
            if text[at] == "}":
                at += 1
                break
            if text[at] != ",":
                raise _Surprise
            at = _skip(text, at + 1)
        else:
            raise _Surprise
    if _skip(text, at) != len(text):
        raise _Surprise
    return out


def _list(text: str, at: int, depth: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    at = _skip(text, at + 1)
    if text[at] == "]":
        return out, at + 1
    while True:
        first = text[at]
        items: list[Any] | None = None
        if first == '"' and not _closes_soon(text, at):  # a long string (a passage): alone
            item, at = _DECODER.raw_decode(text, at)
            out.append(item)
        elif first not in '"[{' and (stop := _scalars_end(text, at)) > at:  # numbers: up to "]" or a ","
            items, at = json.loads(f"[{text[at:stop]}]"), stop
        elif (run := _RUN.match(text, at, at + _WINDOW)) is not None:  # short strings, rows of token ids
            items, at = json.loads(f"[{run.group()}]"), run.end()
        elif first == '"':  # one string longer than the window
            item, at = _DECODER.raw_decode(text, at)
            out.append(item)
        elif first == "[" and depth < 2:  # one row longer than the window
            item, at = _list(text, at, depth + 1)
            out.append(item)
        else:
            raise _Surprise
        if items is not None:
            if out:
                out.extend(items)
            else:
                out = items
        at = _skip(text, at)
        if text[at] == "]":
            return out, at + 1
        if text[at] != ",":
            raise _Surprise
        at = _skip(text, at + 1)


def _closes_soon(text: str, at: int) -> bool:
    """Whether the string at ``at`` seems to end within ``_LONG`` characters: a quote not after a backslash.
    (A quote after an escaped backslash is taken for an escaped one: that costs speed, never correctness.)"""
    quote = text.find('"', at + 1, at + _LONG)
    while quote >= 0:
        if text[quote - 1] != "\\":
            return True
        quote = text.find('"', quote + 1, at + _LONG)
    return False


def _scalars_end(text: str, at: int) -> int:
    """Where a run of scalars from ``at`` ends: this list's "]", or the last "," within ``_WINDOW``
    characters; ``at`` where the run holds a string, list or object (or no comma)."""
    stop = text.find("]", at, at + _WINDOW)
    if stop < 0:
        stop = text.rfind(",", at, at + _WINDOW)
    if stop < 0 or any(text.find(c, at, stop) >= 0 for c in '[{"'):
        return at
    return stop


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
    if not row:
        raise bad_request(f"{where} is an empty list of token ids.", where)
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
