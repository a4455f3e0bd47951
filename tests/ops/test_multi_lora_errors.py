"""group_by_adapter's tables, backend selection and bad input to the multi-LoRA op."""

import pytest
import torch

from latentembed.ops import BackendUnavailableError
from latentembed.ops.dispatch import select_backend
from latentembed.ops.multi_lora import (
    BACKENDS,
    MAX_TRITON_RANK,
    group_by_adapter,
    multi_lora_linear_add,
)
from latentembed.ops.multi_lora.grouping import BLOCK_M, REDUCE_M


def check_tables(index: torch.Tensor, num_adapters: int):
    """Every invariant the kernels rely on, checked from scratch against the index."""
    g = group_by_adapter(index, num_adapters)
    n = index.shape[0]
    key = torch.where(index < 0, num_adapters, index)
    # stable sort by adapter, base-only rows last
    expected = sorted(range(n), key=lambda i: (int(key[i]), i))
    assert g.sorted_rows.tolist() == expected
    counts = torch.bincount(key, minlength=num_adapters + 1)
    assert g.segment_offsets.tolist() == [0] + torch.cumsum(counts[:num_adapters], 0).tolist()
    assert g.num_rows == n and g.num_adapters == num_adapters
    assert g.num_active == int((index >= 0).sum())
    # blocks: cover every position once, in order, each of one adapter and at most BLOCK_M rows
    covered = []
    for adapter, start, end in g.blocks.tolist():
        assert 0 < end - start <= BLOCK_M
        rows = g.sorted_rows[start:end]
        assert bool((index[rows] == adapter).all()), (adapter, start, end)
        covered.extend(range(start, end))
    assert covered == list(range(n))
    # reduce blocks: the rows with an adapter, per adapter in order, at most REDUCE_M rows each
    covered = []
    offsets = g.reduce_offsets.tolist()
    for t in range(num_adapters):
        for adapter, start, end in g.reduce_blocks[offsets[t] : offsets[t + 1]].tolist():
            assert adapter == t and 0 < end - start <= REDUCE_M
            assert bool((index[g.sorted_rows[start:end]] == t).all())
            covered.extend(range(start, end))
    assert covered == list(range(g.num_active))
    return g


@pytest.mark.parametrize("n, num_adapters", [(0, 1), (1, 1), (5, 3), (127, 4), (2 * REDUCE_M + 3, 2)])
def test_grouping_tables(n, num_adapters):
    check_tables(torch.randint(-1, num_adapters, (n,)), num_adapters)


def test_grouping_special_patterns():
    check_tables(torch.full((70,), -1), 3)  # nothing to do but copy
    check_tables(torch.full((300,), 2), 3)  # one adapter, several blocks, adapters 0 and 1 empty
    g = check_tables(torch.tensor([2, -1, 0, 2, 0], dtype=torch.int32), 3)
    assert g.adapter_index.dtype == torch.int64


@pytest.mark.parametrize(
    "index, num_adapters, error, pattern",
    [
        (
            torch.tensor([0, 3]),
            3,
            ValueError,
            r"adapter_index values must be in \[-1, num_adapters\) = \[-1, 3\), got 3",
        ),
        (torch.tensor([0, -2]), 3, ValueError, r"\[-1, 3\), got -2"),
        (torch.tensor([0.0, 1.0]), 3, TypeError, r"adapter_index must have an integer dtype .* got float32"),
        (torch.tensor([True]), 3, TypeError, r"integer dtype .* got bool"),
        (torch.zeros(2, 3, dtype=torch.long), 3, ValueError, r"adapter_index must have 1 dims \[N\]"),
        (torch.zeros(2, dtype=torch.long), 0, ValueError, r"num_adapters must be an int >= 1, got 0"),
        ([0, 1], 3, TypeError, r"adapter_index must be a torch.Tensor, got list"),
    ],
    ids=lambda v: None,
)
def test_grouping_bad_input(index, num_adapters, error, pattern):
    with pytest.raises(error, match=pattern):
        group_by_adapter(index, num_adapters)


N, IN, OUT, R, T = 6, 5, 7, 3, 2
X = torch.randn(N, IN)
BASE = torch.randn(N, OUT)
A = torch.randn(T, R, IN)
B = torch.randn(T, OUT, R)
S = torch.ones(T)
G = group_by_adapter(torch.tensor([0, 1, -1, 1, 0, 0]), T)


def call(**changes):
    args = dict(base_out=BASE, x=X, lora_a=A, lora_b=B, scaling=S, grouping=G)
    args.update(changes)
    return multi_lora_linear_add(**args)


