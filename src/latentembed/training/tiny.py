"""The no-argument demo's model: a tiny random decoder and a WordPiece vocabulary built from the
training texts (see ``python -m latentembed train`` without arguments)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..models.decoder_config import DecoderConfig
from ..models.embedding import EmbeddingModel
from ..models.embedding_config import EmbeddingConfig
from ..prompts import get_template, resolve_prompt
from ..tokenization import TextTokenizer
from .data import TrainingExample

__all__ = ["TINY", "TINY_VOCAB", "tiny_model", "train_tokenizer", "vocabulary_texts"]

#: The no-argument demo's model: a tiny random decoder (see :func:`tiny_model`).
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_VOCAB = 8192


def train_tokenizer(texts: Sequence[str], vocab_size: int = TINY_VOCAB) -> TextTokenizer:
    """A lowercasing WordPiece tokenizer ([CLS] text [SEP]) built from ``texts``: the specials,
    every character (alone and as a ``##`` continuation) and the most frequent words. Built by
    counting, not by ``tokenizers``' trainer, whose ties break differently from run to run: the
    same texts always give the same ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + chars + ["##" + c for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(vocab_size - len(vocab), 0)]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return TextTokenizer(tok, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")


def vocabulary_texts(examples: Sequence[TrainingExample], template="e5") -> list[str]:
    """The texts a tiny model's tokenizer is built from: the rows' and the template's prompts."""
    texts = [t for ex in examples for t in (ex.query, ex.positive, *ex.negatives)]
    texts += [resolve_prompt(template, task=task).prefix for task in get_template(template).tasks]
    texts += [resolve_prompt(template, instruction=ex.instruction).prefix for ex in examples if ex.instruction]
    return texts


def tiny_model(
    tokenizer: TextTokenizer, *, template: str = "e5", max_length: int = 128, causal: bool = False, **sizes
) -> EmbeddingModel:
    """A randomly initialised tiny :class:`EmbeddingModel` (mean pooling, ``TINY`` sizes;
    bidirectional unless ``causal``)."""
    cfg = DecoderConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, **{**TINY, **sizes})
    config = EmbeddingConfig(pooling="mean", prompt_template=template, max_length=max_length, causal=causal)
    return EmbeddingModel(cfg, config, tokenizer=tokenizer)
