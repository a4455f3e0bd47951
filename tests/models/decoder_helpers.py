"""Shared helpers of the decoder tests: tiny random transformers models saved as safetensors."""

from __future__ import annotations

import math

import torch

FAMILIES = ("mistral", "llama", "qwen2")
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)


def hf_config(family: str, **overrides):
    import transformers

    cls = {"mistral": transformers.MistralConfig, "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[
        family
    ]
    kwargs = dict(TINY)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


def hf_model(family: str, **overrides):
    """A transformers MistralModel / LlamaModel / Qwen2Model with weights large enough that
    attention is far from uniform (the default 0.02 init would hide mask and rotary errors)."""
    import transformers

    cls = {"mistral": transformers.MistralModel, "llama": transformers.LlamaModel, "qwen2": transformers.Qwen2Model}[
        family
    ]
    model = cls(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            else:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
    return model


def save_hf(model, path, **kwargs) -> None:
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)


def random_batch(lengths, vocab: int = 128, left: bool = False):
    """input_ids [B, L] and bool mask [B, L] for ``lengths``, right (or left) padded."""
    L = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), L))
    pos = torch.arange(L)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = pos >= L - n if left else pos < n
    return ids, mask


def pack(ids: torch.Tensor, mask: torch.Tensor):
    """Packed ids [T] and int32 cu_seqlens [B+1] of the real tokens."""
    cu = torch.zeros(ids.shape[0] + 1, dtype=torch.int32)
    cu[1:] = mask.sum(-1).cumsum(0)
    return ids[mask], cu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def bidirectional_mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """transformers' custom-mask input: bool [B, 1, L, L], every query sees the real keys."""
    L = mask.shape[1]
    return mask[:, None, None, :].expand(-1, 1, L, L)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
