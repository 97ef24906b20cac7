"""The model folder contract: ``embedrt.json``, written by the exporter and read by the runtime."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from embedrt._enums import parse_enum
from embedrt.errors import ModelFolderError
from embedrt.ops import Pooling, Similarity

MANIFEST_NAME = "embedrt.json"
FORMAT_NAME = "embedrt-model"
# 2: a folder an embedrt from before 2026-12-07 would run wrong without a word (a default prompt it would not
# add, special-token strings it would tokenize as the tokens); every other folder is still written as 1, which
# those runtimes read as before
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
TOKENIZER_NAME = "tokenizer.json"
# transformers' tokenizer settings that tokenizer.json does not hold (split_special_tokens)
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
ONNX_NAME = "model.onnx"
OPENVINO_XML = "openvino_model.xml"
OPENVINO_BIN = "openvino_model.bin"
OUTPUT_NAME = "sentence_embedding"  # the graph output the runtime reads, [batch, dim] float32


class Precision(str, enum.Enum):
    """Numeric precision of a folder's graphs."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # an fp32 OpenVINO IR that runs (and was checked) in bf16 on CPUs with bf16 units
    INT8 = "int8"

    @classmethod
    def parse(cls, value: str) -> Precision:
        """Return the member named ``value``; the error lists the valid names."""
        return parse_enum(cls, value, "precision")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file of the folder with its size and sha256."""

    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to reproduce sentence-transformers, read from the checkpoint at export.

    Attributes:
        source: where the checkpoint came from (hub id or local path) and its revision, if known.
        architecture: the transformers ``model_type`` (``bert``, ``distilbert``, ``roberta``, ...).
        dim: embedding dimension of the ``sentence_embedding`` output.
        pooling: pooling mode, applied inside the graph.
        normalize: whether the graph L2-normalises (only when the checkpoint has a Normalize module).
        similarity: the checkpoint's similarity function; the default for scoring.
        max_seq_length: truncation length in tokens, special tokens included.
        do_lower_case: whether the checkpoint lowercases (already applied by ``tokenizer.json``).
        inputs: the graph's input names, in order.
        pad_token_id: id used to pad batches.
        precision: fp32, fp16 or int8.
        graphs: which graph formats the folder holds (``onnx``, ``openvino``) with per-format details.
        files: every file of the folder except the manifest, with size and sha256.
        parity: per artifact, the figures of the check against sentence-transformers.
        extra: anything else recorded at export (quantisation recipe, optimiser counts, versions).
        prompts: the checkpoint's named prompts (``config_sentence_transformers.json``), e.g.
            ``{"query": "query: "}``: texts put after one, as sentence-transformers' ``prompt_name`` does.
        default_prompt_name: the prompt put before every text unless another (or ``prompt=""``) is asked for.
        include_prompt: False where the checkpoint's pooling leaves a prompt's tokens out (Pooling
            ``include_prompt``), which the graph cannot do: a non-empty prompt is then refused.
        split_special_tokens: the tokenizer treats special-token strings in a text ("[SEP]") as text; None
            where the manifest does not say (exported before 2026-12-07): tokenizer_config.json decides.
    """

    source: dict[str, Any]
    architecture: str
    dim: int
    pooling: Pooling
    normalize: bool
    similarity: Similarity
    max_seq_length: int
    do_lower_case: bool
    inputs: tuple[str, ...]
    pad_token_id: int
    precision: Precision
    graphs: dict[str, dict[str, Any]]
    files: dict[str, FileEntry]
    parity: dict[str, dict[str, Any]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    split_special_tokens: bool | None = False

    @property
    def format_version(self) -> int:
        """2 where an older runtime (format 1) would compute other vectors without a word, else 1."""
        default = self.prompts.get(self.default_prompt_name or "", "")
        return 2 if default or self.split_special_tokens else 1

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict."""
        data: dict[str, Any] = {"format": FORMAT_NAME, "format_version": self.format_version}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            elif field.name == "files":
                value = {name: dataclasses.asdict(entry) for name, entry in sorted(value.items())}
            data[field.name] = value
        return data

    def contract(self) -> dict[str, Any]:
        """The subset that describes the graph's behaviour (stored in the ONNX ``metadata_props`` too)."""
        keys = ("architecture", "dim", "pooling", "normalize", "similarity", "max_seq_length",
                "do_lower_case", "inputs", "pad_token_id", "precision", "source", "prompts", "default_prompt_name",
                "include_prompt", "split_special_tokens")
        full = self.to_json()
        # the graph's own limits (position table, vocabulary), checked against the manifest at load
        limits = self.extra.get("limits", {})
        return {"format_version": self.format_version, **{k: full[k] for k in keys}, "limits": limits}


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``embedrt.json`` in ``folder``.

    Args:
        folder: a model folder written by ``embedrt export``.

    Returns:
        The validated manifest.

    Raises:
        ModelFolderError: the folder or manifest is missing, unreadable, or a field is invalid; the
            message names the path and the field.
    """
    root = Path(folder)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ModelFolderError(f"model folder not found: {root}")
    if not path.is_file():
        raise ModelFolderError(f"{path}: manifest missing; is {root} a folder written by 'embedrt export'?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, JSONDecodeError, a 4,300-digit integer
        raise ModelFolderError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ModelFolderError(f"{path}: not an embedrt manifest (format must be {FORMAT_NAME!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:  # true == 1 in Python
        raise ModelFolderError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (this embedrt reads "
            f"{' and '.join(map(str, READ_VERSIONS))}); re-export the model with this version of embedrt"
        )
    return _parse_manifest(data, path)


def _parse_manifest(data: dict[str, Any], path: Path) -> Manifest:
    def field(name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in data:
            raise ModelFolderError(f"{path}: field {name!r} missing")
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ModelFolderError(f"{path}: field {name!r} has the wrong type ({type(value).__name__})")
        return value

    try:
        pooling = Pooling.parse(field("pooling", str))
        sim = Similarity.parse(field("similarity", str))
        precision = Precision.parse(field("precision", str))
    except ValueError as exc:
        raise ModelFolderError(f"{path}: {exc}") from exc
    dim, max_len = field("dim", int), field("max_seq_length", int)
    if dim < 1 or max_len < 1:
        raise ModelFolderError(f"{path}: dim and max_seq_length must be positive, got {dim}, {max_len}")
    files = {name: _file_entry(path, name, entry) for name, entry in field("files", dict).items()}
    graphs = field("graphs", dict)
    if not graphs:
        raise ModelFolderError(f"{path}: field 'graphs' is empty; the folder holds no model")
    return Manifest(
        source=field("source", dict),
        architecture=field("architecture", str),
        dim=dim,
        pooling=pooling,
        normalize=field("normalize", bool),
        similarity=sim,
        max_seq_length=max_len,
        do_lower_case=field("do_lower_case", bool),
        inputs=_inputs(path, field("inputs", list)),
        pad_token_id=field("pad_token_id", int),
        precision=precision,
        graphs=graphs,
        files=files,
        parity=_parity(path, field("parity", dict)),
        extra=_extra(path, data.get("extra", {})),
        **_prompts(path, data),
    )


def _prompts(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``prompts`` (an object of strings, default empty) and ``default_prompt_name`` (one of its names, or null);
    both optional: folders exported before embedrt carried prompts have neither."""
    prompts = data.get("prompts", {})
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelFolderError(f"{path}: field 'prompts' must be an object of strings (name -> prompt)")
    default = data.get("default_prompt_name")
    if default is not None and (not isinstance(default, str) or default not in prompts):
        raise ModelFolderError(f"{path}: field 'default_prompt_name' is {default!r}, which is not one of 'prompts' "
                               f"({', '.join(map(repr, sorted(prompts))) or 'none'})")
    flags = {}
    for name in ("include_prompt", "split_special_tokens"):
        if name in data and not isinstance(data[name], bool):
            raise ModelFolderError(f"{path}: field {name!r} has the wrong type ({type(data[name]).__name__})")
        # split_special_tokens absent (exported before 2026-12-07): None, tokenizer_config.json decides
        flags[name] = data.get(name, True if name == "include_prompt" else None)
    return {"prompts": dict(prompts), "default_prompt_name": default, **flags}


# the records the runtime reads, beyond the top-level fields: name -> the types each key may hold when present
_NUMBER = (int, float)
_RECORDS: dict[str, dict[str, Any]] = {
    "parity.openvino.bf16": {"passed": bool, "min_cosine": _NUMBER, "min_cosine_unbatched": _NUMBER, "units": str},
    "extra.auto": {"device": str, "cpu": str},
    "extra.quantization": {"target": str, "batch_invariant": bool, "method": str},
}


def _record(path: Path, name: str, value: Any, required: tuple[str, ...] = ()) -> None:
    """``value`` is an object whose known keys have their types (``_RECORDS[name]``), else ModelFolderError."""
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path}: field {name!r} has the wrong type ({type(value).__name__}); an object")
    for key, kind in _RECORDS[name].items():
        if key not in value:
            if key in required:
                raise ModelFolderError(f"{path}: field '{name}.{key}' missing")
            continue
        item = value[key]
        if not isinstance(item, kind) or (kind is not bool and isinstance(item, bool)):
            raise ModelFolderError(f"{path}: field '{name}.{key}' has the wrong type ({type(item).__name__})")


