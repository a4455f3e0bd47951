"""Op-level benchmark of the latent-attention kernels: latent_cross_attention and
geglu_segment_mean, each against plain PyTorch (eager and torch.compile) in the same run.

GPU case: NV-Embed-v2 (bf16, hidden 4096, 8 heads, 512 latents, feed-forward width 2 x 16384) on
the pooled rows of 16 sequences of 64..512 tokens (~4.6k rows); CPU: a tiny fp32 case on which
only the PyTorch implementations run (the Triton interpreter is a test tool). The whole pooling
block is benchmarked by ``latent_attention_pooling``; this one says which op costs what.

latent_cross_attention is compute-bound: its rows report TFLOP/s and % of the 707 TFLOP/s bf16
matmul ceiling (forward 4 T D H R FLOPs: scores and P U; forward+backward three times that).
geglu_segment_mean is bandwidth-bound: GB/s and % of the measured copy bandwidth (it reads
[T, 2F] and, backward, writes [T, 2F]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops.latent_attention import (
    ATTENTION_BACKENDS,
    GEGLU_BACKENDS,
    geglu_segment_mean,
    geglu_segment_mean_ref,
    latent_cross_attention,
)
from .harness import MATMUL_CEILING_TFLOPS, Measurement, median_ms, peak_extra_mib

OP = "latent_attention_ops"


@dataclass
class OpMeasurement(Measurement):
    tflops: float = 0.0
    pct_ceiling: float = 0.0  # of MATMUL_CEILING_TFLOPS (0 for the bandwidth-bound op)


def _plain_attention(x, ln_weight, ln_bias, m, u, eps=1e-5):
    """The folded block as plain PyTorch in x's dtype (what an eager module would run)."""
    dt = x.dtype
    xn = F.layer_norm(x, (x.shape[1],), ln_weight.to(dt), ln_bias.to(dt), eps)
    probs = torch.softmax(torch.einsum("td,hrd->thr", xn, m), dim=-1)
    return x + torch.einsum("thr,hrd->td", probs, u)


def _case(device: torch.device):
    if device.type == "cuda":
        D, H, R, Fw, B, dtype = 4096, 8, 512, 16384, 16, torch.bfloat16
        lengths = torch.randint(64, 513, (B,))
    else:
        D, H, R, Fw, B, dtype = 64, 2, 16, 128, 4, torch.float32
        lengths = torch.randint(4, 17, (B,))
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    T = int(cu[-1])
    x = (torch.randn(T, D, device=device) + 0.3).to(dtype)
    ln = (1 + 0.1 * torch.randn(D, device=device), 0.1 * torch.randn(D, device=device))
    m = (2 * torch.randn(H, R, D, device=device) / D**0.5).to(dtype)
    u = (torch.randn(H, R, D, device=device) / H**0.5).to(dtype)
    a = (2 * torch.randn(T, 2 * Fw, device=device)).to(dtype)
    return (T, D, H, R, Fw, dtype), (x, *ln, m, u), a, cu.to(device)


def _kernels(backends, device, dtype, skipped, *args):
    names = []
    for spec in backends:
        if spec.name == "reference":
            continue
        reason = spec.why_not(device, dtype, *args)
        if reason is None and device.type == "cpu":
            reason = "the Triton interpreter is a test tool, not a CPU backend"
        if reason is None:
            names.append(spec.name)
        else:
            skipped.setdefault(spec.name, reason)
    return names


def _time(op, case, impl, fn, inputs, grad_out, bytes_by_mode, flops_by_mode, device, copy_gbps):
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    diff = [t for t in leaves if t.requires_grad]
    torch.autograd.grad(fn(*leaves), diff, grad_out)  # warm-up: autotune, compile

    def fwd():
        with torch.no_grad():
            return fn(*leaves)

    def fwd_bwd():
        return torch.autograd.grad(fn(*leaves), diff, grad_out)

    rows = []
    for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        ms = median_ms(call, device)
        gbps = bytes_by_mode[mode] / (ms * 1e-3) / 1e9
        tflops = flops_by_mode[mode] / (ms * 1e-3) / 1e12
        rows.append(
            OpMeasurement(
                op,
                case,
                impl,
                mode,
                ms,
                bytes_by_mode[mode],
                gbps,
                100 * gbps / copy_gbps,
                peak_extra_mib(call, device),
                tflops,
                100 * tflops / MATMUL_CEILING_TFLOPS,
            )
        )
    return rows


