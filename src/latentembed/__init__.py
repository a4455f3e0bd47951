"""latentembed: building blocks of LLM-based text-embedding models.

Layers import downward only: ``training`` and ``evaluation`` use ``models`` (configs, the decoder,
the embedding model, checkpoint I/O), which use ``prompts`` / ``tokenization`` (instruction
templates, pool masks, packing) and ``modules`` (norms, attention, pooling, LoRA, losses), which
call ``ops`` (reference / Triton / CUDA kernels).
"""

from .evaluation import evaluate_retrieval, exact_search, retrieval_metrics
from .models.checkpoint import CheckpointError, load_decoder, save_decoder
from .models.decoder import DecoderModel, DecoderOutput
from .models.decoder_config import DecoderConfig
from .models.embedding import EmbeddingModel
from .models.embedding_config import EmbeddingConfig, LoRAConfig
from .modules.contrastive import InfoNCELoss, InfoNCEOptions, InfoNCEOutput, cosine_normalize, infonce_loss
from .modules.distributed import all_gather_with_grad
from .modules.grad_cache import grad_cache_step
from .modules.latent_attention import LatentAttentionPooling
from .modules.latent_attention_unfolded import UnfoldedLatentAttentionPooling
from .modules.lora import MultiLoRALinear, apply_multi_lora, lora_routing
from .modules.peft_interop import load_peft_adapter, save_peft_adapter
from .modules.pooling import POOLING_MODES, Pooling, pool
from .ops import (
    BackendUnavailableError,
    geglu_segment_mean,
    group_by_adapter,
    infonce_lse,
    infonce_per_query_loss,
    latent_cross_attention,
    masked_mean_pool,
    masked_mean_pool_ref,
    multi_lora_linear_add,
)
from .prompts import TEMPLATES, PromptTemplate, TaskPrompt, get_template, resolve_prompt
from .tokenization import PackedBatch, TextTokenizer, pack_sequences, tokenize_with_prompts
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "DecoderConfig",
    "DecoderModel",
    "DecoderOutput",
    "EmbeddingConfig",
    "EmbeddingModel",
    "InfoNCELoss",
    "InfoNCEOptions",
    "InfoNCEOutput",
    "LatentAttentionPooling",
    "LoRAConfig",
    "MultiLoRALinear",
    "POOLING_MODES",
    "PackedBatch",
    "Pooling",
    "PromptTemplate",
    "TEMPLATES",
    "TaskPrompt",
    "TextTokenizer",
    "TrainConfig",
    "UnfoldedLatentAttentionPooling",
    "__version__",
    "all_gather_with_grad",
    "apply_multi_lora",
    "cosine_normalize",
    "evaluate_retrieval",
    "exact_search",
    "geglu_segment_mean",
    "get_template",
    "grad_cache_step",
    "group_by_adapter",
    "infonce_loss",
    "infonce_lse",
    "infonce_per_query_loss",
    "latent_cross_attention",
    "load_decoder",
    "load_peft_adapter",
    "lora_routing",
    "masked_mean_pool",
    "masked_mean_pool_ref",
    "multi_lora_linear_add",
    "pack_sequences",
    "pool",
    "resolve_prompt",
    "retrieval_metrics",
    "save_decoder",
    "save_peft_adapter",
    "tokenize_with_prompts",
    "train",
]
