"""The multi-LoRA benchmark's implementations compute the same function, and it runs on CPU."""

import torch

from latentembed.bench import BENCHMARKS, harness
from latentembed.bench import multi_lora as bench


def test_every_benchmarked_implementation_agrees():
    errors = bench.check_agreement(torch.device("cpu"))
    assert errors.pop("base (must differ)") > 1e-2  # the adapters change the output
    assert {"single-unfused", "ours-single", "ours-mixed", "loop+gather", "merged-per-task"} <= errors.keys()
    for name, err in errors.items():
        assert err < 1e-5, f"{name}: relative error {err:.2e} against ours"


def test_runs_on_cpu_and_states_targets(monkeypatch):
    assert BENCHMARKS[bench.OP] is bench
    real = harness.median_ms
    monkeypatch.setattr(harness, "median_ms", lambda fn, device: real(fn, device, reps=1))  # a smoke run
    small = bench._shape(torch.device("cpu"))
    monkeypatch.setattr(bench, "_shape", lambda device: dict(small, d=32, batch=3, length=4))
    rows, skipped = bench.run(
        torch.device("cpu"), copy_gbps=1.0, impls=["base", "single-unfused", "ours-single", "ours-mixed"]
    )
    assert {(r.impl, r.mode) for r in rows} == {
        (i, m) for i in ("base", "single-unfused", "ours-single", "ours-mixed") for m in ("fwd", "fwd+bwd")
    }
    assert all(r.median_ms > 0 for r in rows) and "triton" in skipped
    summary = bench.summarize(rows)
    assert summary.count("-> met") + summary.count("-> MISSED") == 3
