"""infonce_lse rejects a scale that its compute dtype cannot hold, instead of returning inf/NaN.

The check used to run in float64 while the scale was then built (and used) in float32: 1e39
passed and became inf. A scale must be a normal number of the compute dtype (float32, float64
for float64 inputs): no overflow to inf, no underflow to a subnormal or 0.
"""

import pytest
import torch

from latentembed.ops import infonce_lse
from tests.ops._common import DEVICE

BACKENDS = ["reference", "triton"]


def _args(dtype=torch.float32):
    q, d = torch.randn(3, 8, device=DEVICE, dtype=dtype), torch.randn(5, 8, device=DEVICE, dtype=dtype)
    return q, d, torch.randint(0, 5, (3,), device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "float64-tensor"])
@pytest.mark.parametrize("scale", [1e39, 1e-40, 1e-46], ids=["overflows", "subnormal", "rounds-to-zero"])
def test_scale_outside_float32_is_rejected(backend, as_tensor, scale):
    q, d, pos = _args()
    value = torch.tensor(scale, dtype=torch.float64, device=DEVICE) if as_tensor else scale
    with pytest.raises(ValueError, match=r"scale \(1 / temperature\) must lie in \[1.18e-38, 3.4e\+38\].*float32"):
        infonce_lse(q, d, value, pos_index=pos, backend=backend)


def test_float64_inputs_take_float64_scales():
    # The reference computes float64 inputs in float64: 1e39 is an ordinary number there.
    q, d, pos = _args(torch.float64)
    q, d = q * 1e-40, d  # scale * score stays O(1)
    for scale in (1e39, torch.tensor(1e39, dtype=torch.float64, device=DEVICE)):
        lse, _ = infonce_lse(q, d, scale, pos_index=pos)
        expected = torch.logsumexp(1e39 * (q @ d.T), dim=1)
        torch.testing.assert_close(lse, expected)
    with pytest.raises(ValueError, match=r"must lie in \[2.23e-308, 1.8e\+308\].*float64"):
        infonce_lse(q, d, 1e-310, pos_index=pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_and_smallest_float32_scales_are_accepted(backend):
    q, d, pos = _args()
    info = torch.finfo(torch.float32)
    for scale, shrink in ((info.max, 1e-20), (info.tiny, 1.0)):  # scale * score stays finite
        lse, _ = infonce_lse(q * shrink, d * shrink, float(scale), pos_index=pos, backend=backend)
        assert torch.isfinite(lse).all()


def test_validate_false_skips_the_tensor_scale_value_check():
    # Documented: validate=False reads no values back, so a tensor scale is not checked.
    q, d, pos = _args()
    infonce_lse(q, d, torch.tensor(1e39, dtype=torch.float64, device=DEVICE), pos_index=pos, validate=False,
                backend="reference")
