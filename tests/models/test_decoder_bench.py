"""The decoder benchmark module runs on CPU (tiny fp32 workload) and reports the targets."""

import time

import torch

from latentembed.bench import BENCHMARKS, decoder
from latentembed.models.decoder import DecoderModel
from latentembed.models.decoder_config import DecoderConfig


def test_decoder_benchmark_runs_on_cpu(monkeypatch):
    import latentembed.bench.harness as harness

    # one timed call per measurement: this is a smoke test of the module, not a timing
    def one_call(fn, device, reps=1):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(harness, "median_ms", one_call)
    assert BENCHMARKS["decoder"] is decoder
    rows, skipped = decoder.run(torch.device("cpu"), copy_gbps=1.0, impls=["latentembed-packed", "hf-causal"])
    assert {r.impl for r in rows} <= {"latentembed-packed", "hf-causal"}
    assert {r.mode for r in rows} == {"fwd", "fwd+bwd"}
    assert "varlen/flash" in skipped
    report = decoder.summarize(rows)
    assert "M real tokens/s" in report and "target fwd >= 3.0x" in report


def test_useful_flops_counts_projections_and_attention():
    s = dict(layers=1, d=8, heads=2, kv=1, ffn=16)
    # per token: q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16 -> 2 * (64 + 64 + 64 + 384) = 1152
    assert decoder.useful_flops(s, 3, 9, "fwd") == 1152 * 3 + 4 * 9 * 8
    assert decoder.useful_flops(s, 3, 9, "fwd+bwd") == 3 * decoder.useful_flops(s, 3, 9, "fwd")


def test_compile_layers_keeps_parameter_names():
    model = DecoderModel(
        DecoderConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
    )
    names = list(model.state_dict())
    model.compile_layers(backend="eager")
    assert list(model.state_dict()) == names
