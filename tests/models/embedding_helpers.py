"""Shared helpers of the EmbeddingModel tests: tiny real checkpoints in each format, on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig
from latentembed.modules.latent_attention_unfolded import UnfoldedLatentAttentionPooling
from latentembed.modules.lora import multi_lora_layers
from tests.tokenizer_helpers import VOCAB_SIZE, build_tokenizer, hf_tokenizer

from .decoder_helpers import hf_model, save_hf

# A tiny latent head: R=6 latents, 2 heads of width 16, feed-forward 2x.
LATENT = dict(num_latents=6, num_heads=2, dim_head=16, ff_mult=2)
HIDDEN = 64
QUERY_INSTRUCTION = "Given a question, retrieve passages that answer the question"


def plain_decoder_dir(path: Path, family: str = "mistral", tokenizer: str = "metaspace") -> Path:
    """A transformers ``*Model`` saved with save_pretrained (random weights) plus a tokenizer."""
    save_hf(hf_model(family, vocab_size=VOCAB_SIZE), path)
    build_tokenizer(tokenizer, path)
    return Path(path)


def nvembed_dir(path: Path, tokenizer: str = "metaspace"):
    """An NV-Embed-v2-style directory: ``embedding_model.*`` (a transformers MistralModel's
    tensors) + ``latent_attention_model.*`` (the public block's), its nested config.json.
    Returns (path, the transformers backbone, the reference latent block)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = hf_model("mistral", vocab_size=VOCAB_SIZE)
    head = UnfoldedLatentAttentionPooling(hidden_size=HIDDEN, **LATENT).eval()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_context.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    tensors = {"embedding_model." + k: v.contiguous() for k, v in backbone.state_dict().items()}
    tensors.update({"latent_attention_model." + k: v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    text_config = backbone.config.to_dict()
    config = {
        "architectures": ["NVEmbedModel"],
        "model_type": "nvembed",
        "add_eos": True,
        "add_pad_token": True,
        "is_mask_instruction": True,
        "padding_side": "right",
        "mask_type": "b",
        "latent_attention_config": {
            "model_type": "latent_attention",
            "num_latents_value": LATENT["num_latents"],
            "num_cross_heads": LATENT["num_heads"],
            "output_normalize": True,
            "hidden_dim": HIDDEN,
            "latent_dim": HIDDEN,
            "cross_dim_head": LATENT["dim_head"],
        },
        "text_config": text_config,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer(tokenizer, path)
    return path, backbone, head


def tiny_model(pooling="mean", tokenizer="metaspace", adapters=None, **config) -> EmbeddingModel:
    """A random 2-layer Mistral-shaped EmbeddingModel with a tokenizer (``tokenizer_helpers``
    kinds), in eval mode; ``adapters``: names of LoRA adapters with random (nonzero) B."""
    cfg = DecoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    latent = dict(LATENT) if pooling == "latent_attention" else None
    model = EmbeddingModel(
        cfg, EmbeddingConfig(pooling=pooling, latent_attention=latent, **config), tokenizer=hf_tokenizer(tokenizer)
    ).eval()
    if adapters:
        model.add_adapters(adapters, rank=4, alpha=8)
        with torch.no_grad():  # fresh adapters are zero in B: make them matter
            for _, layer in multi_lora_layers(model):
                layer.lora_b.normal_(0, 0.3)
    return model