def _parity(path: Path, parity: dict[str, Any]) -> dict[str, Any]:
    for fmt, record in parity.items():
        if not isinstance(record, dict):
            raise ModelFolderError(f"{path}: field 'parity.{fmt}' has the wrong type ({type(record).__name__}); "
                                   "an object")
    bf16 = (parity.get("openvino") or {}).get("bf16")
    if bf16 is not None:  # decides whether an fp32 folder runs bf16 on AMX
        passed = isinstance(bf16, dict) and bf16.get("passed") is True
        _record(path, "parity.openvino.bf16", bf16, required=("passed", "min_cosine") if passed else ("passed",))
    return parity


def _extra(path: Path, extra: Any) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ModelFolderError(f"{path}: field 'extra' has the wrong type ({type(extra).__name__}); an object")
    limits = extra.get("limits")
    if limits is not None:  # read at load (the graph's contract) and per call (encode_padded)
        if not isinstance(limits, dict):
            raise ModelFolderError(f"{path}: field 'extra.limits' has the wrong type ({type(limits).__name__}); "
                                   "an object")
        for key in ("max_positions", "vocab_size"):
            value = limits.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelFolderError(f"{path}: field 'extra.limits.{key}' must be an integer >= 1, got {value!r}")
    for name in ("auto", "quantization"):  # read at load: auto's device order, the int8 target and recipe
        if extra.get(name) is not None:
            _record(path, f"extra.{name}", extra[name])
    return extra


