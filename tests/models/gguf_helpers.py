"""Small GGUF files written with the ``gguf`` package's writer, laid out as llama.cpp's converter
lays them out (Q/K rows permuted for the llama architecture, norms in F32), with a tokenizer
trained here: the files the GGUF tests read with latentembed and with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the garden wall.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in green plants.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon; 600 million people watched.",
    "Embedding models map sentences to vectors so that similar meanings lie close together.",
    "Don't split the words wrongly: they're tokens, we've seen 12345 digits and symbols like #@!",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab(vocab_size: int = 400) -> tuple[list, list]:
    """(tokens in id order, merges "a b") of a byte-level BPE trained on :data:`TEXTS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def sentencepiece_vocab() -> tuple[list, list, list]:
    """(tokens, scores, token types) of a small sentencepiece-style BPE vocabulary: <unk>, <s>,
    </s>, the 256 byte tokens, the characters of :data:`TEXTS` and frequent pieces of them."""
    from collections import Counter

    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [6] * 256
    words = Counter("\u2581" + w for t in TEXTS for w in t.split(" "))
    chars = sorted({c for w in words for c in w})
    pieces = Counter()
    for w, n in words.items():
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + 6) + 1):
                pieces[w[i:j]] += n
    ranked = [p for p, _ in pieces.most_common(150)]
    # Keep only pieces whose every prefix split can be built (BPE needs a path of merges).
    vocab = set(chars)
    kept = []
    for p in sorted(ranked, key=len):
        if any(p[:k] in vocab and p[k:] in vocab for k in range(1, len(p))):
            vocab.add(p)
            kept.append(p)
    for i, c in enumerate(chars):
        tokens.append(c)
        scores.append(-1000.0 - i)
        types.append(1)
    for i, p in enumerate(sorted(kept, key=lambda p: -pieces[p])):
        tokens.append(p)
        scores.append(-float(i) - 0.5 * len(p) / 10)
        types.append(1)
    return tokens, scores, types


def permute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K permutation: each head's [2, hd/2] rows become [hd/2, 2]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str = "tiny test model",
    qtype: str = "F32",
    spm: bool = False,
    pre: str = "smollm",
    tied: bool = True,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 96,
    theta: float = 10000.0,
    extra_tensor: str | None = None,
    extra_kv: dict | None = None,
) -> Path:
    """Write a random decoder of ``arch`` with 2-D weights stored as ``qtype``."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    if spm:
        tokens, scores, types = sentencepiece_vocab()
        merges = None
    else:
        tokens, merges = byte_level_vocab()
        scores = None
        types = [3 if t in SPECIALS else 1 for t in tokens]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama" if spm else "gpt2")
    if not spm:
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)

    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def add(tname: str, arr: np.ndarray) -> None:
        arr = arr.astype(np.float32)
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(tname, arr)
        elif qtype == "F16":
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            w.add_tensor(tname, quantize(arr, qt), raw_dtype=qt)

    def rand(*shape, scale=0.08):
        return rng.standard_normal(shape).astype(np.float32) * scale

    add("token_embd.weight", rand(vocab, hidden, scale=0.5))
    bias = arch == "qwen2"
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", 1 + rand(hidden, scale=0.1))
        q, k = rand(heads * head_dim, hidden), rand(kv_heads * head_dim, hidden)
        qb, kb = rand(heads * head_dim), rand(kv_heads * head_dim)
        if arch != "qwen2":  # llama.cpp permutes Q/K rows of the llama architecture only
            q, k = permute_rotary_rows(q, heads), permute_rotary_rows(k, kv_heads)
        add(b + "attn_q.weight", q)
        add(b + "attn_k.weight", k)
        add(b + "attn_v.weight", rand(kv_heads * head_dim, hidden))
        if bias:
            add(b + "attn_q.bias", qb)
            add(b + "attn_k.bias", kb)
            add(b + "attn_v.bias", rand(kv_heads * head_dim))
        add(b + "attn_output.weight", rand(hidden, heads * head_dim))
        add(b + "ffn_norm.weight", 1 + rand(hidden, scale=0.1))
        add(b + "ffn_gate.weight", rand(ffn, hidden))
        add(b + "ffn_up.weight", rand(ffn, hidden))
        add(b + "ffn_down.weight", rand(hidden, ffn))
    add("output_norm.weight", 1 + rand(hidden, scale=0.1))
    if not tied:
        add("output.weight", rand(vocab, hidden))
    if extra_tensor:
        add(extra_tensor, rand(hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
