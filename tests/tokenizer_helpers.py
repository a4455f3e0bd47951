"""Shared test helpers: tiny real tokenizers with different offset behaviour, trained in-process.

``build_tokenizer(kind, directory) -> directory`` saves ``tokenizer.json`` + ``tokenizer_config.json``
through transformers' ``PreTrainedTokenizerFast`` (bos / eos / pad / unk set), so the directory loads
with ``TextTokenizer.from_pretrained`` and ``transformers.AutoTokenizer.from_pretrained``. Kinds:

- ``"bpe"``: byte-level BPE like GPT-2 / Qwen2: tokens carry the leading space (``"Ġworld"``, offsets
  include the space), any text encodes, no BOS added; eos = pad = ``<|endoftext|>``.
- ``"metaspace"``: sentencepiece-like BPE (Llama / Mistral): Metaspace pre-tokenizer (``"▁world"``,
  prepend scheme "first"), ``<s>`` added by a TemplateProcessing post-processor, eos ``</s>``,
  unknown characters map to ``<unk>``, no pad token in the tokenizer (pad = ``<unk>`` as many
  Llama exports do).
- ``"wordpiece"``: BERT-like: lowercasing normalizer, whitespace/punctuation pre-tokenizer
  (offsets exclude spaces), ``##`` continuation pieces, ``[CLS] $A [SEP]``; bos = ``[CLS]``,
  eos = ``[SEP]`` (so EOS is already last), pad = ``[PAD]``.

Vocabularies have at most 512 entries (``VOCAB_SIZE``), so tiny test models can embed any id.
Training takes milliseconds; the trained ``tokenizers.Tokenizer`` is cached per process
(``raw_tokenizer(kind)`` returns a fresh copy of it).
"""

from __future__ import annotations

import functools
from pathlib import Path

KINDS = ("bpe", "metaspace", "wordpiece")
VOCAB_SIZE = 512

# A few sentences in the shapes the tests use (prompt prefixes, queries, documents).
CORPUS = (
    "Instruct: Given a question, retrieve passages that answer the question\nQuery: how do I bake bread?",
    "Instruct: Retrieve semantically similar text\nQuery: a man is playing a guitar.",
    "Represent the Wikipedia question for retrieving supporting documents: who wrote hamlet?",
    "Represent the query for retrieving evidence documents: what is the capital of france?",
    "Represent the document for retrieval: Paris is the capital and largest city of France.",
    "search_query: what is an embedding? search_document: An embedding maps text to a vector.",
    "classification: this movie was great! clustering: astronomy and physics papers",
    "The quick brown fox jumps over the lazy dog. Hello world, hello embeddings!",
    "Bread is made from flour, water, salt and yeast; it is baked in an oven for an hour.",
    "Tokenizers split text into tokens; offsets map each token back to its characters.",
    "Latent attention pooling, mean pooling and last-token pooling give sentence vectors.",
    "0123456789 + - * / = ( ) [ ] { } < > ' \" ? ! , . ; : _ # @ & % $",
)

SPECIALS = {
    "bpe": dict(
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    ),
    "metaspace": dict(bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>"),
    "wordpiece": dict(
        bos_token="[CLS]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ),
}


@functools.cache
def _trained_json(kind: str) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # trim_offsets=False keeps the leading space inside the token's span, as GPT-2 / Qwen2 do.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=["<|endoftext|>", "<|startoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        )
    elif kind == "wordpiece":
        # WordPieceTrainer is not deterministic across processes, so the vocabulary is built by
        # hand: specials, every character and its "##" continuation, a few suffixes, and the words
        # seen at least twice (rarer words split into pieces).
        normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts: dict[str, int] = {}
        for sentence in CORPUS:
            for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(sentence)):
                counts[word] = counts.get(word, 0) + 1
        chars = sorted({c for w in counts for c in w})
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
        vocab += ["##s", "##ing", "##ed", "##ly", "##er", "##ion", "##al"]
        vocab += sorted(w for w, n in counts.items() if n >= 2 and w not in vocab)
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.WordPiece()
        trainer = None
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if trainer is not None:
        tok.train_from_iterator(CORPUS, trainer)
    if kind == "metaspace":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
    elif kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok.to_str()


def raw_tokenizer(kind: str):
    """A fresh ``tokenizers.Tokenizer`` of ``kind`` (no config: special tokens are unknown to it)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_json(kind))


def hf_tokenizer(kind: str):
    """A transformers ``PreTrainedTokenizerFast`` of ``kind`` with its special tokens set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer(kind), **SPECIALS[kind])


def build_tokenizer(kind: str, directory) -> Path:
    """Save a tokenizer of ``kind`` ("bpe", "metaspace", "wordpiece") into ``directory``
    (tokenizer.json + tokenizer_config.json) and return the directory as a Path.

    Example::

        path = build_tokenizer("metaspace", tmp_path / "tok")
        tok = TextTokenizer.from_pretrained(path)
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_tokenizer(kind).save_pretrained(str(directory))
    return directory
