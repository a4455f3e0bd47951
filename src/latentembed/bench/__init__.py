"""Op benchmarks behind `python -m latentembed bench` (results go to benchmarks/results/)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import contrastive, decoder, harness, latent_attention, latent_attention_ops, masked_mean, multi_lora, train_step
from .harness import copy_bandwidth_gbps, environment, format_table, write_json
from .model import all_models, format_models


class BenchmarkFailure(RuntimeError):
    """Some benchmarks raised; ``report`` is the whole report, the failures included (the other
    benchmarks still ran and their results were written)."""

    def __init__(self, report: str, failures: dict):
        super().__init__("; ".join(f"{op}: {why}" for op, why in failures.items()))
        self.report, self.failures = report, failures


# op name -> module with run(device, copy_gbps, impls) and summarize(rows)
BENCHMARKS = {
    module.OP: module
    for module in (masked_mean, latent_attention_ops, latent_attention, contrastive, multi_lora, decoder, train_step)
}
#: Run only when named with --op (whole training steps in subprocesses, minutes on the real model).
ON_REQUEST = frozenset({train_step.OP})


def run_benchmarks(
    ops: Optional[Sequence[str]] = None,
    json_path: Optional[str] = None,
    impls: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
    model: Optional[str] = None,
    quick: bool = False,
) -> str:
    """Run the benchmarks of ``ops`` (by default all but :data:`ON_REQUEST`) on the current
    device; return the report. ``model``: the model directory of ``train_step`` (default: a tiny
    random model)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(ops or ()) - BENCHMARKS.keys()
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {sorted(BENCHMARKS)}")
    env = environment(dev)
    copy_gbps = copy_bandwidth_gbps(dev)
    report = [
        f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}  "
        f"commit {env['commit']}  {env['date']}",
        f"measured copy bandwidth (read + write): {copy_gbps:.1f} GB/s",
    ]
    from .report import parse_targets  # here: `python -m latentembed.bench.report` imports this package

    rows, targets, failures = [], [], {}
    # quick: skip what no target needs (torch.compile and external baselines, middle scaling rows).
    harness.QUICK = quick
    models = [m.as_dict() for m in all_models()]
    for name in ops or [op for op in BENCHMARKS if op not in ON_REQUEST]:
        extra = {"model": model} if name == train_step.OP else {}
        try:
            op_rows, skipped = BENCHMARKS[name].run(dev, copy_gbps, impls, **extra)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            report += ["", f"{name}: FAILED ({failures[name]})"]
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows += op_rows
        report += ["", format_table(op_rows)]
        report += [f"skipped {impl}: {why}" for impl, why in skipped.items()]
        summary = BENCHMARKS[name].summarize(op_rows)
        report.append(summary)
        targets += parse_targets(name, summary)
        if json_path:  # after every benchmark: a run cut short keeps what it measured
            write_json(json_path, env, copy_gbps, rows, targets=targets, failures=failures, model=models)
    report += ["", format_models()]
    kernels = []
    if dev.type == "cuda":
        from .sm90 import launched_resources

        kernels = launched_resources()
        report.append("kernels launched (the driver's registers / spills):")
        report += [
            f"  {k['name']:<32} w{k['num_warps']} s{k['num_stages']} regs {k['registers']:>3} "
            f"spills {k['spill_stores']} smem {k['shared_bytes'] / 1024:.0f} KiB {k['blocks_per_sm']} blocks/SM "
            f"{100 * k['occupancy']:.0f}%"
            for k in kernels
        ]
    if json_path:
        write_json(json_path, env, copy_gbps, rows, targets=targets, failures=failures, model=models, kernels=kernels)
        report.append(f"wrote {json_path}")
    if failures:
        report.append("FAILED benchmarks: " + ", ".join(failures))
        raise BenchmarkFailure("\n".join(report), failures)
    return "\n".join(report)
