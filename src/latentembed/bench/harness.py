"""Timing, memory and ceiling measurements shared by every op benchmark.

Medians, never means: one slow outlier (a page fault, a clock change) must not move the number.
On the GPU ``triton.testing.do_bench`` flushes L2 between runs; on CPU a plain timer loop.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# bf16 dense matmul 8192^3 on the H100, measured 2026-11-22 (docs/gpu.md, "Ceilings and baselines"): the
# ceiling that compute-bound benchmarks report "% of" (bandwidth-bound ones measure the copy
# bandwidth in the same run instead).
MATMUL_CEILING_TFLOPS = 707.0

# Quick mode (``python -m latentembed bench --quick``, what scripts/gpu_check.sh runs in its one
# call): what no target depends on is skipped, namely the torch.compile baselines (each compile
# takes tens of seconds), the external libraries' baselines and the scaling rows between the
# target shape and the largest one. Set by run_benchmarks.
QUICK = False
QUICK_SKIPS = {
    "reference+compile": "quick mode: torch.compile baselines run with --full",
    "folded+compile": "quick mode: torch.compile baselines run with --full",
    "eager+compile": "quick mode: torch.compile baselines run with --full",
    "latentembed-compiled": "quick mode: torch.compile baselines run with --full",
    "cut-cross-entropy": "quick mode: external baselines run with --full",
    "inf-cl": "quick mode: external baselines run with --full",
    "peft-mixed": "quick mode: external baselines run with --full",
    "merged-per-task": "quick mode: baselines no target uses run with --full",
    "loop+gather": "quick mode: baselines no target uses run with --full",
}


def selected(chosen: dict, impls, skipped: Optional[dict] = None) -> dict:
    """``chosen`` (name -> implementation) restricted to ``impls`` when given, without what quick
    mode skips (recorded in ``skipped`` with the reason)."""
    out = {}
    for name, impl in chosen.items():
        if impls and name not in impls:
            continue
        if QUICK and name in QUICK_SKIPS:
            if skipped is not None:
                skipped[name] = QUICK_SKIPS[name]
            continue
        out[name] = impl
    return out


@dataclass
class Measurement:
    op: str
    case: str  # e.g. "padded bf16 B64-L512-D4096"
    impl: str  # "reference", "reference+compile", "triton", "cuda"
    mode: str  # "fwd", "bwd", "fwd+bwd"
    median_ms: float
    bytes_moved: int  # the fewest bytes the mode must read + write, as the targets count them
    gbps: float
    pct_copy: float  # of the measured device-to-device copy bandwidth
    peak_extra_mib: Optional[float]  # peak memory above what was allocated before the call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(sorted(times)[len(times) // 2])


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates beyond what is live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device copy bandwidth, counting bytes read plus bytes written."""
    numel = (512 if device.type == "cuda" else 32) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def measure(
    op: str,
    case: str,
    impl: str,
    mode: str,
    fn: Callable[[], object],
    bytes_moved: int,
    device: torch.device,
    copy_gbps: float,
) -> Measurement:
    ms = median_ms(fn, device)
    gbps = bytes_moved / (ms * 1e-3) / 1e9
    return Measurement(op, case, impl, mode, ms, bytes_moved, gbps, 100 * gbps / copy_gbps, peak_extra_mib(fn, device))


def format_table(rows: list[Measurement]) -> str:
    header = f"{'case':<34} {'impl':<18} {'mode':<8} {'median ms':>10} {'GB/s':>8} {'% copy':>7} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = "-" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.1f}"
        lines.append(
            f"{r.case:<34} {r.impl:<18} {r.mode:<8} {r.median_ms:>10.4f} {r.gbps:>8.1f} {r.pct_copy:>6.1f}% {peak:>9}"
        )
    return "\n".join(lines)


def write_json(path: str, env: dict, copy_gbps: float, rows: list[Measurement], **extra) -> None:
    """Every measurement with the environment, and ``extra`` sections (targets, model, kernels,
    failures), written atomically: a run cut short leaves the last complete file."""
    from ..atomic_io import atomic_write_json

    payload = {"environment": env, "copy_bandwidth_gbps": copy_gbps, "results": [asdict(r) for r in rows], **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)
