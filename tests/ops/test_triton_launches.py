"""Every Triton launch runs under its tensors' device guard, and grids stay within CUDA's limits.

Triton launches on the current device, not on the device of its tensors; each launcher must
enter ``device_guard``. The interpreter cannot show a wrong device, so the guard is replaced by
a recorder and every kernel's ``run`` checks that it is called inside it.
"""

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch

from latentembed.ops import (
    geglu_segment_mean,
    group_by_adapter,
    infonce_lse,
    latent_cross_attention,
    masked_mean_pool,
    multi_lora_linear_add,
)
from latentembed.ops.dispatch import device_guard
from tests.ops._common import DEVICE

TRITON_MODULES = [
    importlib.import_module(f"latentembed.ops.{op}.triton")
    for op in ("masked_mean", "latent_attention", "infonce", "multi_lora")
]
# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1).
MAX_GRID_YZ = 65535


def _kernels(module):
    """The launchable kernels of a module (@triton.jit helpers called inside kernels are not)."""
    return {name: obj for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "run")}


def test_device_guard_picks_the_tensors_device():
    assert isinstance(device_guard(torch.zeros(2)), contextlib.nullcontext)
    guard = device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def _every_triton_op_forward_and_backward():
    """One call of each public op on the Triton backend, forward and backward, reaching every kernel."""
    h = torch.randn(3, 7, 10, device=DEVICE, requires_grad=True)
    mask = torch.rand(3, 7, device=DEVICE) < 0.7
    masked_mean_pool(h, mask, backend="triton").sum().backward()
    packed = torch.randn(9, 10, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    masked_mean_pool(packed, cu_seqlens=cu, backend="triton").sum().backward()

    x, m, u = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((9, 12), (2, 5, 12), (2, 5, 12)))
    w, b = torch.ones(12, device=DEVICE, requires_grad=True), torch.zeros(12, device=DEVICE, requires_grad=True)
    latent_cross_attention(x, w, b, m, u, backend="triton").sum().backward()
    a = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    geglu_segment_mean(a, cu, backend="triton").sum().backward()

    q, d = torch.randn(5, 8, device=DEVICE, requires_grad=True), torch.randn(11, 8, device=DEVICE, requires_grad=True)
    lse, _ = infonce_lse(q, d, 3.0, pos_index=torch.randint(0, 11, (5,), device=DEVICE), backend="triton")
    lse.sum().backward()

    index = torch.randint(-1, 3, (13,), device=DEVICE)
    lx, base = torch.randn(13, 6, device=DEVICE, requires_grad=True), torch.randn(13, 4, device=DEVICE)
    la = torch.randn(3, 2, 6, device=DEVICE, requires_grad=True)
    lb = torch.randn(3, 4, 2, device=DEVICE, requires_grad=True)
    scaling = torch.rand(3, device=DEVICE)
    multi_lora_linear_add(base, lx, la, lb, scaling, group_by_adapter(index, 3), backend="triton").sum().backward()


def test_every_launch_is_inside_the_device_guard(monkeypatch):
    state = SimpleNamespace(depth=0, guarded=[], launches=[])

    @contextlib.contextmanager
    def recording_guard(tensor):
        state.guarded.append(tensor.device)
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1

    def recording_run(name, run):
        def run_and_record(*args, **kwargs):
            state.launches.append((name, state.depth > 0))
            return run(*args, **kwargs)

        return run_and_record

    expected = set()
    for module in TRITON_MODULES:
        monkeypatch.setattr(module, "device_guard", recording_guard)  # fails if a module never uses it
        for name, kernel in _kernels(module).items():
            expected.add(name)
            monkeypatch.setattr(kernel, "run", recording_run(name, kernel.run))
    _every_triton_op_forward_and_backward()

    launched = {name for name, _ in state.launches}
    assert launched == expected, f"kernels never launched by the calls above: {sorted(expected - launched)}"
    unguarded = sorted({name for name, inside in state.launches if not inside})
    assert not unguarded, f"launched outside device_guard: {unguarded}"
    assert set(state.guarded) == {torch.empty(0, device=DEVICE).device}, "guarded on another device"


def test_latent_attention_grids_take_two_million_rows(monkeypatch):
    # T = 2**21 rows is 524,288 row blocks of 4 (the smallest BLOCK_T of the GPU configs, the
    # softmax backward's): past CUDA's 65,535 on grid axes 1 and 2. The kernels are not run; their grids are kept and
    # evaluated with the smallest block sizes any config uses.
    from latentembed.ops.latent_attention import triton as lat

    grids = {}

    def keep_grid(name):
        def run(*args, grid, warmup, **kwargs):
            grids[name] = grid

        return run

    for name, kernel in _kernels(lat).items():
        monkeypatch.setattr(kernel, "run", keep_grid(name))
    T, D, H, R = 2**21, 8, 2, 1
    x = torch.randn(T, D)
    w, b = torch.ones(D), torch.zeros(D)
    m, u = torch.randn(H, R, D), torch.randn(H, R, D)
    y, probs, mean, rstd = lat.latent_attn_fwd_triton(x, w, b, m, u, 1e-5)
    lat.latent_attn_bwd_triton(torch.randn(T, D), x, w, b, m, u, probs, mean, rstd, True, True)

    smallest = {"BLOCK_T": 4, "BLOCK_D": 16, "BLOCK_N": 32}
    expected = {"_ln_stats_kernel", "_scores_softmax_kernel", "_softmax_bwd_kernel", "_dm_kernel", "_ln_bwd_kernel"}
    assert set(grids) == expected
    for name, grid in grids.items():
        axes = tuple(grid(smallest) if callable(grid) else grid)
        assert axes[0] <= 2**31 - 1 and all(n <= MAX_GRID_YZ for n in axes[1:]), f"{name}: grid {axes}"
    for name in ("_scores_softmax_kernel", "_softmax_bwd_kernel"):  # one program per (head, row block)
        axes = grids[name](smallest)
        assert torch.Size(axes).numel() == H * T // 4, f"{name}: grid {axes}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ops_run_on_the_second_gpu():
    # Tensors on cuda:1 while cuda:0 is current: every Triton op must match its reference there.
    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    h, mask = torch.randn(3, 7, 64, device=dev), torch.rand(3, 7, device=dev) < 0.7
    torch.testing.assert_close(
        masked_mean_pool(h, mask, backend="triton"), masked_mean_pool(h, mask, backend="reference")
    )
    q, d, pos = torch.randn(5, 64, device=dev), torch.randn(11, 64, device=dev), torch.arange(5, device=dev)
    torch.testing.assert_close(
        infonce_lse(q, d, 3.0, pos_index=pos, backend="triton")[0],
        infonce_lse(q, d, 3.0, pos_index=pos, backend="reference")[0],
    )
    x, m, u = torch.randn(9, 64, device=dev), torch.randn(2, 16, 64, device=dev) / 8, torch.randn(2, 16, 64, device=dev)
    w, b = torch.ones(64, device=dev), torch.zeros(64, device=dev)
    torch.testing.assert_close(
        latent_cross_attention(x, w, b, m, u, backend="triton"),
        latent_cross_attention(x, w, b, m, u, backend="reference"),
        rtol=1e-4,
        atol=1e-4,
    )
    assert torch.cuda.current_device() == 0
