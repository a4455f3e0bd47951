"""InfoNCE contrastive loss for embedding training, scored by the fused ``infonce_lse`` op.

``loss_i = -log( exp(s(q_i, d+_i) / tau) / sum_{j in C(i)} exp(s(q_i, d_j) / tau) )``, where the
candidate set C(i) holds the positive, the in-batch documents (or only the query's own hard
negatives) minus masked false negatives. Every logsumexp goes through
:func:`latentembed.ops.contrastive.infonce_lse`, so on a GPU the [B, N] score matrix is never
stored. See :func:`infonce_loss` for the options and :class:`InfoNCELoss` for the module.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from ..ops import _checks
from ..ops.contrastive import infonce_lse
from .contrastive_functions import (
    _ClampStraightThrough,
    _OwnedScores,
    _row_chunks,
    _RowDot,
    cosine_normalize,
)
from .distributed import all_gather_no_grad, all_gather_with_grad, distributed_world, gather_sizes

__all__ = ["InfoNCELoss", "InfoNCEOutput", "infonce_loss", "duplicate_keys", "cosine_normalize"]

_REDUCTIONS = ("mean", "sum", "none")
_ORDERS = ("blocks", "per_query")


class InfoNCEOutput(NamedTuple):
    """``loss``: reduced loss (or [B] with ``reduction="none"``); ``rank`` [B] int64: candidates
    scoring strictly above each query's positive (0 = retrieved first); ``accuracy``: 0-dim
    float32, the fraction of queries with rank 0."""

    loss: torch.Tensor
    rank: torch.Tensor
    accuracy: torch.Tensor


def duplicate_keys(documents: torch.Tensor) -> torch.Tensor:
    """[N] int64 ids, equal exactly for bitwise-equal rows of ``documents`` [N, D].

    Ids depend only on row contents (sorted unique rows), so every rank of a process group that
    holds the same gathered documents computes the same ids."""
    rows = documents.detach()
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}.get(rows.element_size())
    if ints is not None:
        rows = rows.contiguous().view(ints)  # bitwise equality: sorts integers, not floats
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def _check_emb(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    return x


def _check_index(name: str, x: object, length: int, layout: str, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64 or tuple(x.shape) != (length,):
        raise ValueError(f"{name} must be an int64 tensor of shape {layout} = ({length},), got "
                         f"{x.dtype} {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of queries ({ref.device}), got {x.device}")
    return x


def _resolve_layout(queries, documents, pos_index, hard_negatives, order, in_batch, doc_owner):
    """(docs [N, D], pos [B], owner [N] or None, positives_first) of the in-batch / generic path."""
    B, D = queries.shape
    arange = torch.arange(B, device=queries.device)
    if hard_negatives is not None:
        k = hard_negatives.shape[1]
        # The op scores one [N, D] document tensor, so in-batch negatives cost this one copy of
        # the documents (stage 2, in_batch_negatives=False, scores the [B, k, D] tensor as is).
        docs = torch.cat([documents, hard_negatives.reshape(B * k, D)])
        owner = torch.cat([arange, arange.repeat_interleave(k)])
        return docs, arange, None if in_batch else owner, True
    N = documents.shape[0]
    if pos_index is None:
        k = N // B - 1
        neg_owner = arange.repeat(k) if order == "blocks" else arange.repeat_interleave(k)
        return documents, arange, None if in_batch else torch.cat([arange, neg_owner]), True
    if in_batch:
        return documents, pos_index, None, False
    return documents, pos_index, doc_owner, False


def _check_layout(queries, documents, pos_index, hard_negatives, in_batch, doc_owner) -> None:
    B, D = queries.shape
    if hard_negatives is not None:
        _check_emb("hard_negatives", hard_negatives, 3, "[B, k, D]")
        if tuple(documents.shape) != (B, D) or hard_negatives.shape[0] != B or hard_negatives.shape[2] != D:
            raise ValueError(
                f"with hard_negatives [B, k, D], documents must be the positives [B, D] = ({B}, {D}) "
                f"and hard_negatives ({B}, k, {D}); got documents {tuple(documents.shape)}, "
                f"hard_negatives {tuple(hard_negatives.shape)}")
        if hard_negatives.device != queries.device:
            raise ValueError(f"hard_negatives must be on the device of queries ({queries.device}), "
                             f"got {hard_negatives.device}")
        if hard_negatives.dtype != queries.dtype:
            raise TypeError(f"hard_negatives must have the dtype of queries ({queries.dtype}), got "
                            f"{hard_negatives.dtype}; cast one of them explicitly")
        if pos_index is not None or doc_owner is not None:
            raise ValueError("pos_index and doc_owner are implied by hard_negatives [B, k, D]; pass neither")
        return
    N = documents.shape[0]
    if pos_index is None:
        if N % B:
            raise ValueError(
                f"without pos_index, documents must be B positives followed by B*k hard negatives "
                f"(N a multiple of B = {B}), got N = {N}; pass pos_index [B] for another layout")
        if doc_owner is not None:
            raise ValueError("doc_owner is implied by the positives-then-negatives layout; pass pos_index with it")
        return
    _check_index("pos_index", pos_index, B, "[B]", queries)
    if in_batch and doc_owner is not None:
        raise ValueError("doc_owner only applies with in_batch_negatives=False")
    if not in_batch:
        if doc_owner is None:
            raise ValueError("in_batch_negatives=False with an explicit pos_index needs doc_owner [N]: the "
                             "query (row of queries) owning each document, -1 for none")
        _check_index("doc_owner", doc_owner, N, "[N]", queries)


def _check_temperature(temperature: float, acc: torch.dtype, scale_of=lambda t: 1.0 / t) -> None:
    """``temperature`` > 0 and finite, with its scale (``scale_of(temperature)``, 1 / temperature
    as the caller computes it) a normal ``acc`` number: the logits are ``scores * scale`` in acc
    (float32, or float64 for float64 inputs)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if not _checks.is_positive_normal(scale_of(temperature), acc):
        lo, hi = _checks.normal_range(acc)
        raise ValueError(
            f"temperature must lie in [{1 / hi:.3g}, {1 / lo:.3g}] so that 1 / temperature is a normal "
            f"{_checks.dtype_name(acc)} number (the dtype the logits are computed in), got {temperature:g} "
            f"(1 / temperature = {1.0 / temperature:g})")


