"""The manifest checked against the graph it describes, at load, so a mismatch is named before any run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from embedrt.errors import ModelFolderError
from embedrt.manifest import MANIFEST_NAME, Manifest

# the metadata key under which the exporter stamps the contract into the ONNX graph and the OpenVINO IR
STAMP_KEY = "embedrt"
# fields of the stamp that must equal the manifest's; max_seq_length may differ (see check_graph)
# the manifest fields the graph was exported with; "similarity" too: the graph does not use it, but a
# manifest edited to another metric ranked search results by it, silently
_SAME = ("dim", "inputs", "pad_token_id", "pooling", "normalize", "precision", "similarity", "architecture",
         "do_lower_case", "prompts", "default_prompt_name")


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """What a backend found in the graph file it loaded.

    Attributes:
        file: the graph file.
        inputs: the graph's input names.
        outputs: the graph's output names.
        output_dim: the static last dimension of ``sentence_embedding``, or None if dynamic.
        stamp: the contract the exporter stamped into the graph, or None (graphs from older exporters).
    """

    file: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    output_dim: int | None
    stamp: dict[str, Any] | None


def parse_stamp(raw: str | None, file: Path) -> dict[str, Any] | None:
    """The stamped contract as a dict (None if absent); a stamp that is not a JSON object is an error."""
    if raw is None:
        return None
    try:
        stamp = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{file}: the embedrt contract stamped in the graph is not JSON: {exc}") from exc
    if not isinstance(stamp, dict):
        raise ModelFolderError(f"{file}: the embedrt contract stamped in the graph is not an object")
    return stamp


def check_graph(root: Path, manifest: Manifest, graph: GraphInfo, vocab_size: int, output: str) -> None:
    """Raise ModelFolderError naming the manifest field that the graph (or the tokenizer) contradicts.

    Args:
        root: the model folder.
        manifest: its manifest.
        graph: what the backend read from the graph.
        vocab_size: the tokenizer's vocabulary size (added tokens included).
        output: the output the runtime reads.
    """
    where = root / MANIFEST_NAME

    def fail(field: str, detail: str) -> ModelFolderError:
        return ModelFolderError(f"{where}: field {field!r} {detail} ({graph.file.name})")

    if output not in graph.outputs:
        raise ModelFolderError(f"{graph.file}: the graph has no {output!r} output (it has {list(graph.outputs)})")
    if set(graph.inputs) != set(manifest.inputs):
        raise fail("inputs", f"is {list(manifest.inputs)} but the graph takes {list(graph.inputs)}")
    if graph.output_dim is not None and graph.output_dim != manifest.dim:
        raise fail("dim", f"is {manifest.dim} but the graph outputs {graph.output_dim} values per text")
    if not 0 <= manifest.pad_token_id < vocab_size:
        raise fail("pad_token_id", f"is {manifest.pad_token_id}, outside the tokenizer's {vocab_size} ids")
    stamp = graph.stamp
    if stamp is None:
        return
    mine = manifest.contract()
    for key in _SAME:
        if key in stamp and stamp[key] != mine[key]:
            raise fail(key, f"is {mine[key]!r} but the graph was exported with {stamp[key]!r}")
    limits = stamp.get("limits", {})
    for key, value in (mine.get("limits") or {}).items():  # the manifest's copy, read per call (encode_padded)
        if key in limits and limits[key] != value:
            raise fail(f"extra.limits.{key}", f"is {value!r} but the graph was exported with {limits[key]!r}")
    positions = limits.get("max_positions")
    if isinstance(positions, int) and manifest.max_seq_length > positions:
        raise fail("max_seq_length", f"is {manifest.max_seq_length} but the graph's position table holds "
                                     f"{positions} positions")
    table = limits.get("vocab_size")
    if isinstance(table, int) and vocab_size > table:
        raise ModelFolderError(f"{root / 'tokenizer.json'}: the tokenizer has {vocab_size} ids but the graph's "
                               f"embedding table holds {table}")
