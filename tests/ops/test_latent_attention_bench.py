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


def test_pooling_benchmark_compares_the_triton_and_cublas_paths():
    # The module with each cross-attention path (auto = Triton on CUDA, the CUDA backend's cuBLAS
    # GEMMs, the reference) times the same block; on CPU only the reference path can run.
    from latentembed.bench import latent_attention as bench

    chosen, skipped, fast = bench._implementations(torch.device("cpu"), bench.TINY, torch.float32, None, 7)
    assert {"latentembed", "latentembed:reference", "unfolded"} <= set(chosen)
    assert "latentembed:cuda" in skipped
    h = torch.randn(2, 5, bench.TINY["hidden_size"])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    out = chosen["latentembed:reference"](h, mask)
    torch.testing.assert_close(out, chosen["latentembed"](h, mask), rtol=1e-5, atol=1e-6)
    assert fast.backend == "auto"  # each call sets its own path