def _check_values(pos_index, N: int, temperature, distinct_positives: bool, acc: torch.dtype) -> None:
    """Every value check of infonce_loss in ONE host read (each read waits for the device)."""
    if torch.compiler.is_compiling():
        return
    probes, device = [], None
    if pos_index is not None:
        device = pos_index.device
        probes += [pos_index.min(), pos_index.max()]
        if distinct_positives:
            ordered = pos_index.sort().values
            probes.append((ordered[1:] == ordered[:-1]).any())
    if isinstance(temperature, torch.Tensor):
        device = device or temperature.device
        probes.append(temperature.detach().reshape(()))
    if not probes:
        return
    values = torch.stack([t.to(device=device, dtype=torch.float64) for t in probes]).tolist()
    if pos_index is not None:
        lo, hi = values[0], values[1]
        if lo < 0 or hi >= N:
            raise ValueError(f"pos_index values must be in [0, N) = [0, {N}) (documents has {N} rows), "
                             f"got {int(lo if lo < 0 else hi)}")
        if distinct_positives and values[2]:
            raise ValueError("doc_doc with an explicit pos_index needs distinct positives per query")
    if isinstance(temperature, torch.Tensor):
        _check_temperature(values[-1], acc)


def _as_scale(temperature, acc: torch.dtype, device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        if temperature.ndim != 0 or not temperature.dtype.is_floating_point:
            raise ValueError(f"temperature must be a float or a 0-dim floating tensor, got "
                             f"{temperature.dtype} {tuple(temperature.shape)}")
        # float32 from here: every term's scale gradient then sums in float32 and is rounded to
        # the temperature's dtype once (a half scale would round each term's part before they cancel)
        return 1.0 / temperature.to(device=device, dtype=torch.promote_types(temperature.dtype, acc))
    value = float(temperature)
    _check_temperature(value, acc)
    return torch.tensor(1.0 / value, dtype=acc, device=device)


def _split_owned(x: torch.Tensor, B: int, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives [B, ...] and each query's own negatives [B, k, ...] of a positives-first tensor
    (views: no copy)."""
    k = x.shape[0] // B - 1
    rest = x[B:]
    if order == "blocks":  # row B + j*B + i is query i's j-th negative
        return x[:B], rest.unflatten(0, (k, B)).transpose(0, 1)
    return x[:B], rest.unflatten(0, (B, k))


def _same_rows(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[B, k] bool: n[i, j] bitwise equal to p[i] (p [B, D], n [B, k, D]), in row chunks."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[p.element_size()]
    p, n = p.detach(), n.detach()
    out = torch.empty(n.shape[:2], dtype=torch.bool, device=n.device)
    for c in _row_chunks(n.shape[0], n.shape[1] * n.shape[2]):
        out[c] = (n[c].view(ints) == p[c].view(ints)[:, None]).all(-1)
    return out


def _owned_loss(q, p, n, scale, threshold, margin, duplicate):
    """Stage 2: query i scores only p_i and n_i [k]. Per-query loss [B] and n_above [B].

    The same candidate rule as the op (:func:`~latentembed.ops.contrastive.candidate_mask`) on the
    [B, 1 + k] scores: the positive always stays; a negative goes when its raw score exceeds
    ``threshold`` or ``margin * s_pos`` (bound in float32) or it duplicates the positive."""
    scores = _OwnedScores.apply(q, p, n)
    s = scores.detach()
    drop = torch.zeros_like(s, dtype=torch.bool)
    if threshold is not None:
        drop |= s > threshold
    if margin is not None:
        drop |= s > (s[:, 0].to(torch.float32) * margin)[:, None]
    if duplicate is not None:
        drop[:, 1:] |= duplicate
    drop[:, 0] = False
    logits = scores * scale.to(scores.dtype)
    loss = torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1) - logits[:, 0]
    return loss, ((s > s[:, :1]) & ~drop).sum(1)


def infonce_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    pos_index: Optional[torch.Tensor] = None,
    *,
    hard_negatives: Optional[torch.Tensor] = None,
    negatives_order: str = "blocks",
    temperature: Union[float, torch.Tensor] = 0.05,
    similarity: str = "cos",
    in_batch_negatives: bool = True,
    doc_owner: Optional[torch.Tensor] = None,
    symmetric: bool = False,
    query_query: bool = False,
    doc_doc: bool = False,
    threshold: Optional[float] = None,
    margin: Optional[float] = None,
    mask_duplicates: bool = False,
    doc_ids: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    gather: Optional[bool] = None,
    group=None,
    same_sizes: bool = False,
    backend: str = "auto",
    validate: bool = True,
    _scale: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, InfoNCEOutput]:
    """InfoNCE loss of queries against documents.

    Layouts (B queries, D features):
      - ``documents`` [N, D] and ``pos_index`` [B] int64: document ``pos_index[i]`` is query i's
        positive;
      - ``documents`` [N, D] with ``N = B * (1 + k)`` and no ``pos_index``: B positives followed by
        B*k hard negatives. ``negatives_order="blocks"`` (sentence-transformers' order,
        ``torch.cat([pos, neg_1, ..., neg_k])``): row ``B + j*B + i`` is query i's j-th negative;
        ``"per_query"``: row ``B + i*k + j``. (The order only matters without in-batch negatives.)
      - ``documents`` = positives [B, D] and ``hard_negatives`` [B, k, D] (same dtype as the
        queries; with in-batch negatives they are concatenated into one [N, D] copy, without
        them scored in place).

    Args:
        temperature: float or 0-dim tensor (> 0); logits are ``s * (1 / temperature)`` in float32
            (float64 for float64 inputs), so ``1 / temperature`` must be a normal number of that
            dtype: temperature in [2.94e-39, 8.51e37] for float32. A float is checked always, a
            tensor by ``validate``.
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
        return_stats: return :class:`InfoNCEOutput` (loss, rank, accuracy) instead of the loss.
        gather: gather queries and documents from every rank (gradients flow back; see
            :mod:`latentembed.modules.distributed`). ``None``: when torch.distributed is
            initialised with several ranks. Each rank's loss covers its own queries. With the
            same B on every rank and ``reduction="mean"``, DDP's averaging of parameter
            gradients gives the gradient of the mean over all ranks' queries, as one process on
            the concatenated batch would; with unequal B use ``reduction="sum"`` divided by the
            global number of queries.
        same_sizes: promise that every rank holds the same B and N: skips the per-call exchange
            of sizes (a collective and a host sync). A false promise fails in the collective.
        backend: passed to ``infonce_lse``.
        validate: check index values, the temperature and (``doc_doc`` with ``pos_index``)
            distinct positives in one host sync; the op's own checks are then skipped.

    Returns:
        The loss (float32; float64 for float64 inputs), or an :class:`InfoNCEOutput`.

    Example:
        >>> q, d = torch.randn(4, 8), torch.randn(12, 8)  # 4 positives + 2 negatives each
        >>> infonce_loss(q, d, temperature=0.05).shape
        torch.Size([])
    """
    _check_emb("queries", queries, 2, "[B, D]")
    _check_emb("documents", documents, 2, "[N, D] (or positives [B, D] with hard_negatives)")
    if documents.shape[1] != queries.shape[1]:
        raise ValueError(f"queries [B, D] and documents [N, D] must have the same D, got queries "
                         f"{tuple(queries.shape)} and documents {tuple(documents.shape)}")
    if documents.device != queries.device:
        raise ValueError(f"documents must be on the device of queries ({queries.device}), got {documents.device}")
    if documents.dtype != queries.dtype:
        # Casting silently would hide a copy of every document and a precision change.
        raise TypeError(f"documents must have the dtype of queries ({queries.dtype}), got {documents.dtype}; "
                        "cast one of them explicitly")
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if negatives_order not in _ORDERS:
        raise ValueError(f"negatives_order must be one of {_ORDERS}, got {negatives_order!r}")
    if not in_batch_negatives and (query_query or doc_doc):
        raise ValueError("query_query and doc_doc are in-batch terms; they need in_batch_negatives=True")
    _check_layout(queries, documents, pos_index, hard_negatives, in_batch_negatives, doc_owner)
    acc = torch.promote_types(queries.dtype, torch.float32)
    scale = _as_scale(temperature, acc, queries.device) if _scale is None else _scale.to(acc)
    B, D = queries.shape
    N = documents.shape[0] if hard_negatives is None else B * (1 + hard_negatives.shape[1])
    if doc_ids is not None:
        _check_index("doc_ids", doc_ids, N, "[N] (concatenated documents)", queries)
    if validate:
        _check_values(pos_index, N, temperature if _scale is None else None, doc_doc and pos_index is not None,
                      acc)
    normalize = cosine_normalize if similarity == "cos" else (lambda x: x)
    q = normalize(queries)

    if not in_batch_negatives and pos_index is None:
        # Stage 2 with a layout that says which documents each query owns: score only those
        # [B, 1 + k] by batched dots. Nothing is gathered across ranks: a query's own documents
        # are local, and other ranks' documents are never its candidates.
        if hard_negatives is None:
            p, n = _split_owned(normalize(documents), B, negatives_order)
        else:
            k = hard_negatives.shape[1]
            p, n = normalize(documents), normalize(hard_negatives.reshape(B * k, D)).view(B, k, D)
        duplicate = None
        if doc_ids is not None:
            order = "per_query" if hard_negatives is not None else negatives_order
            pos_ids, neg_ids = _split_owned(doc_ids, B, order)
            duplicate = neg_ids == pos_ids[:, None]
        elif mask_duplicates:
            duplicate = _same_rows(p, n)
        loss, n_above = _owned_loss(q, p, n, scale, threshold, margin, duplicate)
        if symmetric:  # the document-to-query term is 0: the positive's only candidate is its query
            loss = 0.5 * loss
        return _finish(loss, n_above, reduction, return_stats)

    d, pos, owner, positives_first = _resolve_layout(
        queries, documents, pos_index, hard_negatives, negatives_order, in_batch_negatives, doc_owner)
    keys = doc_ids
    if doc_doc and not positives_first:
        # exclude_diagonal drops "document i" for query i: put each positive at row i.
        is_pos = torch.zeros(N, dtype=torch.bool, device=d.device)
        is_pos[pos] = True
        # the other rows in order, by a stable sort rather than nonzero() (a host sync)
        rest = torch.sort(is_pos.to(torch.uint8), stable=True).indices[: N - B]
        perm = torch.cat([pos, rest])
        d, keys = d[perm], None if keys is None else keys[perm]
        pos = torch.arange(B, device=d.device)
    d = normalize(d)

    # Stage 2 with explicit owners needs no gather either (owners index local queries only).
    _, world = distributed_world(group)
    gathering = world > 1 and gather is not False and owner is None
    q_all, d_all = q, d
    if gathering:
        # One exchange of (B, N) per rank for every gather below, or none with same_sizes.
        counts = [[B, N]] * world if same_sizes else gather_sizes([B, N], q.device, group)
        q_sizes, d_sizes = [c[0] for c in counts], [c[1] for c in counts]
        d_all = all_gather_with_grad(d, rotate=True, sizes=d_sizes, group=group)  # own rows first
        if query_query or symmetric:
            q_all = all_gather_with_grad(q, rotate=True, sizes=q_sizes, group=group)
        if keys is not None:
            keys = all_gather_no_grad(keys, rotate=True, sizes=d_sizes, group=group)
    if mask_duplicates and keys is None:
        keys = duplicate_keys(d_all)
    # Keys of each query's positive, local then (gathered) every rank's: for the terms whose
    # candidates are queries (query_query, symmetric), a query whose positive duplicates d+_i
    # is a false negative for query i / document d+_i, like a duplicate document.
    pos_keys = q_keys = None
    if keys is not None:
        pos_keys = keys[:N][pos]
        q_keys = pos_keys
        if gathering and (query_query or symmetric):
            q_keys = all_gather_no_grad(pos_keys, rotate=True, sizes=q_sizes, group=group)

    pos_docs = d[:B] if positives_first or doc_doc else d[pos]
    pos_score = pos_logit = None
    if margin is not None:
        with torch.no_grad():
            pos_score = _RowDot.apply(q, pos_docs).float()
    if query_query or doc_doc:
        pos_logit = scale * _RowDot.apply(q, pos_docs)
    # Values were checked above, once: validate=False saves the op's host syncs.
    common = dict(pos_score=pos_score, threshold=threshold, margin=margin, backend=backend, validate=False)
    # GTE terms: duplicates of the positive (or queries whose positive is one) leave their
    # candidates too; pos_key names the positive's key where no pos_index is in the set.
    dup = {} if keys is None else {"pos_key": pos_keys}

    # Per-query loss lse - logit(positive), both from the op: it folds the positive into its
    # gradient (p - 1 at the positive, as cross-entropy does) instead of cancelling two O(scale)
    # float32 terms here.
    loss, n_above = infonce_lse(q, d_all, scale, pos_index=pos, doc_owner=owner, doc_key=keys,
                                subtract_positive=True, **common)
    # GTE's extra terms join the denominator: log(e^(lse - pos) + e^(lse_qq - pos) + ...)
    if query_query:
        lse_qq, _ = infonce_lse(q, q_all, scale, exclude_diagonal=True,
                                **(dict(doc_key=q_keys, **dup) if dup else {}), **common)
        loss = torch.logaddexp(loss, lse_qq - pos_logit)
    if doc_doc:
        lse_dd, _ = infonce_lse(pos_docs, d_all, scale, exclude_diagonal=True,
                                **(dict(doc_key=keys, **dup) if dup else {}), **common)
        loss = torch.logaddexp(loss, lse_dd - pos_logit)
    if symmetric:
        arange = torch.arange(B, device=q.device)
        q_owner = None
        if owner is not None:
            q_owner = torch.cat([arange, arange.new_full((q_all.shape[0] - B,), -1)])
        loss_dq, _ = infonce_lse(pos_docs, q_all, scale, pos_index=arange, doc_owner=q_owner, doc_key=q_keys,
                                 subtract_positive=True, **common)
        loss = 0.5 * (loss + loss_dq)
    return _finish(loss, n_above, reduction, return_stats)


def _finish(loss, n_above, reduction, return_stats):
    out = loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()
    if not return_stats:
        return out
    return InfoNCEOutput(out, n_above, (n_above == 0).float().mean())


def _float32_exp(log_value: float) -> float:
    """exp of a float32 log, as :meth:`InfoNCELoss.scale` computes it (inf when it overflows)."""
    return float(torch.tensor(log_value, dtype=torch.float32).exp())


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
        **options: any keyword of :func:`infonce_loss` fixed at construction (similarity,
            in_batch_negatives, symmetric, query_query, doc_doc, threshold, margin,
            mask_duplicates, negatives_order, reduction, gather, group, backend, validate).

    Forward: ``(queries, documents, pos_index=None, *, hard_negatives=None, doc_owner=None,
    doc_ids=None, return_stats=False)``.

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.02, learnable_temperature=True, margin=0.95)
        >>> q, d = torch.randn(4, 8), torch.randn(8, 8)  # 4 positives + 1 negative each
        >>> loss_fn(q, d).backward()
    """

    _PER_CALL = ("hard_negatives", "doc_owner", "doc_ids", "return_stats", "temperature", "_scale")

    def __init__(self, temperature: float = 0.05, *, learnable_temperature: bool = False,
                 temperature_range: tuple[float, float] = (0.01, 1.0), **options) -> None:
        super().__init__()
        lo, hi = (float(t) for t in temperature_range)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"temperature_range must be (min, max) with 0 < min <= max, got {temperature_range}")
        temperature = float(temperature)
        # The scale is exp(log_scale) in float32 (clamped to the range's log bounds when
        # learnable): checked as computed, each bound too, or a scale can come out inf or 0.
        _check_temperature(temperature, torch.float32, scale_of=lambda t: _float32_exp(math.log(1 / t)))
        if not all(_checks.is_positive_normal(_float32_exp(math.log(1 / t)), torch.float32) for t in (lo, hi)):
            lo32, hi32 = _checks.normal_range(torch.float32)
            raise ValueError(
                f"temperature_range must lie within [{1 / hi32:.3g}, {1 / lo32:.3g}] so that both ends give a "
                f"normal float32 scale 1 / temperature (the module keeps log(1 / temperature) in float32), "
                f"got {temperature_range}")
        if learnable_temperature and not lo <= temperature <= hi:
            raise ValueError(f"temperature {temperature} must lie in temperature_range {temperature_range}")
        bad = sorted(set(options) & set(self._PER_CALL)) + sorted(
            set(options) - set(infonce_loss.__kwdefaults__) - set(self._PER_CALL))
        if bad:
            raise TypeError(f"InfoNCELoss got unexpected or per-call options {bad}")
        self.options = options
        self.learnable_temperature = learnable_temperature
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
        return _ClampStraightThrough.apply(self.log_scale, *self.log_scale_range).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def forward(self, queries, documents, pos_index=None, *, hard_negatives=None, doc_owner=None,
                doc_ids=None, return_stats: bool = False):
        return infonce_loss(queries, documents, pos_index, hard_negatives=hard_negatives,
                            doc_owner=doc_owner, doc_ids=doc_ids, return_stats=return_stats,
                            _scale=self.scale().to(queries.device), **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        head = f"temperature={self.temperature:.4g}, learnable={self.learnable_temperature}"
        return head + (f", {opts}" if opts else "")
