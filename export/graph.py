"""The torch module that holds encoder + pooling + Dense + normalisation, and its ONNX export."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from embedrt.export.source import CheckpointSpec, position_pad_id, usable_positions
from embedrt.manifest import OUTPUT_NAME
from embedrt.ops import Pooling

OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.20 reads up to 10; our graphs need nothing newer
# the encoders whose tokenizers return token_type_ids (all zeros for one text; fed so the graph is the model's)
_SEGMENTS = ("bert", "albert", "electra")


def graph_inputs(architecture: str) -> tuple[str, ...]:
    """The inputs the architecture really uses, in graph order."""
    if architecture in _SEGMENTS:
        return ("input_ids", "attention_mask", "token_type_ids")
    return ("input_ids", "attention_mask")  # DistilBERT, MPNet and the RoBERTa family take no token_type_ids



def graph_limits(config: Any, architecture: str, pad_token_id: int) -> dict[str, int]:
    """The longest input the position table serves and the embedding table's size, stamped into the graph.

    See :func:`embedrt.export.source.usable_positions`.
    """
    # the position ids count from the config's padding index (transformers' padding_idx), which is the
    # tokenizer's pad id in every checkpoint seen; the config is what the model itself uses
    pad = getattr(config, "pad_token_id", None)
    positions = usable_positions(int(config.max_position_embeddings), architecture,
                                 position_pad_id(pad) if pad is not None else pad_token_id)
    return {"max_positions": positions, "vocab_size": int(config.vocab_size)}


def build_pipeline(st_model: Any, spec: CheckpointSpec) -> Any:
    """A torch module mapping token feeds to ``sentence_embedding``, following ``modules.json`` order."""
    import torch

    class Pool(torch.nn.Module):
        def __init__(self, mode: Pooling) -> None:
            super().__init__()
            self.mode = mode

        def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch_pool(hidden, mask, self.mode)

    class Normalize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x, p=2.0, dim=1)

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = st_model[0].auto_model
            self.pooling = Pool(spec.pooling)
            head = []
            for module in spec.modules[2:]:
                if module.kind == "Dense":
                    dense = st_model[module.index]
                    head.append(torch.nn.Sequential(dense.linear, dense.activation_function))
                else:
                    head.append(Normalize())
            self.head = torch.nn.ModuleList(head)
            self.input_names = graph_inputs(spec.architecture)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if rest:
                kwargs["token_type_ids"] = rest[0]
            hidden = self.encoder(**kwargs)[0]
            x = self.pooling(hidden, attention_mask)
            for layer in self.head:
                x = layer(x)
            return x

    return Pipeline().eval()


def torch_pool(hidden: Any, mask: Any, mode: Pooling) -> Any:
    """In-graph pooling; the same maths as ``embedrt.ops.pool`` (tested against it)."""
    import torch

    if mode is Pooling.CLS:
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode is Pooling.MAX:
        return torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = torch.clamp(m.sum(dim=1), min=1e-9)
    return summed / (counts if mode is Pooling.MEAN else torch.sqrt(counts))


def export_onnx(pipeline: Any, path: Path, pad_token_id: int) -> None:
    """Export the pipeline to ONNX with dynamic batch and sequence axes; ``path`` is written once.

    The trace uses a padded batch so the attention-mask path is recorded, not a shortcut for all-ones masks.
    """
    import io

    import onnx
    import torch

    pad = pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, pad, pad, pad]], dtype=torch.long)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=torch.long)
    args: tuple[torch.Tensor, ...] = (ids, mask)
    names = pipeline.input_names
    if "token_type_ids" in names:
        args = (*args, torch.zeros_like(ids))
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # tracer notes about Python-side shape checks: the parity check, not these, decides correctness
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        buffer = io.BytesIO()  # in memory first: the IR version may need lowering before the file is written
        torch.onnx.export(
            pipeline, args, buffer, dynamo=False, opset_version=OPSET, input_names=list(names),
            output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, str(path))
