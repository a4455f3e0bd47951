"""Strided views of every tensor a Triton kernel reads give the same results as contiguous ones.

A kernel that indexes a tensor as contiguous without being given its strides reads the wrong
elements of a view (``x[::2]``, a transpose, a column of a wider tensor). Each launcher must
pass the strides or make the tensor contiguous; the public ops must give the reference's result.
"""

import importlib

import pytest
import torch

from latentembed.ops import group_by_adapter, multi_lora_linear_add
from tests.ops._common import DEVICE
from tests.ops.infonce_helpers import check_against_reference, make_options, quantized
from tests.tolerances import assert_within_budget


def spread(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with every stride doubled; the gaps hold NaN (0 for integers, so a
    wrong read stays a valid index instead of running off the end)."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    if t.dtype.is_floating_point:
        buf.fill_(float("nan"))
    view = buf[..., 0]
    view.copy_(t)
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def _spread_all(args):
    return [spread(a) if isinstance(a, torch.Tensor) and a.ndim >= 1 else a for a in args]


def _cu(lengths):
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)


# ----------------------------------------------------------------------------- launchers


def _masked_mean_cases(t):
    mask = torch.rand(3, 7, device=DEVICE) < 0.7
    cu = _cu([4, 0, 5])
    return {
        "masked_mean_fwd-padded": (t.masked_mean_fwd_triton, (torch.randn(3, 7, 10, device=DEVICE), mask, None)),
        "masked_mean_fwd-packed": (t.masked_mean_fwd_triton, (torch.randn(9, 10, device=DEVICE), None, cu)),
        "masked_mean_bwd-padded": (t.masked_mean_bwd_triton, (torch.randn(3, 10, device=DEVICE), mask, None, 7)),
        "masked_mean_bwd-packed": (t.masked_mean_bwd_triton, (torch.randn(3, 10, device=DEVICE), None, cu, 9)),
    }


def _latent_attention_cases(t):
    T, D, H, R = 9, 12, 2, 5
    x = torch.randn(T, D, device=DEVICE)
    w, b = 1 + 0.1 * torch.randn(D, device=DEVICE), 0.1 * torch.randn(D, device=DEVICE)
    m, u = torch.randn(H, R, D, device=DEVICE) / 3, torch.randn(H, R, D, device=DEVICE)
    _, probs, mean, rstd = t.latent_attn_fwd_triton(x, w, b, m, u, 1e-5)
    a, cu = torch.randn(9, 8, device=DEVICE), _cu([4, 0, 5])
    return {
        "latent_attn_fwd": (t.latent_attn_fwd_triton, (x, w, b, m, u, 1e-5)),
        "latent_attn_bwd": (
            t.latent_attn_bwd_triton,
            (torch.randn(T, D, device=DEVICE), x, w, b, m, u, probs, mean, rstd, True, True),
        ),
        "geglu_fwd": (t.geglu_segment_mean_fwd_triton, (a, cu)),
        "geglu_bwd": (t.geglu_segment_mean_bwd_triton, (torch.randn(3, 4, device=DEVICE), a, cu)),
    }


def _infonce_cases(t):
    from latentembed.ops.infonce import CandidateRule

    B, N, D = 5, 37, 12
    q, d = torch.randn(B, D, device=DEVICE), torch.randn(N, D, device=DEVICE)
    scale = torch.tensor(2.5, device=DEVICE)
    rule = CandidateRule(margin=0.9, exclude_diagonal=True)
    tensors = (
        torch.randint(0, N, (B,), device=DEVICE),
        torch.randn(B, device=DEVICE),
        torch.randint(-1, B, (N,), device=DEVICE),
        torch.randint(0, 9, (N,), device=DEVICE),
        torch.randint(0, 9, (B,), device=DEVICE),
    )

    # The harness spreads positional tensors; the ops take the rule's fields by keyword.
    def forward(q, d, scale, *rule_tensors):
        return t.infonce_lse_fwd_triton(q, d, scale, **rule.with_tensors(rule_tensors).keywords())

    def backward(grad, q, d, scale, lse, *rule_tensors):
        return t.infonce_lse_bwd_triton(
            grad, q, d, scale, lse, subtract_positive=True, **rule.with_tensors(rule_tensors).keywords()
        )

    lse, _, _ = forward(q, d, scale, *tensors)
    return {
        "infonce_fwd": (forward, (q, d, scale, *tensors)),
        "infonce_bwd": (backward, (torch.randn(B, device=DEVICE), q, d, scale, lse, *tensors)),
    }


def _multi_lora_cases(t):
    n, d_in, d_out, rank, num = 37, 10, 12, 3, 3
    g = group_by_adapter(torch.randint(-1, num, (n,), device=DEVICE), num)
    base, x = torch.randn(n, d_out, device=DEVICE), torch.randn(n, d_in, device=DEVICE)
    a, b = torch.randn(num, rank, d_in, device=DEVICE), torch.randn(num, d_out, rank, device=DEVICE)
    scaling = torch.rand(num, device=DEVICE) + 0.5
    _, h = t.multi_lora_fwd_triton(base, x, a, b, scaling, g.sorted_rows, g.blocks)
    rows = (g.sorted_rows, g.blocks)
    return {
        "multi_lora_fwd": (t.multi_lora_fwd_triton, (base, x, a, b, scaling, *rows)),
        "multi_lora_bwd": (
            t.multi_lora_bwd_triton,
            (
                torch.randn(n, d_out, device=DEVICE),
                x,
                a,
                b,
                scaling,
                h,
                *rows,
                g.reduce_blocks,
                g.reduce_offsets,
                True,
                True,
                True,
            ),
        ),
    }


