"""Benchmark of multi-LoRA routing: 4 Linear layers, T adapters, a random task per sequence.

GPU workload (the issue's): bf16, 4 layers 4096x4096 (no bias), 5 adapters of rank 16, 16
sequences x 512 tokens; forward (no grad) and forward+backward (x, every A and B trainable, base
weights frozen). Implementations, all in the same run:
- ``base``: the 4 Linears, no LoRA.
- ``single-unfused``: one adapter for the whole batch, ``x W^T + s (x A^T) B^T`` in PyTorch.
- ``ours-single`` / ``ours-mixed``: MultiLoRALinear layers routed by :func:`lora_routing`
  (fused op, ``backend="auto"``) with one task for all / a random task per sequence; the timed
  call includes the routing and the once-per-forward grouping (tasks given as names are
  grouped on the host, so no device sync; its small tables are copied asynchronously).
- ``loop+gather``: per layer, the base output plus each task's LoRA on its gathered rows,
  scattered back (people's usual code; the task -> rows lists are precomputed, favouring it).
- ``merged-per-task``: per layer and task, ``W + s B A`` materialised and applied to that task's
  rows (jina-embeddings-v3's code); forward only.
- ``peft-mixed``: PEFT's mixed-batch inference (``adapter_names=``), forward only, when peft
  is importable, with PEFT's defaults (it keeps the adapter weights in float32 for a bf16 base).
CPU runs a small fp32 version of the same so the module imports and runs anywhere.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.lora import apply_multi_lora, lora_routing, multi_lora_layers
from .harness import MATMUL_CEILING_TFLOPS, Measurement, measure, selected

OP = "multi_lora"
TARGETS = {"mixed_fwd": 1.10, "mixed_fwd_bwd": 1.15, "single_overhead": 0.15}


def _shape(device: torch.device):
    if device.type == "cuda":
        return dict(layers=4, d=4096, adapters=5, rank=16, batch=16, length=512, dtype=torch.bfloat16)
    return dict(layers=4, d=96, adapters=5, rank=8, batch=6, length=16, dtype=torch.float32)


def _flops(s: dict, mode: str, lora: bool) -> int:
    """Matmul FLOPs of the workload: base 2ND^2 per layer (x2 with the dx backward), LoRA 4NrD per
    layer (shrink + expand; x3 with the backward's dx, dA, dB)."""
    n, d, r = s["batch"] * s["length"], s["d"], s["rank"]
    base = 2 * n * d * d * (2 if mode == "fwd+bwd" else 1)
    extra = 4 * n * r * d * (3 if mode == "fwd+bwd" else 1) if lora else 0
    return s["layers"] * (base + extra)


class _Stack(nn.Module):
    def __init__(self, weights: Sequence[torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype) for w in weights
        )
        with torch.no_grad():
            for layer, w in zip(self.layers, weights):
                layer.weight.copy_(w)
                layer.weight.requires_grad_(False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _build(device: torch.device):
    s = _shape(device)
    d, t, r, dtype = s["d"], s["adapters"], s["rank"], s["dtype"]
    # Weights scaled so activations keep unit size through the 4 layers (no overflow in bf16).
    weights = [torch.randn(d, d, device=device, dtype=dtype) / d**0.5 for _ in range(s["layers"])]
    lora_a = [torch.randn(t, r, d, device=device, dtype=dtype) / d**0.5 for _ in range(s["layers"])]
    lora_b = [torch.randn(t, d, r, device=device, dtype=dtype) * 0.1 / r**0.5 for _ in range(s["layers"])]
    scaling = 2.0
    tasks = torch.randint(0, t, (s["batch"],)).tolist()
    x = torch.randn(s["batch"], s["length"], d, device=device, dtype=dtype)
    return s, weights, lora_a, lora_b, scaling, tasks, x


def _implementations(device, s, weights, lora_a, lora_b, scaling, tasks, wanted=None):
    """name -> (fn(x, trainable) -> y, modes, lora?) and name -> reason for the skipped ones."""
    names = [f"task{i}" for i in range(s["adapters"])]
    ours = _Stack(weights)
    apply_multi_lora(ours, ["0", "1", "2", "3"], names, rank=s["rank"], alpha=scaling * s["rank"])
    with torch.no_grad():
        for (_, layer), a, b in zip(multi_lora_layers(ours), lora_a, lora_b):
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
    ours_params = [p for n, p in ours.named_parameters() if "lora" in n]
    by_task = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)
    by_task = {t: torch.tensor(rows, device=device) for t, rows in by_task.items()}
    # Leaves for the PyTorch baselines: every layer's A and B of every adapter.
    a_leaves = [a.clone().requires_grad_() for a in lora_a]
    b_leaves = [b.clone().requires_grad_() for b in lora_b]

    def base(x):
        for w in weights:
            x = F.linear(x, w)
        return x

    single = tasks[0]

    def single_unfused(x):
        for w, a, b in zip(weights, a_leaves, b_leaves):
            x = F.linear(x, w) + scaling * F.linear(F.linear(x, a[single]), b[single])
        return x

    def ours_call(task_list):
        def call(x):
            with lora_routing(ours, task_list):
                return ours(x)

        return call

    def loop_gather(x):
        for w, a, b in zip(weights, a_leaves, b_leaves):
            out = F.linear(x, w)
            for t, rows in by_task.items():
                xs = x.index_select(0, rows)
                out = out.index_add(0, rows, scaling * F.linear(F.linear(xs, a[t]), b[t]))
            x = out
        return x

    def merged_per_task(x):
        for w, a, b in zip(weights, lora_a, lora_b):
            out = torch.empty(*x.shape[:-1], w.shape[0], device=x.device, dtype=x.dtype)
            for t, rows in by_task.items():
                merged = w + scaling * (b[t] @ a[t])
                out.index_copy_(0, rows, F.linear(x.index_select(0, rows), merged))
            x = out
        return x

    impls = {
        "base": (base, ("fwd", "fwd+bwd"), False, []),
        "single-unfused": (single_unfused, ("fwd", "fwd+bwd"), True, [a_leaves, b_leaves]),
        "ours-single": (ours_call([names[single]] * len(tasks)), ("fwd", "fwd+bwd"), True, [ours_params]),
        "ours-mixed": (ours_call([names[t] for t in tasks]), ("fwd", "fwd+bwd"), True, [ours_params]),
        "loop+gather": (loop_gather, ("fwd", "fwd+bwd"), True, [a_leaves, b_leaves]),
        "merged-per-task": (merged_per_task, ("fwd",), True, []),
    }
    skipped = {}
    if wanted and "peft-mixed" not in wanted:
        return impls, skipped
    try:
        import peft
    except ImportError as e:
        skipped["peft-mixed"] = f"peft is not importable ({e})"
    else:
        impls["peft-mixed"] = (_peft_mixed(peft, weights, lora_a, lora_b, s, names, tasks), ("fwd",), True, [])
    return impls, skipped


def _peft_mixed(peft, weights, lora_a, lora_b, s, names, tasks) -> Callable:
    config = dict(r=s["rank"], lora_alpha=2.0 * s["rank"], target_modules=["0", "1", "2", "3"], lora_dropout=0.0)
    model = peft.get_peft_model(_Stack(weights), peft.LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    with torch.no_grad():
        for i, layer in enumerate(model.base_model.model.layers):
            for t, name in enumerate(names):
                layer.lora_A[name].weight.copy_(lora_a[i][t])
                layer.lora_B[name].weight.copy_(lora_b[i][t])
    model.eval()
    adapter_names = [names[t] for t in tasks]
    return lambda x: model(x, adapter_names=adapter_names)


def check_agreement(device: torch.device, built=None) -> dict:
    """Relative error of every implementation's forward against ours (mixed or single) on the
    benchmark's inputs: the baselines must compute the same function to be worth comparing."""
    s, weights, lora_a, lora_b, scaling, tasks, x = built or _build(device)
    chosen, _ = _implementations(device, s, weights, lora_a, lora_b, scaling, tasks)
    with torch.no_grad():
        outs = {name: fn(x).float() for name, (fn, *_) in chosen.items()}
    errors = {"base (must differ)": ((outs["base"] - outs["ours-mixed"]).norm() / outs["ours-mixed"].norm()).item()}
    for name, out in outs.items():
        ref = outs["ours-single" if name == "single-unfused" else "ours-mixed"]
        if name == "ours-single":
            ref = outs["single-unfused"]
        if name != "base":
            errors[name] = ((out - ref).norm() / ref.norm()).item()
    return errors


def run(device: torch.device, copy_gbps: float, impls: Optional[Sequence[str]] = None):
    """Measure each implementation in forward and forward+backward on the same inputs."""
    built = _build(device)
    s, weights, lora_a, lora_b, scaling, tasks, x = built
    if not impls:  # the full run also checks that every implementation computes the same thing
        _agreement.clear()
        _agreement.update(check_agreement(device, built))
    chosen, skipped = _implementations(device, s, weights, lora_a, lora_b, scaling, tasks, impls)
    chosen = selected(chosen, impls, skipped)
    dtype_name = str(s["dtype"]).replace("torch.", "")
    case = f"{dtype_name} L{s['layers']}-D{s['d']}-T{s['adapters']}-r{s['rank']}-B{s['batch']}x{s['length']}"
    elt = x.element_size()
    n, d = s["batch"] * s["length"], s["d"]
    rows: list[Measurement] = []
    xg = x.detach().requires_grad_()
    grad_out = torch.randn_like(x)
    for name, (fn, modes, _lora, param_groups) in chosen.items():
        params = [xg] + [p for group in param_groups for p in group]
        for mode in modes:
            if mode == "fwd":

                def call(fn=fn):
                    with torch.no_grad():
                        return fn(x)
            else:

                def call(fn=fn, params=params):
                    return torch.autograd.grad(fn(xg), params, grad_out)

            call()  # warm-up (Triton autotuning, lazy imports)
            # Bytes: every layer reads its input and weight and writes its output (x2 backward).
            moved = s["layers"] * (2 * n * d + d * d) * elt * (2 if mode == "fwd+bwd" else 1)
            rows.append(measure(OP, case, name, mode, call, moved, device, copy_gbps))
    if device.type == "cpu":
        skipped["triton"] = "the op's auto backend is the reference on CPU (Triton interpreter is a test tool)"
    return rows, skipped


# Filled by a full run(): relative forward error of each implementation against ours.
_agreement: dict = {}


def _parse_case(case: str) -> dict:
    m = re.search(r"L(\d+)-D(\d+)-T(\d+)-r(\d+)-B(\d+)x(\d+)", case)
    keys = ("layers", "d", "adapters", "rank", "batch", "length")
    return dict(zip(keys, (int(v) for v in m.groups())))


def _ms(rows, impl, mode) -> Optional[float]:
    return next((r.median_ms for r in rows if r.impl == impl and r.mode == mode), None)


def summarize(rows: list[Measurement]) -> str:
    """TFLOP/s per implementation and the issue's three targets, each met or MISSED."""
    lines = []
    for r in rows:
        tflops = _flops(_parse_case(r.case), r.mode, r.impl != "base") / (r.median_ms * 1e-3) / 1e12
        lines.append(
            f"{r.impl:<16} {r.mode:<8} {r.median_ms:8.3f} ms  {tflops:8.3f} TFLOP/s "
            f"({100 * tflops / MATMUL_CEILING_TFLOPS:4.1f}% of {MATMUL_CEILING_TFLOPS:.0f} bf16 matmul)"
        )

    def verdict(name, num, den, limit, how):
        if num is None or den is None:
            return f"target {name}: not measured"
        ratio = num / den if how == "ratio" else num / den - 1
        shown = f"{ratio:.3f}x" if how == "ratio" else f"{100 * ratio:+.1f}%"
        ok = "met" if ratio <= limit else "MISSED"
        bound = f"{limit}x" if how == "ratio" else f"{100 * limit:.0f}%"
        return f"target {name} <= {bound}: {num:.3f} vs {den:.3f} ms = {shown} -> {ok}"

    lines.append(
        verdict(
            "mixed fwd / single-adapter fwd",
            _ms(rows, "ours-mixed", "fwd"),
            _ms(rows, "single-unfused", "fwd"),
            TARGETS["mixed_fwd"],
            "ratio",
        )
    )
    lines.append(
        verdict(
            "mixed fwd+bwd / single-adapter fwd+bwd",
            _ms(rows, "ours-mixed", "fwd+bwd"),
            _ms(rows, "single-unfused", "fwd+bwd"),
            TARGETS["mixed_fwd_bwd"],
            "ratio",
        )
    )
    lines.append(
        verdict(
            "single-adapter fwd overhead over base (ours-single)",
            _ms(rows, "ours-single", "fwd"),
            _ms(rows, "base", "fwd"),
            TARGETS["single_overhead"],
            "overhead",
        )
    )
    if _agreement:
        lines.append(
            "forward agreement (relative error vs ours; base must differ): "
            + ", ".join(f"{k} {v:.1e}" for k, v in _agreement.items())
        )
    for mode in ("fwd", "fwd+bwd"):
        mixed, single = _ms(rows, "ours-mixed", mode), _ms(rows, "ours-single", mode)
        if mixed and single:
            lines.append(f"info: ours-mixed / ours-single {mode}: {mixed / single:.3f}x")
    return "\n".join(lines)
