"""Benchmark of masked_mean_pool: eager reference, torch.compile of it, Triton and CUDA.

GPU shapes are the targets' (bf16, B=64, L=512, D=4096, lengths uniform in L/4..L), padded and
packed with the same real tokens; CPU shapes are small. Bytes count what each mode must move as
the targets count it: the forward reads the whole padded tensor (or the T packed rows) and
writes [B, D]; the backward reads [B, D] and writes the whole gradient.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..ops.masked_mean import BACKENDS, masked_mean_pool, masked_mean_pool_ref
from .harness import Measurement, measure, selected

OP = "masked_mean_pool"


def _inputs(device: torch.device):
    if device.type == "cuda":
        B, L, D, dtype = 64, 512, 4096, torch.bfloat16
    else:
        B, L, D, dtype = 8, 128, 256, torch.float32
    lengths = torch.randint(L // 4, L + 1, (B,), device=device)
    mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
    hidden = torch.randn(B, L, D, device=device, dtype=dtype)
    packed = hidden[mask].contiguous()
    cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths.cumsum(0)
    return (B, L, D, dtype), hidden, mask, packed, cu


def _implementations(device: torch.device, dtype: torch.dtype, impls: Optional[Sequence[str]]):
    """name -> callable(hidden, mask, cu_seqlens), and name -> reason for those skipped."""
    chosen: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    for backend in ("reference", "triton", "cuda"):
        spec = next(b for b in BACKENDS if b.name == backend)
        reason = spec.why_not(device, dtype)
        if reason is None and backend == "triton" and device.type == "cpu":
            reason = "the Triton interpreter is a test tool, not a CPU backend"
        if reason is not None:
            skipped[backend] = reason
            continue
        # validate=False: the timed call must not include the host sync of the value checks.
        chosen[backend] = lambda h, m, cu, b=backend: masked_mean_pool(h, m, cu_seqlens=cu, backend=b, validate=False)
        if backend == "reference":
            chosen["reference+compile"] = torch.compile(masked_mean_pool_ref, dynamic=False)
            # Timing the backward alone replays it (retain_graph), which compiled backwards
            # with donated buffers refuse; donation saves memory, not time.
            torch._functorch.config.donated_buffer = False
    chosen = selected(chosen, impls, skipped)
    return chosen, skipped


def run(device: torch.device, copy_gbps: float, impls: Optional[Sequence[str]] = None):
    """Measure every implementation in forward, backward and forward+backward, padded and packed."""
    (B, L, D, dtype), hidden, mask, packed, cu = _inputs(device)
    chosen, skipped = _implementations(device, dtype, impls)
    elt = hidden.element_size()
    T = packed.shape[0]
    dtype_name = str(dtype).replace("torch.", "")
    cases = [
        (f"padded {dtype_name} B{B}-L{L}-D{D}", hidden, mask, None, B * L * D * elt),
        (f"packed {dtype_name} B{B}-T{T}-D{D}", packed, None, cu, T * D * elt),
    ]
    rows: list[Measurement] = []
    for case, x, m, c, big_bytes in cases:
        io_bytes = {"fwd": big_bytes + B * D * elt, "bwd": big_bytes + B * D * elt}
        io_bytes["fwd+bwd"] = io_bytes["fwd"] + io_bytes["bwd"]
        x = x.detach().requires_grad_()
        grad_out = torch.randn(B, D, device=device, dtype=dtype)
        for name, fn in chosen.items():
            out = fn(x, m, c)  # warm-up, compiles
            torch.autograd.grad(out, x, grad_out)
            for mode, call in _mode_calls(fn, x, m, c, grad_out).items():
                rows.append(measure(OP, case, name, mode, call, io_bytes[mode], device, copy_gbps))
    return rows, skipped


def _mode_calls(fn, x, m, c, grad_out) -> dict:
    """The timed calls of one implementation: forward, backward of one kept graph, both."""

    def fwd():
        with torch.no_grad():
            return fn(x, m, c)

    graph_out = fn(x, m, c)

    def bwd():
        return torch.autograd.grad(graph_out, x, grad_out, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(fn(x, m, c), x, grad_out)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


TARGETS_MS = {"fwd": 0.10, "fwd+bwd": 0.22}


def summarize(rows: list[Measurement]) -> str:
    """The issue's targets against the best kernel, stated as met or missed with numbers."""
    kernels = [r for r in rows if r.impl in ("triton", "cuda")]
    if not kernels:
        return "targets: no kernel backend ran on this device"
    lines = []
    for mode, target in TARGETS_MS.items():
        best = min((r for r in kernels if r.mode == mode and r.case.startswith("padded")), key=lambda r: r.median_ms)
        verdict = "met" if best.median_ms <= target else "MISSED"
        lines.append(
            f"target padded {mode} <= {target} ms: {best.impl} {best.median_ms:.4f} ms "
            f"({best.pct_copy:.0f}% of copy) -> {verdict}"
        )
    for impl in sorted({r.impl for r in kernels}):
        t = {r.case.split()[0]: r.median_ms for r in kernels if r.impl == impl and r.mode == "fwd+bwd"}
        if {"padded", "packed"} <= t.keys():
            verdict = "met" if t["packed"] <= t["padded"] else "MISSED"
            lines.append(
                f"target packed <= padded per real token (same tokens), {impl} fwd+bwd: "
                f"{t['packed']:.4f} vs {t['padded']:.4f} ms -> {verdict}"
            )
    return "\n".join(lines)
