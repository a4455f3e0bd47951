"""Ops with reference, Triton and CUDA implementations behind one validating function each."""

from ._dispatch import BackendUnavailableError
from .masked_mean import masked_mean_pool, masked_mean_pool_ref

# Every public op and its backends, fastest first; `python -m latentembed info` reads this.
from . import masked_mean as _masked_mean

OPS = {"masked_mean_pool": _masked_mean.BACKENDS}

__all__ = ["BackendUnavailableError", "masked_mean_pool", "masked_mean_pool_ref", "OPS"]
