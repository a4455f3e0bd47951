"""Shared helpers of the infonce_lse tests: inputs, option sets and the error-budget check."""

from __future__ import annotations

import torch

from latentembed.ops.infonce import (
    CandidateRule,
    candidate_mask,
    infonce_lse,
    infonce_lse_ref,
    infonce_per_query_loss,
    infonce_per_query_loss_ref,
)
from tests.ops._common import DEVICE, HAS_GPU  # noqa: F401 (re-exported to the infonce tests)
from tests.tolerances import ATOL, assert_within_budget

# Options whose masks do not depend on score values (any random data works), and options
# that compare scores with a threshold (quantized data keeps every score a multiple of 1/4,
# exact in every dtype, so no candidate sits on a boundary and the masks are exactly known).
# "key-poskey-diag": rows without a positive index, duplicates named by pos_key (GTE's
# document-document term); "pos-key-poskey": an explicit pos_key that overrides doc_key[pos_index].
VALUE_FREE = [
    "none",
    "pos",
    "pos-owner",
    "pos-key",
    "diag",
    "owner-diag",
    "pos-owner-key-diag",
    "key-poskey-diag",
    "pos-key-poskey",
]
VALUE_BASED = ["pos-threshold", "pos-margin", "threshold-nopos", "all"]


def quantized(*shape, dtype, device=DEVICE) -> torch.Tensor:
    """Entries in {-1, -1/2, 0, 1/2, 1}: exact in fp16/bf16, products and sums exact in fp32."""
    return (torch.randint(-2, 3, shape, device=device).to(dtype) / 2).to(dtype)


