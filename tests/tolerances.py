"""Error budgets: a kernel may be at most twice as wrong as PyTorch's own low-precision result.

Both are measured against a float64 computation on the same (already rounded) inputs, so the
budget scales with what the dtype can represent instead of a fixed tolerance that is too loose
for fp32 and too tight for bf16. Two small terms cover results that PyTorch happens to get
exactly right (e.g. a mean of one element, or a tiny reduction whose roundings cancel), where
any different summation order would fail a purely relative rule: an absolute term, and one unit
in the last place of the output dtype at the result's largest magnitude (the final rounding of
a result nobody can avoid; without it, a tiny fp16 multi-LoRA case failed on some seeds).
"""

import torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact.double()).abs().max().item() if value.numel() else 0.0


def assert_within_budget(name: str, out: torch.Tensor, lowp_ref: torch.Tensor, exact: torch.Tensor) -> None:
    """``out``: kernel result; ``lowp_ref``: reference in the same dtype; ``exact``: float64."""
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == lowp_ref.dtype, f"{name}: dtype {out.dtype} != {lowp_ref.dtype}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten or invalid elements)"
    err = max_error(out, exact)
    scale = exact.abs().max().item() if exact.numel() else 0.0
    budget = 2 * max_error(lowp_ref, exact) + ATOL[out.dtype] * max(1.0, scale) + torch.finfo(out.dtype).eps * scale
    assert err <= budget, f"{name}: max error {err:.3e} exceeds budget {budget:.3e}"
