"""Bad input to masked_mean_pool: a clear error naming the argument and what came."""

import pytest
import torch

from latentembed import masked_mean_pool

H = torch.randn(2, 5, 4)
MASK = torch.ones(2, 5, dtype=torch.bool)
ROWS = torch.randn(6, 4)


def cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(hidden=torch.randn(2, 5)), ValueError, r"hidden must have 3 dims .* got shape \(2, 5\)"),
        (dict(hidden=torch.randn(2, 5, 4, 1)), ValueError, r"hidden must have 3 dims"),
        (
            dict(hidden=H, mask=torch.ones(3, 5, dtype=torch.bool)),
            ValueError,
            r"mask shape \(3, 5\) does not match hidden's \[B, L\] = \(2, 5\)",
        ),
        (dict(hidden=H, mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"mask shape \(2, 6\) does not match"),
        (dict(hidden=H, mask=torch.ones(2, 5, 1, dtype=torch.bool)), ValueError, r"mask must have 2 dims"),
        (dict(hidden=H, mask=torch.ones(2, 5)), TypeError, r"mask must be bool or an integer dtype .* got float32"),
        (
            dict(hidden=H, mask=MASK.to("meta")),
            ValueError,
            r"mask must be on the same device as hidden \(cpu\), got meta",
        ),
        (dict(hidden=H.long()), TypeError, r"hidden must have dtype in \[.*\], got int64"),
        (dict(hidden=[1.0]), TypeError, r"hidden must be a torch.Tensor, got list"),
        (dict(hidden=torch.randn(0, 5, 4)), ValueError, r"empty batch \(B = 0\)"),
        (dict(hidden=torch.randn(2, 5, 0)), ValueError, r"D >= 1"),
        (
            dict(hidden=ROWS, cu_seqlens=cu(0, 6, dtype=torch.int64)),
            TypeError,
            r"cu_seqlens must have dtype int32, got int64",
        ),
        (
            dict(hidden=ROWS, cu_seqlens=cu(0)),
            ValueError,
            r"cu_seqlens must have shape \[B\+1\] with B >= 1.*got shape \(1,\)",
        ),
        (dict(hidden=ROWS, cu_seqlens=cu(1, 6)), ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
        (
            dict(hidden=ROWS, cu_seqlens=cu(0, 2, 5)),
            ValueError,
            r"end at the number of rows of hidden \(6\), got cu_seqlens\[-1\] = 5",
        ),
        (
            dict(hidden=ROWS, cu_seqlens=cu(0, 4, 2, 6)),
            ValueError,
            r"non-decreasing, got cu_seqlens\[1\] = 4 > cu_seqlens\[2\] = 2",
        ),
        (dict(hidden=ROWS, cu_seqlens=cu(0, 6).to("meta")), ValueError, r"cu_seqlens must be on the same device"),
        (dict(hidden=H, cu_seqlens=cu(0, 6)), ValueError, r"hidden must have 2 dims \[T, D\] when cu_seqlens is given"),
        (dict(hidden=ROWS, mask=MASK, cu_seqlens=cu(0, 6)), ValueError, r"either mask .* or cu_seqlens"),
        (dict(hidden=H, backend="fastest"), ValueError, r"argument backend must be one of .* got 'fastest'"),
    ],
    ids=lambda v: None,
)
def test_bad_input_raises_clear_error(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        masked_mean_pool(**kwargs)


def test_validate_false_skips_only_value_checks():
    # Values are not read (no host sync), but metadata is still checked.
    out = masked_mean_pool(ROWS, cu_seqlens=cu(0, 2, 6), validate=False)
    assert out.shape == (2, 4)
    with pytest.raises(TypeError, match="int32"):
        masked_mean_pool(ROWS, cu_seqlens=cu(0, 6, dtype=torch.int64), validate=False)
