"""latentembed: building blocks of LLM-based text-embedding models.

Layers import downward only: ``models`` (configs, the decoder, checkpoint I/O) use ``modules``
(norms, attention, pooling, LoRA, losses), which call ``ops`` (reference / Triton / CUDA kernels).
"""

from .models.checkpoint import CheckpointError, load_decoder, save_decoder
from .models.config import DecoderConfig
from .models.decoder import DecoderModel, DecoderOutput
from .modules.contrastive import InfoNCELoss, InfoNCEOutput, cosine_normalize, infonce_loss
from .modules.distributed import all_gather_with_grad
from .modules.grad_cache import grad_cache_step
from .modules.latent_attention import LatentAttentionPooling
from .modules.latent_attention_reference import LatentAttentionPoolingReference
from .modules.lora import MultiLoRALinear, apply_multi_lora, lora_routing
from .modules.peft_interop import load_peft_adapter, save_peft_adapter
from .modules.pooling import POOLING_MODES, Pooling, pool
from .ops import (
    BackendUnavailableError,
    geglu_segment_mean,
    group_by_adapter,
    infonce_lse,
    latent_cross_attention,
    masked_mean_pool,
    masked_mean_pool_ref,
    multi_lora_linear_add,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "DecoderConfig",
    "DecoderModel",
    "DecoderOutput",
    "InfoNCELoss",
    "InfoNCEOutput",
    "LatentAttentionPooling",
    "LatentAttentionPoolingReference",
    "MultiLoRALinear",
    "POOLING_MODES",
    "Pooling",
    "__version__",
    "all_gather_with_grad",
    "apply_multi_lora",
    "cosine_normalize",
    "geglu_segment_mean",
    "grad_cache_step",
    "group_by_adapter",
    "infonce_loss",
    "infonce_lse",
    "latent_cross_attention",
    "load_decoder",
    "load_peft_adapter",
    "lora_routing",
    "masked_mean_pool",
    "masked_mean_pool_ref",
    "multi_lora_linear_add",
    "pool",
    "save_decoder",
    "save_peft_adapter",
]