def make_options(name: str, q: torch.Tensor, d: torch.Tensor) -> dict:
    """Keyword arguments of infonce_lse for the option set ``name``, random but valid."""
    B, N = q.shape[0], d.shape[0]
    dev = q.device
    opts = {}
    parts = set(name.split("-"))
    if "pos" in parts or "all" in parts or name in ("pos-threshold", "pos-margin"):
        opts["pos_index"] = torch.randint(0, N, (B,), device=dev)
    if "owner" in parts or "all" in parts:
        # Stage-2 layout: every document belongs to one query (or to none: -1).
        opts["doc_owner"] = torch.randint(-1, B, (N,), device=dev)
    if "key" in parts or "all" in parts:
        # Few distinct keys, so many documents duplicate some query's positive.
        opts["doc_key"] = torch.randint(0, max(2, N // 3), (N,), device=dev)
    if "poskey" in parts:
        # Keys that occur among the documents, so every row drops some candidates.
        opts["pos_key"] = opts["doc_key"][torch.randint(0, N, (B,), device=dev)]
    if "diag" in parts or "all" in parts:
        opts["exclude_diagonal"] = True
    scores = q.double() @ d.double().T
    if "threshold" in parts or "all" in parts:
        # A quarter-integer midpoint near the 70th percentile: some candidates are dropped.
        opts["threshold"] = float(torch.quantile(scores.flatten().float(), 0.7).floor()) + 0.125
    if "margin" in parts or "all" in parts:
        # Not a real positive's score on purpose: any caller-supplied bound must be honoured.
        # x.1 * 0.9 never lands within 0.01 of a multiple of 1/4 (see the test module docstring).
        opts["pos_score"] = (scores.max(1).values.floor() + 0.1).float()
        opts["margin"] = 0.9
    return opts


def lowp_reference(q, d, scale, opts, keep, per_query_loss=False):
    """PyTorch's own low-precision computation: scores by a matmul in the input dtype, then the
    float32 masked logsumexp (the eager loss's numerics), with the exact run's candidate set."""
    scores = (q @ d.T).float()
    logits = torch.where(keep, scores * scale.float(), float("-inf"))
    empty = ~keep.any(1)
    lse = torch.logsumexp(torch.where(empty[:, None], 0.0, logits), dim=1)
    lse = torch.where(empty, float("-inf"), lse)
    if per_query_loss:
        lse = lse - scale.float() * scores.gather(1, opts["pos_index"][:, None])[:, 0]
    return lse


def check_against_reference(backend, q, d, scale, opts, *, exact_rank_required=False, per_query_loss=False):
    """Forward, n_above and every gradient (q, d, scale) under a random upstream gradient, of
    infonce_lse (infonce_per_query_loss with ``per_query_loss``); ``opts``: its rule keywords.

    Returns (lse, n_above, grads) of the backend under test.
    """
    q = q.detach().requires_grad_()
    d = d.detach().requires_grad_()
    scale = scale.detach().requires_grad_()
    op, reference = (
        (infonce_per_query_loss, infonce_per_query_loss_ref) if per_query_loss else (infonce_lse, infonce_lse_ref)
    )
    lse, n_above = op(q, d, scale, backend=backend, **opts)

    exact_args = [t.detach().double().requires_grad_() for t in (q, d, scale)]
    exact, exact_rank = reference(*exact_args, CandidateRule(**opts))
    exact_scores = exact_args[0].detach() @ exact_args[1].detach().T
    keep = candidate_mask(exact_scores, CandidateRule(**opts))
    lowp = lowp_reference(q, d, scale, opts, keep, per_query_loss)

    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(lse), finite), "empty candidate sets differ"
    assert (lse[~finite] == float("-inf")).all()
    assert_within_budget("lse", lse[finite], lowp[finite], exact[finite])
    if exact_rank_required:
        assert torch.equal(n_above, exact_rank), f"n_above {n_above.tolist()} != {exact_rank.tolist()}"
    elif "pos_index" in opts:
        # Random scores may tie with the positive within rounding: count only clear decisions.
        s_pos = exact_scores.gather(1, opts["pos_index"][:, None])
        tol = 1e-2 * exact_scores.abs().max()
        lo = ((exact_scores > s_pos + tol) & keep).sum(1)
        hi = ((exact_scores > s_pos - tol) & keep).sum(1) - 1  # the positive itself never counts
        assert ((lo <= n_above) & (n_above <= hi.clamp_min(lo))).all(), (n_above, lo, hi)
    else:
        assert (n_above == 0).all()
    assert n_above.dtype == torch.int64

    g = torch.randn_like(lse)
    grads = torch.autograd.grad(lse, (q, d, scale), g)
    masked_g = torch.where(finite, g, 0.0)
    lowp_grads = torch.autograd.grad(lowp, (q, d, scale), masked_g)
    exact_grads = torch.autograd.grad(exact, exact_args, masked_g.double())
    for name, got, lp, ex in zip(("grad q", "grad d"), grads[:2], lowp_grads[:2], exact_grads[:2]):
        assert_within_budget(name, got, lp, ex)
    _check_scale_grad(
        grads[2],
        lowp_grads[2],
        exact_grads[2],
        exact_args[2].detach(),
        exact_scores,
        keep,
        masked_g.double(),
        opts,
        per_query_loss,
    )
    return lse, n_above, grads


def _check_scale_grad(got, lowp, exact, scale, scores, keep, g, opts, per_query_loss):
    """The error-budget rule for the one scalar sum_ij g_i p_ij s_ij (minus g_i s_pos).

    Its small absolute term scales with the summands' magnitude sum_ij |g_i p_ij s_ij|, not with
    the result: with random-sign g the sum cancels, and a term proportional to the (small)
    result would demand more than fp32 summation can give (one scalar is one random draw of
    the rounding error, so "2x PyTorch's error" alone fails by chance)."""
    assert got.dtype == lowp.dtype and torch.isfinite(got)
    logits = torch.where(keep, scale * scores, float("-inf"))
    lse = torch.logsumexp(logits, 1, keepdim=True)
    p = torch.where(keep & torch.isfinite(lse), torch.exp(logits - lse), 0.0)
    magnitude = (g.abs()[:, None] * p * scores.abs()).sum()
    if per_query_loss:
        magnitude += (g.abs() * scores.gather(1, opts["pos_index"][:, None])[:, 0].abs()).sum()
    err = abs(got.double().item() - exact.item())
    budget = 2 * abs(lowp.double().item() - exact.item()) + ATOL[got.dtype] * max(1.0, magnitude.item())
    assert err <= budget, f"grad scale: error {err:.3e} exceeds budget {budget:.3e}"
