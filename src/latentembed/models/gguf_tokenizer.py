"""The tokenizer of a GGUF file, rebuilt from its metadata as a ``tokenizer.json``.

A GGUF file stores the vocabulary under llama.cpp's keys (``tokenizer.ggml.model``, ``.pre``,
``.tokens``, ``.token_type``, ``.scores``, ``.merges``, special-token ids, ``add_bos_token``).
Two models are read:

* ``gpt2``: byte-level BPE (SmolLM2, Llama 3, Qwen2). The tokens are already spelled in the
  byte-to-unicode alphabet; the merges are stored. The text is split before BPE the way
  llama.cpp splits it for the file's ``pre`` type (:data:`PRE_TOKENIZERS`): GPT-2's rule, the
  same with every digit on its own (``smollm``, ``starcoder``), or the Llama 3 / Qwen2 regexes.
  An unknown ``pre`` is refused: a wrong split gives other token ids without any error.
* ``llama``: sentencepiece BPE (Llama 2, Mistral 7B): ``▁`` for spaces, byte fallback to the
  ``<0xNN>`` tokens; merges are not stored, so they are implied by the scores: every split of a
  token into two vocabulary pieces is a merge ranked by that token's score (higher first), then
  by the longer left piece, as transformers' GGUF loader does.

Tokens marked control (type 3) become special added tokens, user-defined ones (type 4) plain
added tokens; BOS is prepended where ``tokenizer.ggml.add_bos_token`` says so (sentencepiece:
by default, as llama.cpp does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from ..tokenization import TextTokenizer

__all__ = ["GGUFError", "PRE_TOKENIZERS", "gguf_tokenizer_json", "gguf_tokenizer"]


class GGUFError(ValueError):
    """A GGUF file latentembed cannot read exactly; the message names the file and the problem."""


_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2
_GPT2_RULE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# Llama 3's split: letters with one leading non-letter, numbers of up to three digits, ...
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: the same with one digit per piece.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(pattern: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


_DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_RULE],
}
#: ``tokenizer.ggml.pre`` -> the pre-tokenizer that splits text as llama.cpp does for it.
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo"), _GPT2_RULE),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"), _split_then_bytes(_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _split_then_bytes(_QWEN2_SPLIT)),
}


def _added(tokens: list, types: list, unk_id) -> list:
    out = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_CONTROL, _USER_DEFINED) or i == unk_id:
            out.append(
                {
                    "id": i,
                    "content": token,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind != _USER_DEFINED,
                }
            )
    return out


def _template(bos: Union[str, None], bos_id, eos: Union[str, None], eos_id) -> dict:
    single = [{"Sequence": {"id": "A", "type_id": 0}}]
    special = {}
    if bos is not None:
        single.insert(0, {"SpecialToken": {"id": bos, "type_id": 0}})
        special[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
    if eos is not None:
        single.append({"SpecialToken": {"id": eos, "type_id": 0}})
        special[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def _score_merges(tokens: list, types: list, scores: list) -> list:
    """Sentencepiece merges implied by the scores (module docstring)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, kind, score in zip(tokens, types, scores):
        if kind != 1:  # normal pieces only: control, byte and unknown tokens are never merged into
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -len(left), -len(right), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[r[5], r[6]] for r in ranked]


def gguf_tokenizer_json(meta: dict, path: Union[str, Path] = "<gguf>") -> tuple[dict, dict]:
    """(``tokenizer.json`` dict, special tokens ``{"bos_token", "eos_token", "pad_token"}``) from
    the metadata fields ``meta`` of a GGUF file (``field name -> value``)."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model not in ("gpt2", "llama") or not tokens:
        raise GGUFError(
            f"{path}: tokenizer.ggml.model {model!r} cannot be rebuilt as a tokenizer.json "
            "(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece BPE)"
        )
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    def special(key: str):
        i = meta.get(f"tokenizer.ggml.{key}")
        return (None, None) if i is None or not 0 <= int(i) < len(tokens) else (tokens[int(i)], int(i))

    bos, bos_id = special("bos_token_id")
    eos, eos_id = special("eos_token_id")
    pad, _ = special("padding_token_id")
    unk, unk_id = special("unknown_token_id")
    spm = model == "llama"
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spm))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if spm:
        prefix = "first" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
        pre = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prefix, "split": False}
        merges = _score_merges(tokens, types, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        decoder = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1 if prefix == "first" else 0, "stop": 0},
            ],
        }
    else:
        name = meta.get("tokenizer.ggml.pre", "default")
        if name not in PRE_TOKENIZERS:
            raise GGUFError(
                f"{path}: tokenizer.ggml.pre {name!r} is not known to latentembed, so the text cannot be split "
                f"as llama.cpp splits it; known: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        pre = PRE_TOKENIZERS[name]
        merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges") or []]
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added(tokens, types, unk_id),
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": _template(bos if add_bos else None, bos_id, eos if add_eos else None, eos_id),
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk if spm else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": spm,
            "byte_fallback": spm,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    return tokenizer, {"bos_token": bos, "eos_token": eos, "pad_token": pad}


def gguf_tokenizer(reader, path: Union[str, Path] = "<gguf>") -> TextTokenizer:
    """A :class:`TextTokenizer` over the tokenizer a ``gguf.GGUFReader`` describes; its
    ``save_pretrained`` writes ``tokenizer.json`` + ``tokenizer_config.json``."""
    import tokenizers

    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.ggml.")}
    spec, specials = gguf_tokenizer_json(meta, path)
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    except Exception as e:  # the Rust library raises a bare Exception
        raise GGUFError(f"{path}: the tokenizer in its metadata is not valid: {e}") from None
    return TextTokenizer(backend, **specials)
