"""Op benchmarks behind `python -m latentembed bench` (results go to benchmarks/results/)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import contrastive, decoder, latent_attention, latent_attention_ops, masked_mean, multi_lora
from .harness import copy_bandwidth_gbps, environment, format_table, write_json

# op name -> module with run(device, copy_gbps, impls) and summarize(rows)
BENCHMARKS = {
    module.OP: module
    for module in (masked_mean, latent_attention_ops, latent_attention, contrastive, multi_lora, decoder)
}


def run_benchmarks(
    ops: Optional[Sequence[str]] = None,
    json_path: Optional[str] = None,
    impls: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
) -> str:
    """Run the benchmarks of ``ops`` (all by default) on the current device; return the report."""
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
    rows = []
    for name in ops or BENCHMARKS:
        op_rows, skipped = BENCHMARKS[name].run(dev, copy_gbps, impls)
        rows += op_rows
        report += ["", format_table(op_rows)]
        report += [f"skipped {impl}: {why}" for impl, why in skipped.items()]
        report.append(BENCHMARKS[name].summarize(op_rows))
    if json_path:
        write_json(json_path, env, copy_gbps, rows)
        report.append(f"wrote {json_path}")
    return "\n".join(report)