def _inputs(path: Path, names: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(n, str) for n in names) or not {"input_ids", "attention_mask"} <= set(names):
        raise ModelFolderError(f"{path}: field 'inputs' must list input_ids and attention_mask (and "
                               f"token_type_ids where the graph takes it), got {names!r}")
    return tuple(names)


def _file_entry(path: Path, name: str, entry: Any) -> FileEntry:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or "\\" in name or any(p in ("..", ".") for p in parts):
        raise ModelFolderError(f"{path}: files[{name!r}] is not a path inside the model folder")
    if not isinstance(entry, dict) or not {"bytes", "sha256"} <= entry.keys():
        raise ModelFolderError(f"{path}: files[{name!r}] needs 'bytes' and 'sha256'")
    size, digest = entry["bytes"], entry["sha256"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ModelFolderError(f"{path}: files[{name!r}].bytes must be a whole number >= 0, got {size!r}")
    if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ModelFolderError(f"{path}: files[{name!r}].sha256 must be 64 lowercase hex digits, got {digest!r}")
    return FileEntry(bytes=size, sha256=digest)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file below ``folder`` except the manifest, keyed by relative path."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST_NAME:
            entries[rel] = FileEntry(bytes=path.stat().st_size, sha256=sha256_file(path))
    return entries


def check_files(folder: Path, manifest: Manifest, names: list[str], full_hash: bool = False) -> None:
    """Check that the named files exist with the recorded size (and, if asked, sha256).

    Raises:
        ModelFolderError: a file is missing, has another size, or another hash; the message names it.
    """
    for name in names:
        path = folder / name
        entry = manifest.files.get(name)
        if entry is None:
            raise ModelFolderError(f"{path}: not listed in the manifest's files")
        if not path.is_file():
            raise ModelFolderError(f"{path}: file missing from the model folder")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ModelFolderError(f"{path}: corrupt or truncated ({size} bytes, manifest says {entry.bytes})")
        if full_hash and sha256_file(path) != entry.sha256:
            raise ModelFolderError(f"{path}: sha256 does not match the manifest; the file is corrupt")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and a rename (``atomic_file``)."""
    from embedrt.outputs import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def resolve_prompt(manifest: Manifest, prompt_name: str | None = None, prompt: str | None = None) -> str:
    """The text put before each input, as sentence-transformers' ``encode`` chooses it.

    ``prompt`` if given (``""`` for none), else the prompt named ``prompt_name``, else the model's default
    prompt (``default_prompt_name``), else none (``""``).

    Raises:
        TypeError: ``prompt_name`` or ``prompt`` is not a str.
        ValueError: both are given (sentence-transformers ignores ``prompt_name`` then, with a warning), or
            ``prompt_name`` is not one of the model's prompts (the message lists them).
    """
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise TypeError(f"prompt_name must be a str, got {type(prompt_name).__name__}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if prompt is not None:
        if prompt_name is not None:
            raise ValueError(f"give prompt_name ({prompt_name!r}) or prompt ({prompt!r}), not both")
        text = prompt
    elif prompt_name is not None:
        if prompt_name not in manifest.prompts:
            names = ", ".join(map(repr, sorted(manifest.prompts))) or "none"
            raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts ({names})")
        text = manifest.prompts[prompt_name]
    elif manifest.default_prompt_name is not None:
        text = manifest.prompts[manifest.default_prompt_name]
    else:
        text = ""
    if text and not manifest.include_prompt:
        raise ValueError(f"this model's pooling leaves a prompt's tokens out (include_prompt false), which "
                         f"embedrt's graph cannot do; the prompt {text!r} cannot be used (prompt='' for none)")
    from embedrt.tokenize import repaired  # (tokenize reads this module's names)

    return repaired(text)  # a lone surrogate (a bad byte in argv, a JSON escape) is repaired as in a text


# sentence-transformers' encode_document tries these prompt names, in this order
DOCUMENT_PROMPTS = ("document", "passage", "corpus")
