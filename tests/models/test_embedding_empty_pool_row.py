"""End to end: an fp16 EmbeddingModel whose batch has a text with nothing to pool (every token
an instruction token) trains without NaN, in every pooling mode; its embedding is zero."""

import pytest
import torch

from latentembed.models.decoder_config import DecoderConfig
from latentembed.models.embedding import EmbeddingModel
from latentembed.models.embedding_config import EmbeddingConfig

LATENT = dict(num_latents=4, num_heads=2, dim_head=16, ff_mult=2)


@pytest.mark.parametrize("pooling", ["latent_attention", "mean", "last", "weighted_mean"])
def test_fp16_text_with_nothing_to_pool_gives_finite_gradients(pooling):
    cfg = DecoderConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = EmbeddingConfig(
        pooling=pooling, normalize=True, latent_attention=LATENT if pooling == "latent_attention" else None
    )
    model = EmbeddingModel(cfg, config).half().train()
    ids = torch.randint(0, 128, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    pool_mask = torch.rand(3, 6) < 0.7
    pool_mask[:, -1] = True
    empty = int(torch.randint(0, 3, ()))
    pool_mask[empty] = False
    out = model(ids, mask, pool_mask=pool_mask)
    out.float().backward(torch.randn(out.shape))
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