@pytest.mark.parametrize(
    "changes, error, pattern",
    [
        (dict(x=torch.randn(N, IN + 1)), ValueError, r"lora_a \[T, R, in\] has in = 5, but x \[N, in\] has in = 6"),
        (dict(base_out=torch.randn(N + 1, OUT)), ValueError, r"base_out has N = 7 rows, x has N = 6"),
        (
            dict(lora_b=torch.randn(T, OUT + 1, R)),
            ValueError,
            r"lora_b must have shape \[T, out, R\] = \(2, 7, 3\).*got \(2, 8, 3\)",
        ),
        (dict(lora_b=torch.randn(T, OUT, R + 1)), ValueError, r"lora_b must have shape \[T, out, R\] = \(2, 7, 3\)"),
        (dict(lora_b=torch.randn(T + 1, OUT, R)), ValueError, r"lora_b must have shape"),
        (dict(scaling=torch.ones(T + 1)), ValueError, r"scaling must have shape \[T\] = \(2,\), got \(3,\)"),
        (dict(scaling=torch.ones(T, dtype=torch.long)), TypeError, r"scaling must be a float tensor"),
        (dict(x=torch.randn(N, IN, 1)), ValueError, r"x must have 2 dims \[N, in\]"),
        (dict(lora_a=torch.randn(R, IN)), ValueError, r"lora_a must have 3 dims \[T, R, in\]"),
        (dict(lora_a=torch.randn(T, 0, IN), lora_b=torch.randn(T, OUT, 0)), ValueError, r"R >= 1"),
        (dict(x=X.half()), TypeError, r"base_out must have x's dtype \(float16\), got float32"),
        (dict(lora_b=B.double()), TypeError, r"lora_b must have x's dtype \(float32\), got float64"),
        (dict(x=X.long()), TypeError, r"x must have dtype in \[.*\], got int64"),
        (
            dict(grouping=group_by_adapter(torch.zeros(N + 1, dtype=torch.long), T)),
            ValueError,
            r"grouping was built for N = 7 rows, x has N = 6",
        ),
        (
            dict(grouping=group_by_adapter(torch.zeros(N, dtype=torch.long), T + 1)),
            ValueError,
            r"grouping was built for T = 3 adapters, lora_a has T = 2",
        ),
        (
            dict(grouping=torch.zeros(N, dtype=torch.long)),
            TypeError,
            r"grouping must be the LoRAGrouping returned by group_by_adapter, got Tensor",
        ),
        (dict(lora_a=A.to("meta")), ValueError, r"lora_a must be on the same device as x \(cpu\), got meta"),
        (dict(base_out=[1.0]), TypeError, r"base_out must be a torch.Tensor, got list"),
        (dict(backend="fastest"), ValueError, r"argument backend must be one of .* got 'fastest'"),
    ],
    ids=lambda v: None,
)
def test_bad_input_raises_clear_error(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**changes)


def test_auto_on_cpu_picks_reference_not_the_interpreter():
    chosen = select_backend("multi_lora_linear_add", BACKENDS, "auto", torch.device("cpu"), torch.float32, A)
    assert chosen.name == "reference"


@pytest.mark.gpu
def test_auto_on_gpu_picks_triton():
    a = A.cuda().bfloat16()
    chosen = select_backend("multi_lora_linear_add", BACKENDS, "auto", torch.device("cuda"), torch.bfloat16, a)
    assert chosen.name == "triton"


def test_triton_backend_refusals_say_why():
    with pytest.raises(BackendUnavailableError, match=r"triton: supports dtypes .*got float64"):
        call(x=X.double(), base_out=BASE.double(), lora_a=A.double(), lora_b=B.double(), backend="triton")
    big = MAX_TRITON_RANK + 1
    with pytest.raises(
        BackendUnavailableError, match=rf"triton: supports r_max <= {MAX_TRITON_RANK}, got lora_a with R = {big}"
    ):
        call(lora_a=torch.randn(T, big, IN), lora_b=torch.randn(T, OUT, big), backend="triton")
    # ... while the reference takes both
    assert call(lora_a=torch.randn(T, big, IN), lora_b=torch.randn(T, OUT, big), backend="reference").shape == (N, OUT)


def test_validate_false_skips_checks_but_not_index_checks():
    # validate=False trusts the metadata (no Python checks on the hot path) ...
    assert call(validate=False).shape == (N, OUT)
    # ... index values are always checked, once, by group_by_adapter.
    with pytest.raises(ValueError, match="adapter_index values"):
        group_by_adapter(torch.tensor([0, 5]), T)