LAUNCHER_CASES = {
    "masked_mean": _masked_mean_cases,
    "latent_attention": _latent_attention_cases,
    "infonce": _infonce_cases,
    "multi_lora": _multi_lora_cases,
}
LAUNCHERS = [
    (op, name)
    for op, cases in (
        (
            "masked_mean",
            ["masked_mean_fwd-padded", "masked_mean_fwd-packed", "masked_mean_bwd-padded", "masked_mean_bwd-packed"],
        ),
        ("latent_attention", ["latent_attn_fwd", "latent_attn_bwd", "geglu_fwd", "geglu_bwd"]),
        ("infonce", ["infonce_fwd", "infonce_bwd"]),
        ("multi_lora", ["multi_lora_fwd", "multi_lora_bwd"]),
    )
    for name in cases
]


@pytest.mark.parametrize("op, case", LAUNCHERS, ids=[name for _, name in LAUNCHERS])
def test_launcher_takes_every_tensor_strided(op, case):
    # Every tensor argument at once, every stride doubled: the same kernels on the same values
    # give bitwise the same outputs.
    module = importlib.import_module(f"latentembed.ops.{op}.triton")
    fn, args = LAUNCHER_CASES[op](module)[case]
    expected = fn(*args)
    got = fn(*_spread_all(args))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=False, msg=f"{case}: output {i} differs")


# ----------------------------------------------------------------------------- public ops


@pytest.mark.parametrize("option", ["all", "pos-key-poskey"])
def test_infonce_lse_strided_index_arguments_match_reference(option):
    # The case: strided pos_index / doc_owner views were read as contiguous.
    q, d = quantized(6, 20, dtype=torch.float32), quantized(41, 20, dtype=torch.float32)
    opts = {k: spread(v) if isinstance(v, torch.Tensor) else v for k, v in make_options(option, q, d).items()}
    check_against_reference("triton", spread(q), spread(d), torch.tensor(1.7, device=DEVICE), opts)


def test_multi_lora_strided_scaling_and_grouping_match_reference():
    from latentembed.ops.multi_lora import multi_lora_linear_add_ref

    n, d_in, d_out, rank, num = 37, 10, 12, 3, 3
    index = torch.randint(-1, num, (n,), device=DEVICE)
    g = group_by_adapter(index, num)
    g = g._replace(**{f: spread(getattr(g, f)) for f in ("sorted_rows", "blocks", "reduce_blocks", "reduce_offsets")})
    base, x = torch.randn(n, d_out, device=DEVICE), torch.randn(n, d_in, device=DEVICE)
    a = torch.randn(num, rank, d_in, device=DEVICE) / d_in**0.5
    b = torch.randn(num, d_out, rank, device=DEVICE) / rank**0.5
    scaling = spread(torch.rand(num, device=DEVICE) + 0.5)
    leaves = [spread(t).requires_grad_() for t in (base, x, a, b)]
    out = multi_lora_linear_add(*leaves, scaling, g, backend="triton")
    lowp = multi_lora_linear_add_ref(*leaves, scaling, index)
    exact_in = [t.detach().double().requires_grad_() for t in leaves]
    exact = multi_lora_linear_add_ref(*exact_in, scaling.double(), index)
    assert_within_budget("forward", out, lowp, exact)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_lowp = torch.autograd.grad(lowp, leaves, grad_out)
    grads_exact = torch.autograd.grad(exact, exact_in, grad_out.double())
    for name, got, lp, ex in zip(("base_out", "x", "lora_a", "lora_b"), grads, grads_lowp, grads_exact):
        assert_within_budget(f"grad {name}", got, lp, ex)


def test_expanded_views_match_reference():
    # Stride-0 views (one value broadcast along a dim), as `.expand` gives them.
    from latentembed.ops import masked_mean_pool
    from latentembed.ops.multi_lora import multi_lora_linear_add_ref

    hidden = torch.randn(1, 7, 10, device=DEVICE).expand(3, 7, 10)
    mask = (torch.rand(1, 7, device=DEVICE) < 0.7).expand(3, 7)
    torch.testing.assert_close(
        masked_mean_pool(hidden, mask, backend="triton"), masked_mean_pool(hidden, mask, backend="reference")
    )

    q, d = quantized(6, 20, dtype=torch.float32), quantized(41, 20, dtype=torch.float32)
    opts = dict(
        pos_index=torch.tensor([5], device=DEVICE).expand(6), doc_owner=torch.tensor([2], device=DEVICE).expand(41)
    )
    check_against_reference("triton", q, d, torch.tensor(1.3, device=DEVICE), opts)

    index = torch.randint(-1, 3, (13,), device=DEVICE)
    base, x = torch.randn(13, 4, device=DEVICE), torch.randn(13, 6, device=DEVICE)
    a, b = torch.randn(3, 2, 6, device=DEVICE), torch.randn(3, 4, 2, device=DEVICE)
    scaling = torch.tensor([0.7], device=DEVICE).expand(3)
    out = multi_lora_linear_add(base, x, a, b, scaling, group_by_adapter(index, 3), backend="triton")
    torch.testing.assert_close(out, multi_lora_linear_add_ref(base, x, a, b, scaling, index))
