"""InfoNCELoss: the InfoNCE loss as an nn.Module with a fixed or learnable temperature."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ...ops import checks
from .autograd import ClampStraightThrough
from .loss import InfoNCEOutput, infonce_loss_with_scale
from .options import InfoNCEOptions, check_temperature

__all__ = ["InfoNCELoss"]

# infonce_loss's keywords that belong to each call (or to the module itself), not to the options.
PER_CALL = ("hard_negatives", "doc_owner", "doc_ids", "return_stats", "temperature")


def _float32_exp(log_value: float) -> float:
    """exp of a float32 log, as :meth:`InfoNCELoss.scale` computes it (inf when it overflows)."""
    return float(torch.tensor(log_value, dtype=torch.float32).exp())


def _check_temperatures(temperature: float, temperature_range: tuple[float, float], learnable: bool) -> None:
    """The scale is exp(log_scale) in float32 (clamped to the range's log bounds when
    learnable): checked as computed, each bound too, or a scale can come out inf or 0."""
    lo, hi = (float(t) for t in temperature_range)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"temperature_range must be (min, max) with 0 < min <= max, got {temperature_range}")
    check_temperature(temperature, torch.float32, scale_of=lambda t: _float32_exp(math.log(1 / t)))
    if not all(checks.is_positive_normal(_float32_exp(math.log(1 / t)), torch.float32) for t in (lo, hi)):
        lo32, hi32 = checks.normal_range(torch.float32)
        raise ValueError(
            f"temperature_range must lie within [{1 / hi32:.3g}, {1 / lo32:.3g}] so that both ends give a "
            f"normal float32 scale 1 / temperature (the module keeps log(1 / temperature) in float32), "
            f"got {temperature_range}"
        )
    if learnable and not lo <= temperature <= hi:
        raise ValueError(f"temperature {temperature} must lie in temperature_range {temperature_range}")


class InfoNCELoss(nn.Module):
    """InfoNCE loss module with a fixed or learnable temperature; see :func:`infonce_loss`.

    A learnable temperature is stored as ``log_scale = log(1 / temperature)`` and clamped to
    ``temperature_range`` (default 0.01 to 1.0, i.e. scales 1 to 100 as in CLIP) in the forward
    pass. The clamp is straight-through for steps back into the range: a ``log_scale`` that
    overshot still gets the gradient when descent moves it towards the range (a plain clamp
    would freeze it), and none when descent would push it further out.

    Args:
        temperature: initial (or fixed) temperature, > 0 and inside ``temperature_range``.
        learnable_temperature: make ``log_scale`` an ``nn.Parameter``.
        temperature_range: ``(min, max)`` temperatures for the clamp. The scale is kept as a
            float32 ``log(1 / temperature)``: temperatures (and both bounds) must lie in
            [2.94e-39, 8.51e37], or the float32 scale would overflow to inf or underflow.
        **options: the loss's options fixed at construction, checked here: the fields of
            :class:`InfoNCEOptions` (similarity, in_batch_negatives, symmetric, query_query,
            doc_doc, threshold, margin, mask_duplicates, negatives_order, reduction, gather,
            group, same_sizes, backend, validate); kept in ``self.options``.

    Forward: ``(queries, documents, pos_index=None, *, hard_negatives=None, doc_owner=None,
    doc_ids=None, return_stats=False)``.

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.02, learnable_temperature=True, margin=0.95)
        >>> q, d = torch.randn(4, 8), torch.randn(8, 8)  # 4 positives + 1 negative each
        >>> loss_fn(q, d).backward()
    """

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        learnable_temperature: bool = False,
        temperature_range: tuple[float, float] = (0.01, 1.0),
        **options,
    ) -> None:
        super().__init__()
        temperature = float(temperature)
        _check_temperatures(temperature, temperature_range, learnable_temperature)
        bad = sorted(set(options) & set(PER_CALL)) + sorted(set(options) - InfoNCEOptions.names() - set(PER_CALL))
        if bad:
            raise TypeError(f"InfoNCELoss got unexpected or per-call options {bad}")
        self.options = InfoNCEOptions(**options)
        self.learnable_temperature = learnable_temperature
        lo, hi = (float(t) for t in temperature_range)
        self.log_scale_range = (math.log(1 / hi), math.log(1 / lo))
        log_scale = torch.tensor(math.log(1 / temperature), dtype=torch.float32)
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def scale(self) -> torch.Tensor:
        """0-dim float32 ``1 / temperature`` (clamped when learnable)."""
        if not self.learnable_temperature:
            return self.log_scale.exp()
        return ClampStraightThrough.apply(self.log_scale, *self.log_scale_range).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def forward(
        self,
        queries: torch.Tensor,
        documents: torch.Tensor,
        pos_index: Optional[torch.Tensor] = None,
        *,
        hard_negatives: Optional[torch.Tensor] = None,
        doc_owner: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        return_stats: bool = False,
    ) -> Union[torch.Tensor, InfoNCEOutput]:
        return infonce_loss_with_scale(
            queries,
            documents,
            pos_index,
            scale=self.scale(),
            options=self.options,
            hard_negatives=hard_negatives,
            doc_owner=doc_owner,
            doc_ids=doc_ids,
            return_stats=return_stats,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.changed().items())
        head = f"temperature={self.temperature:.4g}, learnable={self.learnable_temperature}"
        return head + (f", {opts}" if opts else "")
