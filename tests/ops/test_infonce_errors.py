"""infonce_lse / infonce_per_query_loss on bad input: every bad argument raises an error that
names it, and a scale outside what its compute dtype holds is rejected instead of returning
inf/NaN.

The scale check used to run in float64 while the scale was then built (and used) in float32:
1e39 passed and became inf. A scale must be a normal number of the compute dtype (float32,
float64 for float64 inputs): no overflow to inf, no underflow to a subnormal or 0.
"""

import pytest
import torch

from latentembed.ops import BackendUnavailableError
from latentembed.ops.infonce import infonce_lse, infonce_per_query_loss
from tests.ops.infonce_helpers import DEVICE, HAS_GPU


def _args(B=3, N=5, D=4, dtype=torch.float32):
    return torch.randn(B, D, dtype=dtype), torch.randn(N, D, dtype=dtype), torch.tensor(2.0)


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("d-mismatch", ValueError, "same D"),
        ("dtype-mismatch", TypeError, "dtype of q"),
        ("device-mismatch", ValueError, "same device"),
        ("int-q", TypeError, "q must have dtype"),
        ("q-1d", ValueError, "q must have 2 dims"),
        ("pos-range", ValueError, r"pos_index values must be in \[0, N\) = \[0, 5\), got 5"),
        ("pos-negative", ValueError, "got -1"),
        ("pos-dtype", TypeError, "pos_index must have dtype int64"),
        ("pos-length", ValueError, r"pos_index must have shape \[B\]"),
        ("scale-zero", ValueError, "scale .* must be positive"),
        ("scale-negative", ValueError, "must be positive and finite, got -0.5"),
        ("scale-shape", ValueError, "scale must be a 0-dim"),
        ("margin-no-score", ValueError, "margin needs pos_score"),
        ("score-length", ValueError, r"pos_score must be a floating tensor of shape \[B\]"),
        ("owner-length", ValueError, r"doc_owner must have shape \[N\] = \(5,\)"),
        ("key-length", ValueError, r"doc_key must have shape \[N\] = \(5,\)"),
        ("key-no-pos", ValueError, "doc_key .* needs pos_index .* or pos_key"),
        ("pos-key-no-key", ValueError, "pos_key .* needs doc_key"),
        ("pos-key-dtype", TypeError, "pos_key must have dtype int64, got int32"),
        ("pos-key-length", ValueError, r"pos_key must have shape \[B\] = \(3,\), got \(5,\)"),
        ("per-query-no-pos", ValueError, "infonce_per_query_loss needs pos_index"),
        ("empty", ValueError, "non-empty"),
        ("backend-name", ValueError, "argument backend must be one of"),
    ],
)
def test_bad_input_raises_clearly(case, error, message):
    q, d, scale = _args()
    kw, op = {}, infonce_lse
    if case == "d-mismatch":
        d = torch.randn(5, 7)
    elif case == "dtype-mismatch":
        d = d.half()
    elif case == "device-mismatch":
        d = d.to("meta")
    elif case == "int-q":
        q = q.long()
    elif case == "q-1d":
        q = q[0]
    elif case == "pos-range":
        kw["pos_index"] = torch.tensor([0, 5, 1])
    elif case == "pos-negative":
        kw["pos_index"] = torch.tensor([0, -1, 1])
    elif case == "pos-dtype":
        kw["pos_index"] = torch.tensor([0, 1, 1], dtype=torch.int32)
    elif case == "pos-length":
        kw["pos_index"] = torch.tensor([0, 1])
    elif case == "scale-zero":
        scale = torch.tensor(0.0)
    elif case == "scale-negative":
        scale = torch.tensor(-0.5)
    elif case == "scale-shape":
        scale = torch.tensor([2.0])
    elif case == "margin-no-score":
        kw["margin"] = 0.9
    elif case == "score-length":
        kw.update(margin=0.9, pos_score=torch.randn(4))
    elif case == "owner-length":
        kw["doc_owner"] = torch.zeros(4, dtype=torch.int64)
    elif case == "key-length":
        kw.update(pos_index=torch.tensor([0, 1, 2]), doc_key=torch.zeros(6, dtype=torch.int64))
    elif case == "key-no-pos":
        kw["doc_key"] = torch.zeros(5, dtype=torch.int64)
    elif case == "pos-key-no-key":
        kw["pos_key"] = torch.zeros(3, dtype=torch.int64)
    elif case == "pos-key-dtype":
        kw.update(doc_key=torch.zeros(5, dtype=torch.int64), pos_key=torch.zeros(3, dtype=torch.int32))
    elif case == "pos-key-length":
        kw.update(doc_key=torch.zeros(5, dtype=torch.int64), pos_key=torch.zeros(5, dtype=torch.int64))
    elif case == "per-query-no-pos":
        kw, op = {"pos_index": None}, infonce_per_query_loss
    elif case == "empty":
        d = d[:0]
    elif case == "backend-name":
        kw["backend"] = "fast"
    with pytest.raises(error, match=message):
        op(q, d, scale, **kw)


