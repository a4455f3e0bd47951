"""Fully sharded data parallelism (``train --fsdp``): the model's parameters, gradients and
optimizer state split across the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each decoder layer is one FSDP unit (its weights are gathered just before it runs and freed
after), so is a pooling head with weights (the latent-attention block); the embeddings and the
final norm form the root unit. Mixed precision: parameters are gathered in the autocast dtype (bf16 on CUDA)
and gradients reduced in float32; on CPU everything stays float32. What the rest of the trainer
sees is the same module with DTensor parameters: the same forward (multi-LoRA routing,
gradient checkpointing, GradCache, the loss's cross-rank gather), ``optimizer.step`` on the
local shards, and these helpers where a whole tensor is needed (clipping, evaluation, saving).

Example (under ``torchrun``, every rank)::

    >>> module = shard_model(model, mesh=make_mesh(torch.device("cpu"), world=2), param_dtype=None)  # doctest: +SKIP
    >>> full = full_state_dict(model)          # rank 0: {name: CPU tensor}; others: {}  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..models.embedding import EmbeddingModel

__all__ = ["make_mesh", "shard_model", "is_sharded", "clip_grad_norm", "full_state_dict", "unsharded_copy"]


def make_mesh(device: torch.device, *, world: int):
    """The 1-D device mesh of every rank (an initialised process group is required)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard_model(model: EmbeddingModel, *, mesh, param_dtype: Optional[torch.dtype]) -> EmbeddingModel:
    """Shard ``model`` in place: every decoder layer its own unit, the pooling head (when it has
    weights) another, the rest (embeddings, final norm) the root. ``param_dtype``: the dtype
    the weights are gathered in for compute (None: their own, float32); gradients are always
    reduced in float32 (a bf16 reduction over many ranks loses the small gradients of a
    contrastive loss). Returns
    ``model`` (now an FSDP module: call its forward as before)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.backbone.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    if any(True for _ in model.pooling.parameters()):
        # NV-Embed's latent block is 0.74 B parameters: its own unit, so it is gathered only
        # while it runs (in the root it would stay whole through the backbone's forward).
        fully_shard(model.pooling, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard_model` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded (DTensor) and plain parameters together (a learnable
    temperature is plain): the global 2-norm is sqrt(sum of squared shard norms over ranks + the
    plain ones'), then every gradient is scaled by min(1, max_norm / norm). Returns the norm []."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # the all-reduce over ranks
        squares = squares.to(norm.device) + norm.float() ** 2
    if plain:
        norm = torch.nn.utils.get_total_norm(plain, 2.0)
        squares = squares.to(norm.device) + norm.float() ** 2
    total = squares.sqrt()
    # clip_grads_with_norm_ leaves DTensor gradients unscaled in torch 2.13 (a foreach multiply
    # by a plain tensor, measured): scale the local shards in place instead.
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in sharded:
        g.to_local().mul_(coef.to(g.device))
    for g in plain:
        g.mul_(coef.to(g.device))
    return total


def full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict:
    """The whole tensors of a sharded ``model`` ({name: CPU tensor}) on rank 0, ``{}`` on the
    others. Collective: every rank calls it. ``trainable_only``: only parameters that train."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model: EmbeddingModel, state: dict) -> EmbeddingModel:
    """A plain (unsharded, CPU) model of the same architecture, adapters and tokenizer as the
    sharded ``model``, holding ``state`` (:func:`full_state_dict` on rank 0): what
    ``save_pretrained`` runs on at the end of a sharded run. Built on the meta device, so only
    ``state``'s tensors take memory."""
    if model.merged:  # a merged model's config no longer describes its weights
        raise ValueError("unsharded_copy: the sharded model has merged adapters; merge the copy instead")
    with torch.device("meta"):
        plain = EmbeddingModel(
            model.backbone.config, model.config, tokenizer=None, attn_backend=model.backbone.attn_backend
        )
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    buffers = {name for name, _ in plain.named_buffers()}
    missing = [m for m in missing if m not in buffers]
    if missing or unexpected:
        raise ValueError(
            f"unsharded_copy: state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    plain.backbone.reset_buffers(torch.device("cpu"))
    plain.tokenizer = model.tokenizer
    plain.template = model.template
    return plain
