"""NV-Embed's latent-attention block as a sentence-transformers custom module (standalone).

latentembed copies this file, unchanged, to the root of a sentence-transformers directory
exported from a latent-attention model (``save_pretrained(dir, format="sentence-transformers")``)
as ``latentembed_latent_attention.py``; ``modules.json`` names its class
``latentembed_latent_attention.LatentAttentionBlock``, so ``SentenceTransformer(dir,
trust_remote_code=True)`` runs: backbone -> this block on every token -> mean Pooling (instruction
tokens excluded as ``include_prompt`` says) -> Normalize. It imports only torch and safetensors:
the exported directory does not need latentembed.

The block is the public NV-Embed-v2 one (latentembed's ``UnfoldedLatentAttentionPooling``
without its mean): ``h = x + CrossAttn(LN(x), LN(latents))``, ``out = h + FF(LN(h))`` with a
GEGLU feed-forward; parameter names are the checkpoint's (``latents``,
``cross_attend_blocks.{0,1}...``). Shapes: ``token_embeddings`` [B, L, D] in, [B, L, D] out.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context_dim=None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x, context=None):
        if self.norm_context is None:
            return self.fn(self.norm(x))
        return self.fn(self.norm(x), self.norm_context(context))


class _CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x, context):
        def heads_first(t):  # [B, N, h*d] -> [B, h, N, d]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = heads_first(self.to_q(x))
        k, v = map(heads_first, self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _GEGLU(nn.Module):
    def forward(self, a):
        value, gate = a.chunk(2, dim=-1)
        return value * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * mult * dim), _GEGLU(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class LatentAttentionBlock(nn.Module):
    """Token-wise latent cross-attention + GEGLU feed-forward (both residual).

    Args: hidden_size D, num_latents R, num_heads H, dim_head, ff_mult, latent_dim (default D).
    Forward: ``features["token_embeddings"]`` [B, L, D] is replaced by the block's output."""

    def __init__(
        self,
        hidden_size: int,
        num_latents: int,
        num_heads: int,
        dim_head: int,
        ff_mult: int,
        latent_dim=None,
    ):
        super().__init__()
        latent_dim = hidden_size if latent_dim is None else latent_dim
        self.config = dict(
            hidden_size=hidden_size,
            num_latents=num_latents,
            num_heads=num_heads,
            dim_head=dim_head,
            ff_mult=ff_mult,
            latent_dim=latent_dim,
        )
        self.cross_attend_blocks = nn.ModuleList(
            [
                _PreNorm(hidden_size, _CrossAttention(hidden_size, latent_dim, num_heads, dim_head), latent_dim),
                _PreNorm(hidden_size, _FeedForward(hidden_size, ff_mult)),
            ]
        )
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))

    def forward(self, features: dict) -> dict:
        hidden = features["token_embeddings"]
        x = hidden.to(self.latents.dtype)  # the block runs in its weights' dtype
        cross_attn, cross_ff = self.cross_attend_blocks
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        h = cross_attn(x, latents) + x
        features["token_embeddings"] = (cross_ff(h) + h).to(hidden.dtype)
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, CONFIG_NAME), "w") as fh:
            json.dump(self.config, fh, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(output_path, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def load(cls, input_path: str) -> LatentAttentionBlock:
        from safetensors.torch import load_file

        with open(os.path.join(input_path, CONFIG_NAME)) as fh:
            config = json.load(fh)
        module = cls(**config)
        module.load_state_dict(load_file(os.path.join(input_path, WEIGHTS_NAME)), strict=True)
        return module
