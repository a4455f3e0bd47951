"""Ops with reference, Triton and CUDA implementations behind one validating function each."""

from . import infonce as _infonce
from . import latent_attention as _latent_attention
from . import masked_mean as _masked_mean
from . import multi_lora as _multi_lora
from .dispatch import BackendUnavailableError
from .infonce import CandidateRule, infonce_lse, infonce_lse_ref, infonce_per_query_loss
from .latent_attention import (
    geglu_segment_mean,
    geglu_segment_mean_ref,
    latent_cross_attention,
    latent_cross_attention_ref,
)
from .masked_mean import masked_mean_pool, masked_mean_pool_ref
from .multi_lora import LoRAGrouping, group_by_adapter, multi_lora_linear_add, multi_lora_linear_add_ref

# Every public op and its backends, fastest first; `python -m latentembed info` reads this.
OPS = {
    "masked_mean_pool": _masked_mean.BACKENDS,
    "latent_cross_attention": _latent_attention.ATTENTION_BACKENDS,
    "geglu_segment_mean": _latent_attention.GEGLU_BACKENDS,
    "infonce_lse": _infonce.BACKENDS,
    "multi_lora_linear_add": _multi_lora.BACKENDS,
}

__all__ = [
    "BackendUnavailableError",
    "CandidateRule",
    "OPS",
    "geglu_segment_mean",
    "geglu_segment_mean_ref",
    "group_by_adapter",
    "infonce_lse",
    "infonce_lse_ref",
    "infonce_per_query_loss",
    "latent_cross_attention",
    "latent_cross_attention_ref",
    "LoRAGrouping",
    "masked_mean_pool",
    "masked_mean_pool_ref",
    "multi_lora_linear_add",
    "multi_lora_linear_add_ref",
]
