"""The latent-attention op benchmark imports and runs on CPU at its tiny size (PyTorch rows)."""

import torch

from latentembed.bench import BENCHMARKS, latent_attention_ops


def test_op_benchmark_runs_on_cpu():
    assert BENCHMARKS[latent_attention_ops.OP] is latent_attention_ops
    rows, skipped = latent_attention_ops.run(torch.device("cpu"), copy_gbps=1.0, impls=["torch"])
    assert {(r.op, r.mode) for r in rows} == {
        (op, mode) for op in ("latent_cross_attention", "geglu_segment_mean") for mode in ("fwd", "fwd+bwd")
    }
    assert all(r.median_ms > 0 for r in rows)
    assert "triton" in skipped and "cuda" in skipped
    assert "no kernel backend ran" in latent_attention_ops.summarize(rows)
