"""Property test: on any small shape, mask pattern and layout, the Triton kernel is the reference."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.ops.test_masked_mean import check_forward_and_grad  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=25, deadline=None, derandomize=False)
@given(
    B=st.integers(1, 5),
    L=st.integers(0, 70),
    D=st.integers(1, 300),
    keep=st.floats(0.0, 1.0),
    packed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_equals_reference_on_any_layout(B, L, D, keep, packed, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=gen).to(DEVICE, dtype)
    mask = (torch.rand(B, L, generator=gen) < keep).to(DEVICE)
    if packed:  # the kept rows of each sequence, packed back to back
        lengths = mask.sum(1)
        hidden = hidden[mask]
        cu = torch.zeros(B + 1, dtype=torch.int32, device=DEVICE)
        cu[1:] = lengths.cumsum(0)
        args = (None, cu)
    else:
        args = (mask, None)
    check_forward_and_grad("triton", hidden, *args)
