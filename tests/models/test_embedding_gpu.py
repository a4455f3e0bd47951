"""EmbeddingModel and the trainer on a CUDA GPU: bf16, the packed (flash / varlen) path.

Skipped on CPU machines; scripts/gpu_check.sh runs them on the H100.
"""

import pytest
import torch

from latentembed.training.trainer import TrainConfig, train

from .decoder_helpers import rel_err
from .test_embedding_model import TEXTS, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pooling", ["mean", "last", "latent_attention"])
def test_bf16_encode_packed_equals_padded_and_tracks_fp32(pooling):
    model = tiny_model(pooling, adapters=["query"])
    reference = model.encode(TEXTS)  # fp32 on CPU
    model.to("cuda", torch.bfloat16)
    batch, adapter, _ = model.tokenize(TEXTS)
    batch = batch.to("cuda")
    with torch.no_grad():
        packed = model.embed_batch(batch, adapter, packed=True).float()
        padded = model.embed_batch(batch, adapter, packed=False).float()
    # the same bf16 math in two layouts: only accumulation order differs
    assert rel_err(packed, padded) <= 2e-2
    out = model.encode(TEXTS)  # auto: packed, since a varlen / flash kernel exists for bf16
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert rel_err(out.cpu(), reference) <= 5e-2


def test_bf16_autocast_training_step_on_cuda(tmp_path):
    result = train(
        TrainConfig(steps=4, stage2_steps=2, batch_size=8, device="cuda", eval=False, quiet=True, output=str(tmp_path))
    )
    losses = [e["loss"] for e in result["loss_history"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert next(result["model"].parameters()).device.type == "cuda"
    assert (tmp_path / "model" / "model.safetensors").is_file()