def test_float64_needs_the_reference_and_auto_picks_it():
    q, d, scale = _args(dtype=torch.float64)
    # (on a GPU machine the CPU tensors are refused first: "runs on ['cuda']")
    with pytest.raises(BackendUnavailableError, match="triton: (supports dtypes|runs on)"):
        infonce_lse(q, d, scale, backend="triton")
    lse, _ = infonce_lse(q, d, 2.0)  # a float scale is accepted too
    assert lse.dtype == torch.float64
    if not HAS_GPU:  # auto never picks the interpreter on CPU
        lse32, _ = infonce_lse(q.float(), d.float(), scale)
        assert lse32.dtype == torch.float32


# --- the scale's range ----------------------------------------------------------------------

BACKENDS = ["reference", "triton"]


def _scale_args(dtype=torch.float32):
    q, d = torch.randn(3, 8, device=DEVICE, dtype=dtype), torch.randn(5, 8, device=DEVICE, dtype=dtype)
    return q, d, torch.randint(0, 5, (3,), device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "float64-tensor"])
@pytest.mark.parametrize("scale", [1e39, 1e-40, 1e-46], ids=["overflows", "subnormal", "rounds-to-zero"])
def test_scale_outside_float32_is_rejected(backend, as_tensor, scale):
    q, d, pos = _scale_args()
    value = torch.tensor(scale, dtype=torch.float64, device=DEVICE) if as_tensor else scale
    with pytest.raises(ValueError, match=r"scale \(1 / temperature\) must lie in \[1.18e-38, 3.4e\+38\].*float32"):
        infonce_lse(q, d, value, pos_index=pos, backend=backend)


def test_float64_inputs_take_float64_scales():
    # The reference computes float64 inputs in float64: 1e39 is an ordinary number there.
    q, d, pos = _scale_args(torch.float64)
    q, d = q * 1e-40, d  # scale * score stays O(1)
    for scale in (1e39, torch.tensor(1e39, dtype=torch.float64, device=DEVICE)):
        lse, _ = infonce_lse(q, d, scale, pos_index=pos)
        expected = torch.logsumexp(1e39 * (q @ d.T), dim=1)
        torch.testing.assert_close(lse, expected)
    with pytest.raises(ValueError, match=r"must lie in \[2.23e-308, 1.8e\+308\].*float64"):
        infonce_lse(q, d, 1e-310, pos_index=pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_and_smallest_float32_scales_are_accepted(backend):
    q, d, pos = _scale_args()
    info = torch.finfo(torch.float32)
    for scale, shrink in ((info.max, 1e-20), (info.tiny, 1.0)):  # scale * score stays finite
        lse, _ = infonce_lse(q * shrink, d * shrink, float(scale), pos_index=pos, backend=backend)
        assert torch.isfinite(lse).all()


def test_validate_false_skips_the_tensor_scale_value_check():
    # Documented: validate=False reads no values back, so a tensor scale is not checked.
    q, d, pos = _scale_args()
    infonce_lse(
        q, d, torch.tensor(1e39, dtype=torch.float64, device=DEVICE), pos_index=pos, validate=False, backend="reference"
    )
