"""Tokenisation with instruction prefixes and exact instruction pool masks, and sequence packing.

``tokenize_with_prompts`` prepends a prefix (from ``prompts.resolve_prompt``) to every text,
tokenises ``prefix + text`` ONCE with character offsets, appends EOS and builds the pool mask:
with ``mask_instruction="exact"`` a token is an instruction token (excluded from pooling) iff its
character span lies inside the prefix, so the mask is right for any tokenizer's merge and offset
behaviour (byte-level BPE tokens that carry the leading space, sentencepiece ``▁`` pieces, WordPiece
offsets that skip spaces). ``pack_sequences`` turns the result into one packed batch (``input_ids``
[T], int32 ``cu_seqlens`` [B+1]) for the varlen backbone, or ``padded()`` [B, L] tensors.

Example::

    tok = TextTokenizer.from_pretrained("path/to/checkpoint")      # tokenizer.json (+ config)
    out = tokenize_with_prompts(tok, ["how do I bake bread?"], "Instruct: Answer it\\nQuery: ")
    batch = pack_sequences(out.input_ids, out.pool_mask)
    ids, attention_mask, pool_mask = batch.padded(tok.pad_token_id or 0)    # each [B, L]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .atomic_io import read_json

__all__ = [
    "TextTokenizer",
    "TokenizedTexts",
    "tokenize_with_prompts",
    "PackedBatch",
    "pack_sequences",
    "MASK_MODES",
    "TOKENIZER_FILES",
    "as_tokenizer",
    "check_tokenizer_fits",
]

MASK_MODES = ("exact", "nvembed_compat", "none")
#: Files a tokenizer's ``save_pretrained`` (ours or transformers') may write into a model directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token")


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json / special_tokens_map.json: str or AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _is_hf_fast(obj: Any) -> bool:
    return hasattr(obj, "backend_tokenizer") and bool(getattr(obj, "is_fast", False))


class TextTokenizer:
    """One interface over a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.

    A raw ``tokenizers.Tokenizer`` does not know its BOS / EOS / PAD: pass them as token strings
    (``from_pretrained`` reads them from ``tokenizer_config.json`` / ``special_tokens_map.json``).
    A transformers tokenizer brings its own (explicit arguments override them). The tokenizer's own
    post-processor decides which specials (BOS, [CLS] ... [SEP]) are added; truncation and padding
    set inside a tokenizer.json are ignored (``tokenize_with_prompts`` truncates itself).

    Example::

        >>> tok = TextTokenizer.from_pretrained(path)                    # doctest: +SKIP
        >>> tok.count_tokens("Instruct: retrieve\\nQuery: ")              # doctest: +SKIP
        7
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        config: dict | None = None,
    ) -> None:
        import tokenizers

        self._config = dict(config or {})
        given = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
        if isinstance(tokenizer, tokenizers.Tokenizer):
            self.backend = "tokenizers"
            if tokenizer.truncation is not None or tokenizer.padding is not None:
                tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
                tokenizer.no_truncation()
                tokenizer.no_padding()
            self.tokenizer = tokenizer
            self._special = dict(given)
        elif _is_hf_fast(tokenizer):
            self.backend = "transformers"
            self.tokenizer = tokenizer
            # special_tokens_map lists only the tokens that are set (reading an unset
            # tokenizer.bos_token logs an error in transformers 4)
            smap = getattr(tokenizer, "special_tokens_map", None) or {}
            self._special = {
                k: given[k] if given[k] is not None else _token_content(smap.get(k)) for k in _SPECIAL_NAMES
            }
        elif hasattr(tokenizer, "is_fast") or hasattr(tokenizer, "tokenize"):
            raise TypeError(
                f"{type(tokenizer).__name__} is a slow (python) tokenizer without character "
                "offsets; load the fast tokenizer (tokenizer.json, use_fast=True)"
            )
        else:
            raise TypeError(
                "tokenizer must be a tokenizers.Tokenizer, a transformers fast tokenizer or a "
                f"TextTokenizer, got {type(tokenizer).__name__}"
            )
        self._ids = {}
        for name in _SPECIAL_NAMES:
            token = self._special[name]
            if token is None:
                self._ids[name] = None
                continue
            if not isinstance(token, str):
                raise TypeError(f"{name} must be a token string, got {type(token).__name__}")
            tid = self._token_to_id(token)
            if tid is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
            self._ids[name] = tid

    # construction / persistence -------------------------------------------------------------------
    @classmethod
    def wrap(cls, tokenizer: Any, **special_tokens: str | None) -> TextTokenizer:
        """A TextTokenizer over ``tokenizer`` (returned unchanged if it already is one)."""
        if isinstance(tokenizer, TextTokenizer):
            return tokenizer
        return cls(tokenizer, **special_tokens)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextTokenizer:
        """Load ``tokenizer.json`` from a local directory (or the file's path), with the special
        tokens named in ``tokenizer_config.json`` / ``special_tokens_map.json`` when present."""
        import tokenizers

        path = Path(path)
        directory = path.parent if path.is_file() else path
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {str(path)!r} (a local directory with tokenizer.json, optionally "
                "tokenizer_config.json / special_tokens_map.json, is needed; convert a sentencepiece-only "
                "tokenizer with transformers' AutoTokenizer(...).save_pretrained first)"
            )
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            f = directory / name
            if f.is_file():
                config.update(read_json(f))
        special = {k: _token_content(config.get(k)) for k in _SPECIAL_NAMES}
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception that names no file
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
        try:
            return cls(backend, config=config, **special)
        except ValueError as e:  # a special token the vocabulary lacks
            raise ValueError(
                f"{file}: {e} (special tokens from {directory}'s tokenizer_config.json / special_tokens_map.json)"
            ) from None

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json into ``path`` (loads back with
        ``from_pretrained``, and with transformers' AutoTokenizer)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.backend == "transformers":
            self.tokenizer.save_pretrained(str(path))
            # keep special tokens given to this wrapper over the wrapped tokenizer's own
            with open(path / "tokenizer_config.json", encoding="utf-8") as fh:
                config = json.load(fh)
        else:
            self.tokenizer.save(str(path / "tokenizer.json"))
            config = {k: v for k, v in self._config.items() if k not in _SPECIAL_NAMES}
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update({k: v for k, v in self._special.items() if v is not None})
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, ensure_ascii=False)

    # special tokens ---------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        return self._ids["eos_token"]

    @property
    def pad_token_id(self) -> int | None:
        return self._ids["pad_token"]

    bos_token = property(lambda self: self._special["bos_token"], doc="BOS token string or None")
    eos_token = property(lambda self: self._special["eos_token"], doc="EOS token string or None")
    pad_token = property(lambda self: self._special["pad_token"], doc="PAD token string or None")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        if self.backend == "tokenizers":
            return self.tokenizer.get_vocab_size(with_added_tokens=True)
        return len(self.tokenizer)

    def _token_to_id(self, token: str) -> int | None:
        if self.backend == "tokenizers":
            return self.tokenizer.token_to_id(token)
        return self.tokenizer.backend_tokenizer.token_to_id(token)

    # encoding ---------------------------------------------------------------------------------------
    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]], list[bool]]]:
        """Per text: (ids, character offsets (start, end) into the text, special-token flags), with
        the tokenizer's own special tokens (BOS, [CLS]/[SEP]) added."""
        texts = list(texts)
        if not texts:
            return []
        if self.backend == "tokenizers":
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=True)
            return [
                (list(e.ids), [tuple(o) for o in e.offsets], [bool(s) for s in e.special_tokens_mask]) for e in encs
            ]
        out = self.tokenizer(
            texts,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            padding=False,
            truncation=False,
        )
        return [
            (list(ids), [tuple(o) for o in offs], [bool(s) for s in spec])
            for ids, offs, spec in zip(out["input_ids"], out["offset_mapping"], out["special_tokens_mask"])
        ]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.backend == "tokenizers":
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` alone, without special tokens (what NV-Embed's ``tokenizer.tokenize``
        counts for its instruction mask)."""
        return len(self.encode(text, add_special_tokens=False)) if text else 0

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


def as_tokenizer(tokenizer: Any) -> TextTokenizer | None:
    """``None``, a tokenizer directory / tokenizer.json path, or a tokenizer object -> TextTokenizer
    (``None`` stays ``None``); what ``EmbeddingModel(tokenizer=...)`` and ``from_pretrained`` accept.

    Example:
        >>> as_tokenizer(None) is None
        True
    """
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        return TextTokenizer.from_pretrained(tokenizer)
    return TextTokenizer.wrap(tokenizer)


def check_tokenizer_fits(
    tokenizer: TextTokenizer,
    num_embeddings: int,
    *,
    source: str = "the tokenizer",
    table: str = "the model's embedding table",
) -> None:
    """Raise ValueError when ``tokenizer`` has a token id >= ``num_embeddings`` (the rows of a
    model's embedding table): such a pair loads, then fails with an IndexError at the first text
    holding that token. Fewer ids than rows is normal (padded vocabularies, e.g. 32768 rows for
    32000 tokens). ``source`` and ``table`` name the tokenizer (a file or an argument) and the
    embedding table (which model) in the message.

    Example:
        >>> check_tokenizer_fits(tok, model.backbone.config.vocab_size, source="tokenizer=")  # doctest: +SKIP
    """
    if tokenizer.backend == "tokenizers":
        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    else:
        vocab = tokenizer.tokenizer.get_vocab()  # added tokens included
    # The largest id, not the count: vocabularies may have gaps.
    ids = max(vocab.values(), default=-1) + 1
    if ids > num_embeddings:
        raise ValueError(
            f"{source} has {ids} ids (largest {ids - 1}) but {table} has {num_embeddings} rows: "
            f"token ids >= {num_embeddings} would fail at encode; use the tokenizer the model was "
            "trained with"
        )


@dataclass
class TokenizedTexts:
    """Output of ``tokenize_with_prompts``, one entry per text (lists of Python ints / bools).

    ``input_ids[i]`` and ``pool_mask[i]`` have the same length (>= 1, with >= 1 True in the mask);
    ``truncated[i]``: text tokens were dropped to fit ``max_length``; ``num_instruction_tokens[i]``:
    tokens whose span lies wholly inside the prefix (the exact rule, whatever the mask mode).
    """

    input_ids: list[list[int]]
    pool_mask: list[list[bool]]
    truncated: list[bool]
    num_instruction_tokens: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def pack(self) -> PackedBatch:
        return pack_sequences(self.input_ids, self.pool_mask)


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, not a single str (wrap it in a list)")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


def tokenize_with_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    prefix: str | Sequence[str] = "",
    *,
    max_length: int | None = None,
    add_eos: bool = True,
    mask_instruction: str = "exact",
) -> TokenizedTexts:
    """Tokenise ``prefix + text`` for every text and build the pool masks.

    Args:
        tokenizer: TextTokenizer, tokenizers.Tokenizer or transformers fast tokenizer.
        texts: N strings (empty strings allowed).
        prefix: one prefix for all texts, or N prefixes (``""`` = none).
        max_length: at most this many tokens per sequence; text tokens are dropped from the end,
            the prefix (every token holding prefix characters) and the leading/trailing special
            tokens (BOS, EOS, [SEP]) are kept. ValueError when they alone do not fit.
        add_eos: append the EOS id unless the tokenizer's output already ends with it.
        mask_instruction: ``"exact"``: exclude exactly the tokens whose character span lies inside
            the prefix (a token straddling the boundary carries text and is pooled; special tokens
            are pooled). ``"nvembed_compat"``: exclude the first ``count_tokens(prefix)`` positions,
            as NV-Embed does (BOS is excluded, the last instruction token stays pooled); truncation
            then cuts after the appended EOS, so an over-long text loses its EOS, as there.
            ``"none"``: pool every token.

    Returns:
        TokenizedTexts (every sequence keeps >= 1 pooled position: if the rule leaves none, e.g. an
        empty text with add_eos=False, the last token is pooled).

    Example::

        out = tokenize_with_prompts(tok, ["a cat", ""], "search_query: ", max_length=64)
        out.pool_mask[0]   # False for the prefix's tokens, True for the text's, BOS and EOS
    """
    if mask_instruction not in MASK_MODES:
        raise ValueError(f"mask_instruction must be one of {MASK_MODES}, got {mask_instruction!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    texts = _check_texts(texts)
    if isinstance(prefix, str):
        prefixes = [prefix] * len(texts)
    else:
        prefixes = list(prefix)
        if len(prefixes) != len(texts):
            raise ValueError(f"prefix has {len(prefixes)} entries for {len(texts)} texts")
        for i, p in enumerate(prefixes):
            if not isinstance(p, str):
                raise TypeError(f"prefix[{i}] must be a str, got {type(p).__name__}")
    tok = TextTokenizer.wrap(tokenizer)
    eos = tok.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token (set it, or pass add_eos=False)")
    compat_n: dict[str, int] = {}
    out = TokenizedTexts([], [], [], [])
    encodings = tok.encode_with_offsets([p + t for p, t in zip(prefixes, texts)])
    for i, (p, (ids, offsets, special)) in enumerate(zip(prefixes, encodings)):
        P = len(p)
        added = [s and a == b for s, (a, b) in zip(special, offsets)]  # post-processor specials
        # (a zero-width non-special token at P comes from trim_offsets moving a span of spaces
        # that ended at P to P: its characters lie in the prefix)
        instr = [not z and P > 0 and b <= P for z, (a, b) in zip(added, offsets)]
        lead = next((j for j, sp in enumerate(special) if not sp), len(ids))  # leading specials
        holds_prefix = [j for j in range(len(ids)) if instr[j] or (not added[j] and offsets[j][0] < P)]
        head = max(lead, holds_prefix[-1] + 1 if holds_prefix else 0)
        ids, instr, special = list(ids), list(instr), list(special)
        if add_eos and (not ids or ids[-1] != eos):
            ids.append(eos)
            instr.append(False)
            special.append(True)
        if add_eos:
            special[-1] = True  # a literal EOS ending the text is kept last too
        # trailing specials survive truncation; NV-Embed truncates its appended EOS like text
        tail = (
            0
            if mask_instruction == "nvembed_compat"
            else len(ids) - next((j + 1 for j in reversed(range(len(ids))) if not special[j]), 0)
        )
        head = min(head, len(ids) - tail)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            if head + tail > max_length:
                raise ValueError(
                    f"max_length={max_length} cannot hold the prefix and special tokens of "
                    f"text {i} ({head + tail} tokens); raise max_length or shorten the prefix"
                )
            keep = max_length - tail
            ids = ids[:keep] + ids[len(ids) - tail :]
            instr = instr[:keep] + instr[len(instr) - tail :]
        if not ids:
            raise ValueError(f"text {i} and its prefix produced no tokens (empty, and add_eos=False or no EOS)")
        if mask_instruction == "exact":
            mask = [not x for x in instr]
        elif mask_instruction == "none":
            mask = [True] * len(ids)
        else:
            if p not in compat_n:
                compat_n[p] = tok.count_tokens(p)
            mask = [j >= compat_n[p] for j in range(len(ids))]
        if not any(mask):
            mask[-1] = True
        out.input_ids.append(ids)
        out.pool_mask.append(mask)
        out.truncated.append(truncated)
        out.num_instruction_tokens.append(sum(instr))
    return out


@dataclass
class PackedBatch:
    """B sequences concatenated without padding.

    input_ids [T] int64, cu_seqlens [B+1] int32 (sequence b is ``input_ids[cu_seqlens[b]:cu_seqlens[b+1]]``),
    pool_mask [T] bool, max_seqlen = longest sequence (int, host side).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pool_mask: torch.Tensor
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64 sequence lengths."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device), self.cu_seqlens.to(device), self.pool_mask.to(device), self.max_seqlen
        )

    def padded(self, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids [B, L] int64, attention_mask [B, L] bool, pool_mask [B, L] bool),
        L = max_seqlen; padded positions hold ``pad_token_id`` and False in both masks."""
        lengths = self.lengths
        B, L = self.batch_size, self.max_seqlen
        device = self.input_ids.device
        attention_mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
        ids = torch.full((B, L), int(pad_token_id), dtype=self.input_ids.dtype, device=device)
        pool = torch.zeros((B, L), dtype=torch.bool, device=device)
        ids[attention_mask] = self.input_ids  # row-major order of the mask = packed order
        pool[attention_mask] = self.pool_mask
        return ids, attention_mask, pool


def pack_sequences(input_ids: Sequence[Sequence[int]], pool_mask: Sequence[Sequence[bool]]) -> PackedBatch:
    """Pack B token-id lists (and their pool masks, same lengths) into a PackedBatch.

    >>> b = pack_sequences([[1, 2, 3], [4]], [[False, True, True], [True]])
    >>> b.cu_seqlens.tolist(), b.max_seqlen, b.num_tokens
    ([0, 3, 4], 3, 4)
    """
    input_ids, pool_mask = list(input_ids), list(pool_mask)
    if len(input_ids) != len(pool_mask):
        raise ValueError(f"input_ids has {len(input_ids)} sequences but pool_mask has {len(pool_mask)}")
    lengths = []
    for b, (ids, mask) in enumerate(zip(input_ids, pool_mask)):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {b}: {len(ids)} input_ids but {len(mask)} pool_mask entries")
        if len(ids) == 0:
            raise ValueError(f"sequence {b} is empty; every packed sequence needs >= 1 token")
        lengths.append(len(ids))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    flat_ids = [int(t) for ids in input_ids for t in ids]
    flat_mask = [bool(m) for mask in pool_mask for m in mask]
    return PackedBatch(
        torch.tensor(flat_ids, dtype=torch.int64),
        cu,
        torch.tensor(flat_mask, dtype=torch.bool),
        max(lengths, default=0),
    )
