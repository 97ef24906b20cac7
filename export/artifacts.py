"""The files of a model folder as the exporter makes them: manifest in memory, stamped graphs written once."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedrt import __version__
from embedrt.errors import SourceError
from embedrt.export.graph import OPSET, graph_inputs
from embedrt.export.source import CheckpointSpec, ResolvedSource
from embedrt.manifest import MANIFEST_NAME, ONNX_NAME, OPENVINO_BIN, OPENVINO_XML, TOKENIZER_NAME, Manifest, Precision
from embedrt.ops import Similarity

if TYPE_CHECKING:
    from onnx import ModelProto

# recorded in every manifest (extra.exporter); folders written by another exporter may hold other graphs
# the recipe revision: bumped when an export's content changes without a version change (cached folders,
# e.g. the benchmarks', are rebuilt when it differs)
RECIPE_REVISION = ("2026-11-24b (ONNX Runtime static int8 quantises MatMul inputs only: activation x activation "
                   "MatMuls, outputs and the residual stream fp32, fused GELU outputs typed; int8 FFN "
                   "down-projections fp32 by default, casual calibration texts for NNCF, NNCF MINMAX activation "
                   "ranges, bf16 check of fp32 IRs)")
EXPORTER = f"embedrt {__version__} recipes {RECIPE_REVISION}, torch.onnx (TorchScript) opset {OPSET}, eager attention"
GRAPH_ENTRIES: dict[str, dict[str, Any]] = {
    "onnx": {"file": ONNX_NAME, "opset": OPSET},
    "openvino": {"xml": OPENVINO_XML, "bin": OPENVINO_BIN},
}


def new_manifest(resolved: ResolvedSource, spec: CheckpointSpec, *, dim: int, pad_id: int, precision: Precision,
                 formats: tuple[str, ...], similarity: Similarity | None, extra: dict[str, Any]) -> Manifest:
    """The manifest of a folder about to be written: no files or parity yet, but its contract is final."""
    return Manifest(
        source={"id": resolved.source_id, "revision": resolved.revision,
                "catalogue": resolved.catalogue.name if resolved.catalogue else None},
        architecture=spec.architecture,
        dim=dim,
        pooling=spec.pooling,
        normalize=spec.normalize,
        similarity=similarity or spec.similarity,
        max_seq_length=spec.max_seq_length,
        do_lower_case=spec.do_lower_case,
        inputs=graph_inputs(spec.architecture),
        pad_token_id=pad_id,
        precision=precision,
        graphs={fmt: dict(GRAPH_ENTRIES[fmt]) for fmt in formats},
        files={},
        parity={},
        prompts=dict(spec.prompts),
        default_prompt_name=spec.default_prompt_name,
        include_prompt=spec.include_prompt,
        split_special_tokens=spec.split_special_tokens,
        extra={
            "similarity_source": "override" if similarity else spec.similarity_source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "exporter": EXPORTER,
            "versions": _versions(),
            **extra,
        },
    )


def write_tokenizer(st_model: Any, folder: Path, checkpoint: Path) -> None:
    """The checkpoint's tokenizer files, as sentence-transformers runs them, into a new ``folder``.

    Raises:
        SourceError: the tokenizer has no fast (``tokenizer.json``) form.
    """
    folder.mkdir(parents=True)
    st_model.tokenizer.save_pretrained(str(folder))
    if not (folder / TOKENIZER_NAME).is_file():
        raise SourceError(f"{checkpoint}: the tokenizer has no fast (tokenizer.json) form; cannot export it")


def write_onnx(model: ModelProto, path: Path, manifest: Manifest) -> None:
    """Stamp the contract into the graph's ``metadata_props`` (so the .onnx file describes itself), then write it."""
    import onnx

    del model.metadata_props[:]
    for key, value in {"embedrt": json.dumps(manifest.contract()), "producer": "embedrt"}.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "embedrt"
    model.producer_version = __version__
    onnx.save(model, str(path))


def check_folder(folder: Path, manifest: Manifest, dest: Path) -> Path:
    """``dest``: links to the files of ``folder`` beside a manifest of its own, for the runtime to load.

    The checks run through ``embedrt.load``, which needs a manifest; this way the folder that is published
    gets its manifest once, with the figures of the checks, and no file of it is written twice.
    """
    dest.mkdir()
    for name in manifest.files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / name, target)
        except OSError:  # a file system without hard links: a copy checks the same bytes
            shutil.copyfile(folder / name, target)
    write_manifest(dest, manifest)
    return dest


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``embedrt.json`` (atomically) into ``folder``."""
    from embedrt.manifest import write_json_atomic

    write_json_atomic(folder / MANIFEST_NAME, manifest.to_json())


def embedding_dim(st_model: Any) -> int:
    """The checkpoint's embedding dimension as sentence-transformers reports it."""
    # sentence-transformers 6 renamed get_sentence_embedding_dimension
    getter = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
    return int(getter())


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "openvino"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out