def run(device: torch.device, copy_gbps: float, impls: Optional[Sequence[str]] = None):
    """Forward and forward+backward of each op and implementation; rows and skip reasons."""
    (T, D, H, R, Fw, dtype), attn_in, a, cu = _case(device)
    skipped: dict[str, str] = {}
    elt = torch.finfo(dtype).bits // 8
    dname = str(dtype).replace("torch.", "")
    # Timing a compiled backward alone is not done here, but keep buffers reusable for replays.
    torch._functorch.config.donated_buffer = False

    attn: dict[str, Callable] = {"torch": _plain_attention, "torch+compile": torch.compile(_plain_attention)}
    for name in _kernels(ATTENTION_BACKENDS, device, dtype, skipped, R):
        attn[name] = lambda *t, b=name: latent_cross_attention(*t, backend=b)
    geglu: dict[str, Callable] = {
        "torch": lambda a_, c: geglu_segment_mean_ref(a_, c),
        "torch+compile": torch.compile(geglu_segment_mean_ref, dynamic=False),
    }
    for name in _kernels(GEGLU_BACKENDS, device, dtype, skipped):
        geglu[name] = lambda a_, c, b=name: geglu_segment_mean(a_, c, backend=b, validate=False)
    if impls:
        attn = {k: v for k, v in attn.items() if k in impls}
        geglu = {k: v for k, v in geglu.items() if k in impls}

    rows: list[Measurement] = []
    io = 2 * T * D * elt + 2 * H * R * D * elt
    flops = 4 * T * D * H * R
    case = f"xattn {dname} T{T}-D{D}-H{H}-R{R}"
    grad_y = torch.randn(T, D, device=device, dtype=dtype)
    for name, fn in attn.items():
        rows += _time(
            "latent_cross_attention",
            case,
            name,
            fn,
            attn_in,
            grad_y,
            {"fwd": io, "fwd+bwd": 3 * io},
            {"fwd": flops, "fwd+bwd": 3 * flops},
            device,
            copy_gbps,
        )
    B = cu.shape[0] - 1
    io = T * 2 * Fw * elt + B * Fw * elt
    case = f"geglu_mean {dname} B{B}-T{T}-F{Fw}"
    grad_out = torch.randn(B, Fw, device=device, dtype=dtype)
    for name, fn in geglu.items():
        rows += _time(
            "geglu_segment_mean",
            case,
            name,
            fn,
            (a, cu),
            grad_out,
            {"fwd": io, "fwd+bwd": 2 * io + T * 2 * Fw * elt},
            {"fwd": 0, "fwd+bwd": 0},
            device,
            copy_gbps,
        )
    return rows, skipped


def summarize(rows: list[Measurement]) -> str:
    """Each kernel against the best PyTorch implementation of the same op and mode."""
    lines = []
    for op in ("latent_cross_attention", "geglu_segment_mean"):
        for mode in ("fwd", "fwd+bwd"):
            same = [r for r in rows if r.op == op and r.mode == mode]
            torch_rows = [r for r in same if r.impl.startswith("torch")]
            kernels = [r for r in same if not r.impl.startswith("torch")]
            if not torch_rows or not kernels:
                continue
            base = min(torch_rows, key=lambda r: r.median_ms)
            for k in kernels:
                rate = (
                    f"{k.tflops:.0f} TFLOP/s ({k.pct_ceiling:.0f}% of ceiling)"
                    if k.tflops
                    else f"{k.pct_copy:.0f}% of copy"
                )
                verdict = "faster" if k.median_ms < base.median_ms else "SLOWER"
                lines.append(
                    f"{op} {mode}: {k.impl} {k.median_ms:.3f} ms, {rate}; best PyTorch "
                    f"({base.impl}) {base.median_ms:.3f} ms -> {verdict}"
                )
    return "\n".join(lines) or "no kernel backend ran on this device (PyTorch rows only)"
