"""Benchmark of NV-Embed latent-attention pooling: LatentAttentionPooling against the unfolded
public block and against torch.compile of a plain-PyTorch folded block over every position.

GPU case: the issue's (bf16, NV-Embed-v2 config, 16 sequences x 512 positions, lengths uniform in
64..512, pool mask = real tokens); CPU: a tiny config in fp32. Modes:

* ``fwd``: inference (no_grad, eval mode): the folded M, U are cached, so the fold is not timed.
* ``fwd(train)``: a training-mode forward (grad enabled, the fold rebuilt from the weights).
* ``fwd+bwd``: a training step (training mode): gradients of the hidden states and of every
  parameter.
* ``fwd+bwd(frozen)``: gradients of the hidden states only, the block frozen (fold cached).

FLOPs count the useful work on pooled tokens with both folds applied (per token: 2 GEMMs of
width heads*latents plus the feed-forward's first Linear; W2 once per sequence), plus in the
training modes the fold itself (K/V of the latents, M, U) and all backward GEMMs (2x the forward
of what gets a gradient). "% floor" is the share of ``MATMUL_CEILING_TFLOPS`` (the bf16 matmul ceiling
measured on the H100), the same for every implementation, so it compares the implementations'
useful throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..modules.latent_attention import LatentAttentionPooling
from ..modules.latent_attention_unfolded import UnfoldedLatentAttentionPooling
from ..ops.latent_attention import ATTENTION_BACKENDS
from .harness import MATMUL_CEILING_TFLOPS, Measurement, median_ms, peak_extra_mib, selected

OP = "latent_attention_pooling"
NVEMBED_V2 = dict(hidden_size=4096, num_latents=512, num_heads=8, dim_head=4096, ff_mult=4)
TINY = dict(hidden_size=64, num_latents=16, num_heads=2, dim_head=32, ff_mult=2)
TARGETS = {"fwd_ms": 2.6, "fwd+bwd_ms": 8.0, "peak_ratio": 0.5}


@dataclass
class FlopMeasurement(Measurement):
    flops: float = 0.0
    tflops: float = 0.0
    pct_floor: float = 0.0  # of MATMUL_CEILING_TFLOPS


def _flops(cfg: dict, tokens: int, batch: int, mode: str) -> float:
    D, R, H, dh = cfg["hidden_size"], cfg["num_latents"], cfg["num_heads"], cfg["dim_head"]
    Fw = cfg["ff_mult"] * D
    per_token = 2 * D * H * R * 2 + 2 * D * 2 * Fw  # scores, P U, first feed-forward Linear
    forward = tokens * per_token + batch * 2 * Fw * D  # + W2 once per sequence
    fold = 2 * R * D * 2 * H * dh + 2 * (2 * H * R * dh * D)  # [K V] = LN(lat) Wkv^T; M; U
    if mode == "fwd":
        return forward
    if mode == "fwd(train)":
        return forward + fold
    if mode == "fwd+bwd(frozen)":
        # dx only: the weight-gradient GEMMs (half of each backward) are skipped
        return 2 * forward
    return 3 * (forward + fold)


def _inputs(device: torch.device):
    if device.type == "cuda":
        cfg, B, L, dtype = NVEMBED_V2, 16, 512, torch.bfloat16
    else:
        cfg, B, L, dtype = TINY, 4, 32, torch.float32
    lengths = torch.randint(L // 8, L + 1, (B,), device=device)
    mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
    hidden = torch.randn(B, L, cfg["hidden_size"], device=device, dtype=dtype)
    return cfg, dtype, hidden, mask


def folded_every_position(module: LatentAttentionPooling, hidden, mask, m=None, u=None):
    """The baseline: both folds in plain PyTorch, applied to every position of the padded batch
    (the fold itself computed here when m, u are not given)."""
    if m is None:
        m, u = module.fold(hidden.dtype)
    attn_block, ff_block = module.cross_attend_blocks
    net = ff_block.fn.net
    B, L, D = hidden.shape
    H, R = m.shape[:2]
    x = hidden.reshape(B * L, D)
    xn = F.layer_norm(x, (D,), attn_block.norm.weight, attn_block.norm.bias, attn_block.norm.eps)
    probs = (xn @ m.reshape(H * R, D).t()).view(B * L, H, R).softmax(-1)
    y = x + probs.view(B * L, H * R) @ u.reshape(H * R, D)
    z = F.layer_norm(y, (D,), ff_block.norm.weight, ff_block.norm.bias, ff_block.norm.eps)
    value, gate = F.linear(z, net[0].weight, net[0].bias).chunk(2, dim=-1)
    act = (value * F.gelu(gate)).view(B, L, -1)
    keep = mask[..., None]
    count = keep.sum(1).float()
    act_mean = (torch.where(keep, act, 0).sum(1, dtype=torch.float32) / count.clamp_min(1)).to(hidden.dtype)
    y_mean = torch.where(keep, y.view(B, L, D), 0).sum(1, dtype=torch.float32) / count.clamp_min(1)
    out = y_mean + F.linear(act_mean, net[2].weight).float() + (count > 0) * net[2].bias.float()
    return F.normalize(out, dim=-1).to(hidden.dtype)


class _Pooling:
    """LatentAttentionPooling called with one backend for its ops, the pooled-row count given
    (no device sync) and no value checks: what a training loop that knows its masks runs."""

    def __init__(self, module: LatentAttentionPooling, backend: str, num_pooled: int):
        self.module, self.backend, self.num_pooled = module, backend, num_pooled

    def __call__(self, hidden, mask):
        self.module.backend = self.backend
        return self.module(hidden, mask, num_pooled=self.num_pooled, validate=False)


# The cross-attention's two paths, besides auto (Triton on CUDA: LayerNorm inside the score
# GEMM, a 64 x 512 score tile a program): the CUDA backend (LayerNorm and softmax kernels around
# cuBLAS GEMMs) and the reference (plain PyTorch: cuBLAS GEMMs, PyTorch's softmax).
PATHS = {"latentembed:cuda": "cuda", "latentembed:reference": "reference"}


def _implementations(device: torch.device, cfg: dict, dtype, impls: Optional[Sequence[str]], num_pooled: int):
    skipped: dict[str, str] = {}
    with torch.device(device):  # initialise on the device: the NV-Embed block has 0.74 B parameters
        unfolded = UnfoldedLatentAttentionPooling(**cfg)
        fast = LatentAttentionPooling(**cfg)
    unfolded.to(dtype)
    fast.to(dtype).load_state_dict(unfolded.state_dict())
    chosen: dict[str, torch.nn.Module | Callable] = {"latentembed": _Pooling(fast, "auto", num_pooled)}
    for name, backend in PATHS.items():
        spec = next(b for b in ATTENTION_BACKENDS if b.name == backend)
        reason = spec.why_not(device, dtype, cfg["num_latents"])
        if reason is None and device.type == "cpu" and backend != "reference":
            reason = "CUDA only"
        if reason is None:
            chosen[name] = _Pooling(fast, backend, num_pooled)
        else:
            skipped[name] = reason
    chosen["unfolded"] = unfolded
    if device.type == "cuda" or (impls and "folded+compile" in impls):
        # Timing the backward replays compiled graphs; donated buffers would refuse that.
        torch._functorch.config.donated_buffer = False
        train = torch.compile(lambda h, msk: folded_every_position(fast, h, msk), dynamic=False)
        infer = torch.compile(lambda h, msk, m, u: folded_every_position(fast, h, msk, m, u), dynamic=False)
        chosen["folded+compile"] = (train, infer)
    else:
        skipped["folded+compile"] = "compiled with inductor on the GPU only (compiling takes longer than the CPU run)"
    chosen = selected(chosen, impls, skipped)
    return chosen, skipped, fast


def _callables(name, impl, fast, hidden, mask, grad_out):
    """mode -> zero-argument callable for one implementation."""
    params = list(fast.parameters()) if name != "unfolded" else list(impl.parameters())
    if name == "folded+compile":
        train, infer = impl
        with torch.no_grad():
            m, u = fast.fold(hidden.dtype)
        forward_infer = lambda: infer(hidden, mask, m, u)  # noqa: E731
        forward_train = lambda h: train(h, mask)  # noqa: E731
    else:
        forward_infer = lambda: impl(hidden, mask)  # noqa: E731
        forward_train = lambda h: impl(h, mask)  # noqa: E731
    h = hidden.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return forward_infer()

    def fwd_train():
        return forward_train(h)

    def fwd_bwd():
        return torch.autograd.grad(forward_train(h), [h, *params], grad_out)

    def fwd_bwd_frozen():
        for p in params:
            p.requires_grad_(False)
        try:
            return torch.autograd.grad(forward_train(h), h, grad_out)
        finally:
            for p in params:
                p.requires_grad_(True)

    modes = {"fwd": fwd, "fwd(train)": fwd_train, "fwd+bwd": fwd_bwd, "fwd+bwd(frozen)": fwd_bwd_frozen}
    if name != "latentembed":
        modes.pop("fwd(train)")  # same work as its fwd for the others
    if name in PATHS:  # the other cross-attention paths: inference and the training step
        return {mode: modes[mode] for mode in ("fwd", "fwd+bwd")}
    return modes


def run(device: torch.device, copy_gbps: float, impls: Optional[Sequence[str]] = None):
    """Measure every implementation in every mode on the same batch."""
    cfg, dtype, hidden, mask = _inputs(device)
    T = int(mask.sum())
    chosen, skipped, fast = _implementations(device, cfg, dtype, impls, T)
    B, L, D = hidden.shape
    dtype_name = str(dtype).replace("torch.", "")
    case = f"{dtype_name} D{D}-R{cfg['num_latents']}-H{cfg['num_heads']}x{cfg['dim_head']} B{B}-L{L}-T{T}"
    weight_bytes = sum(p.numel() * p.element_size() for p in fast.parameters())
    grad_out = torch.randn(B, D, device=device, dtype=dtype)
    rows: list[Measurement] = []
    for name, impl in chosen.items():
        for mode, call in _callables(name, impl, fast, hidden, mask, grad_out).items():
            # Eval mode caches LatentAttentionPooling's fold even with grad enabled: the training
            # modes must run in training mode to time the fold and its backward.
            for module in (fast, impl):
                if isinstance(module, torch.nn.Module):
                    module.train(mode != "fwd")
            call()  # warm-up: compiles, autotunes, fills the fold cache
            ms = median_ms(call, device)
            flops = _flops(cfg, T, B, mode)
            tflops = flops / (ms * 1e-3) / 1e12
            io = weight_bytes + T * D * hidden.element_size()
            gbps = io / (ms * 1e-3) / 1e9
            rows.append(
                FlopMeasurement(
                    OP,
                    case,
                    name,
                    mode,
                    ms,
                    io,
                    gbps,
                    100 * gbps / copy_gbps,
                    peak_extra_mib(call, device),
                    flops=flops,
                    tflops=tflops,
                    pct_floor=100 * tflops / MATMUL_CEILING_TFLOPS,
                )
            )
    return rows, skipped


def summarize(rows: list[Measurement]) -> str:
    """TFLOP/s table and the issue's targets, each stated met or MISSED with numbers."""
    if not rows:
        return "targets: nothing ran"
    lines = [f"{'impl':<16} {'mode':<16} {'median ms':>10} {'TFLOP/s':>8} {'% floor':>8} {'peak MiB':>9}"]
    for r in rows:
        peak = "-" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.0f}"
        lines.append(
            f"{r.impl:<16} {r.mode:<16} {r.median_ms:>10.3f} {getattr(r, 'tflops', 0):>8.2f} "
            f"{getattr(r, 'pct_floor', 0):>7.1f}% {peak:>9}"
        )
    by = {(r.impl, r.mode): r for r in rows}
    ours = {mode: by.get(("latentembed", mode)) for mode in ("fwd", "fwd+bwd")}
    if ours["fwd"] is None or not rows[0].case.startswith("bfloat16 D4096"):
        lines.append("targets: stated for the GPU case (bf16, NV-Embed-v2 config) with impl latentembed only")
        return "\n".join(lines)
    for mode in ("fwd", "fwd+bwd"):
        r, target = ours[mode], TARGETS[f"{mode}_ms"]
        floor_ms = r.flops / (MATMUL_CEILING_TFLOPS * 1e12) * 1e3
        lines.append(
            f"target {mode} <= {target} ms: {r.median_ms:.3f} ms ({r.tflops:.0f} TFLOP/s, "
            f"{r.pct_floor:.0f}% of the floor {floor_ms:.2f} ms) -> {'met' if r.median_ms <= target else 'MISSED'}"
        )
        for base in ("latentembed:cuda", "latentembed:reference", "unfolded", "folded+compile"):
            b = by.get((base, mode))
            if b is not None:
                lines.append(f"  vs {base} {mode}: {b.median_ms:.3f} ms ({b.median_ms / r.median_ms:.1f}x)")
        unfolded = by.get(("unfolded", mode))
        if unfolded is not None and r.peak_extra_mib is not None and unfolded.peak_extra_mib:
            ratio = r.peak_extra_mib / unfolded.peak_extra_mib
            lines.append(
                f"target peak memory {mode} <= {TARGETS['peak_ratio']:.0%} of the unfolded block's: "
                f"{r.peak_extra_mib:.0f} vs {unfolded.peak_extra_mib:.0f} MiB ({ratio:.0%}) -> "
                f"{'met' if ratio <= TARGETS['peak_ratio'] else 'MISSED'}"
            )
    frozen = by.get(("latentembed", "fwd+bwd(frozen)"))
    if frozen is not None:
        lines.append(
            f"info: fwd+bwd with the block frozen (hidden-state gradient only): {frozen.median_ms:.3f} ms "
            f"({'within' if frozen.median_ms <= TARGETS['fwd+bwd_ms'] else 'above'} the "
            f"{TARGETS['fwd+bwd_ms']} ms of the training target)"
        )
    full = ours["fwd+bwd"]
    floor_ms = full.flops / (MATMUL_CEILING_TFLOPS * 1e12) * 1e3
    if floor_ms > TARGETS["fwd+bwd_ms"]:
        lines.append(
            f"note: training every weight of the block costs {full.flops / 1e12:.2f} TFLOP a step "
            f"(tokens + the fold and their backward), a floor of {floor_ms:.2f} ms at "
            f"{MATMUL_CEILING_TFLOPS:.0f} TFLOP/s: above the {TARGETS['fwd+bwd_ms']} ms target"
        )
    return "\n".join(lines)
