"""latentembed: building blocks of LLM-based text-embedding models."""

from .ops import BackendUnavailableError, masked_mean_pool, masked_mean_pool_ref

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "masked_mean_pool", "masked_mean_pool_ref", "__version__"]
