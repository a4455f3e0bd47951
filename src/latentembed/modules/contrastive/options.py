"""The options of the InfoNCE loss, validated once, and the temperature -> scale conversion."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import torch

from ...ops import checks

__all__ = ["InfoNCEOptions", "check_temperature", "scale_from_temperature"]

REDUCTIONS = ("mean", "sum", "none")
NEGATIVES_ORDERS = ("blocks", "per_query")
SIMILARITIES = ("cos", "dot")


@dataclasses.dataclass(frozen=True)
class InfoNCEOptions:
    """Every option of :func:`~latentembed.modules.contrastive.infonce_loss` that is not an input
    tensor or the temperature; checked on construction.

    Attributes:
        negatives_order: ``"blocks"`` or ``"per_query"``, the order of the hard negatives after
            the B positives (see infonce_loss's layouts).
        similarity: ``"cos"`` (rows L2-normalised first) or ``"dot"``.
        in_batch_negatives: False: query i only scores its positive and its own hard negatives
            (the layouts imply ownership; with ``pos_index`` pass ``doc_owner`` [N], -1 = none).
            The implied-ownership layouts then compute just the [B, 1 + k] scores (batched dots,
            float32 accumulation); ``doc_owner`` goes through the op's generic masked pass.
            Nothing is gathered across ranks (a query's own documents are local), and the
            ``symmetric`` term is 0 (a positive's only candidate is its own query).
        symmetric: average with the document-to-query loss (each positive against all queries).
        query_query, doc_doc: GTE's extra in-batch denominator terms: ``s(q_i, q_j)`` over the
            other queries and ``s(d+_i, d_j)`` over every document but d+_i itself (the query's
            own hard negatives included; sentence-transformers' doc_to_doc drops those too).
            Need in-batch negatives. With an explicit ``pos_index``, ``doc_doc`` reorders the
            documents (one copy) and needs distinct positives.
        threshold: ignore a candidate whose raw similarity exceeds it.
        margin: ignore a candidate whose raw similarity exceeds ``margin * s(q_i, d+_i)``
            (NV-Retriever's positive-aware rule, e.g. 0.95; meant for cosine similarity).
            ``threshold`` and ``margin`` apply to every term's candidates.
        mask_duplicates: ignore documents bitwise equal to the positive (after normalisation for
            ``"cos"``); ``doc_ids`` [N] int64 (row order of the concatenated documents) instead
            ignores documents whose id equals the positive's (no flag needed). Applied to every
            term: query-to-document and ``doc_doc`` drop duplicates of d+_i; document-to-query
            and ``query_query`` drop the queries whose positive duplicates d+_i (same answer:
            a false negative). The positive itself always stays.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` ([B] float32 per-query losses).
        gather: gather queries and documents from every rank (gradients flow back; see
            :mod:`latentembed.modules.distributed`). ``None``: when torch.distributed is
            initialised with several ranks. Each rank's loss covers its own queries. With the
            same B on every rank and ``reduction="mean"``, DDP's averaging of parameter
            gradients gives the gradient of the mean over all ranks' queries, as one process on
            the concatenated batch would; with unequal B use ``reduction="sum"`` divided by the
            global number of queries.
        group: the process group to gather over (None: the default group).
        same_sizes: promise that every rank holds the same B and N: skips the per-call exchange
            of sizes (a collective and a host sync). A false promise fails in the collective.
        backend: passed to the op (``infonce_lse``'s ``backend``).
        validate: check index values, the temperature and (``doc_doc`` with ``pos_index``)
            distinct positives in one host sync; the op's own checks are then skipped.

    Example:
        >>> InfoNCEOptions(symmetric=True, margin=0.95).directions
        ('query_to_doc', 'doc_to_query')
    """

    negatives_order: str = "blocks"
    similarity: str = "cos"
    in_batch_negatives: bool = True
    symmetric: bool = False
    query_query: bool = False
    doc_doc: bool = False
    threshold: Optional[float] = None
    margin: Optional[float] = None
    mask_duplicates: bool = False
    reduction: str = "mean"
    gather: Optional[bool] = None
    group: Any = None
    same_sizes: bool = False
    backend: str = "auto"
    validate: bool = True

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be 'cos' or 'dot', got {self.similarity!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.negatives_order not in NEGATIVES_ORDERS:
            raise ValueError(f"negatives_order must be one of {NEGATIVES_ORDERS}, got {self.negatives_order!r}")
        if not self.in_batch_negatives and (self.query_query or self.doc_doc):
            raise ValueError("query_query and doc_doc are in-batch terms; they need in_batch_negatives=True")

    @classmethod
    def names(cls) -> frozenset:
        """The option names (the dataclass's fields)."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @property
    def directions(self) -> tuple[str, ...]:
        """The loss terms these options ask for, keyed by direction (see ``terms.TERMS``)."""
        extra = [
            name
            for name, on in (
                ("query_to_query", self.query_query),
                ("doc_to_doc", self.doc_doc),
                ("doc_to_query", self.symmetric),
            )
            if on
        ]
        return ("query_to_doc", *extra)

    def changed(self) -> dict:
        """The options that differ from their defaults, by name (for a module's repr)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def check_temperature(
    temperature: float, acc: torch.dtype, scale_of: Callable[[float], float] = lambda t: 1.0 / t
) -> None:
    """``temperature`` > 0 and finite, with its scale (``scale_of(temperature)``, 1 / temperature
    as the caller computes it) a normal ``acc`` number: the logits are ``scores * scale`` in acc
    (float32, or float64 for float64 inputs)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if not checks.is_positive_normal(scale_of(temperature), acc):
        lo, hi = checks.normal_range(acc)
        raise ValueError(
            f"temperature must lie in [{1 / hi:.3g}, {1 / lo:.3g}] so that 1 / temperature is a normal "
            f"{checks.dtype_name(acc)} number (the dtype the logits are computed in), got {temperature:g} "
            f"(1 / temperature = {1.0 / temperature:g})"
        )


def scale_from_temperature(
    temperature: Union[float, torch.Tensor], acc: torch.dtype, device: torch.device, values: checks.ValueChecks
) -> torch.Tensor:
    """0-dim ``1 / temperature`` on ``device``: a float is checked now; a tensor's value joins
    ``values`` (read with the other value checks in one host sync) and its scale keeps its
    gradient. float32 at least: every term's scale gradient then sums in float32 and is rounded
    to the temperature's dtype once (a half scale would round each term's part before they cancel)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.ndim != 0 or not temperature.dtype.is_floating_point:
            raise ValueError(
                f"temperature must be a float or a 0-dim floating tensor, got "
                f"{temperature.dtype} {tuple(temperature.shape)}"
            )
        values.add([temperature], lambda value: check_temperature(value, acc))
        return 1.0 / temperature.to(device=device, dtype=torch.promote_types(temperature.dtype, acc))
    value = float(temperature)
    check_temperature(value, acc)
    return torch.tensor(1.0 / value, dtype=acc, device=device)
