"""`python -m latentembed bench --op train_step` runs latentembed's LoRA training step and the
same step in sentence-transformers + PEFT on a tiny random model (a smoke run, not a timing),
each in its own subprocess, and reports the ratios."""

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer
from torch.utils.flop_counter import FlopCounterMode

from latentembed.bench import BENCHMARKS, ON_REQUEST, train_step
from latentembed.bench.train_step_sides import encode_texts, latentembed_side, st_peft_side, tiny_model_dir

ANCHORS = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "peft"))


def test_train_step_runs_both_sides_and_reports_ratios():
    assert BENCHMARKS["train_step"] is train_step and "train_step" in ON_REQUEST
    rows, skipped = train_step.run(torch.device("cpu"), 0.0, configs=["causal"], steps=1, warmup=1)
    impls = {r.impl for r in rows}
    assert "latentembed" in impls
    anchors = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "peft"))
    assert ("st-peft" in impls) == anchors, skipped
    for r in rows:
        assert r.median_ms > 0 and r.peak_extra_mib > 0 and r.real_tokens > 0
        assert r.tokens_per_s == pytest.approx(r.real_tokens / (r.median_ms / 1e3))
    ours = next(r for r in rows if r.impl == "latentembed")
    assert ours.positions == ours.real_tokens  # packed on CPU: no position is padding
    if anchors:
        base = next(r for r in rows if r.impl == "st-peft")
        assert base.real_tokens == ours.real_tokens  # the same token ids on both sides
        assert base.positions > base.real_tokens  # three padded forwards
    report = train_step.summarize(rows)
    assert "tiny random model" in report
    if anchors:
        assert "causal: step time latentembed / st-peft" in report and "-> info" in report
    _, skipped = train_step.run(torch.device("cpu"), 0.0, impls=["st-peft"], configs=["bidir"])
    assert "causal attention only" in skipped["st-peft bidir"]


@pytest.mark.parametrize(
    "side",
    [
        latentembed_side,
        pytest.param(st_peft_side, marks=pytest.mark.skipif(not ANCHORS, reason="needs sentence-transformers, peft")),
    ],
    ids=["latentembed", "st-peft"],
)
def test_encode_counts_positions_and_its_matmul_floor_is_exact(side, tmp_path):
    """encode's (real tokens, positions) and the floor's FLOPs per position, against torch's
    own FLOP counter on the side's whole encode (every matmul: base weights and LoRA)."""
    model = str(tiny_model_dir(tmp_path))
    spec = dict(model=model, causal=True, max_length=128, dropout=0.1, checkpointing=False, device="cpu", batch=8)
    _, encode = side(spec)
    texts = encode_texts(40)
    with FlopCounterMode(display=False) as counter:
        real, positions = encode(texts)
    flops = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in flops.items() if str(op) in ("aten.mm", "aten.addmm", "aten.bmm"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert matmul == positions * train_step.linear_flops_per_position(config)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert real == sum(min(len(tokenizer.encode(t).ids), 128) for t in texts)
    if side is latentembed_side:
        assert positions == real  # packed: no padding computed
    else:
        assert positions > real  # padded batches of 32


def _row(impl, config, ms, mib, tokens=100):
    return train_step.StepMeasurement(
        op="train_step",
        case=f"smollm2-hf fp32 {config}",
        impl=impl,
        mode="encode" if config == "encode" else "step",
        median_ms=ms,
        bytes_moved=0,
        gbps=0.0,
        pct_copy=0.0,
        peak_extra_mib=mib,
        real_tokens=tokens,
    )


def test_summary_says_met_and_missed():
    rows = [
        _row("latentembed", "causal", 90.0, 1200.0),
        _row("st-peft", "causal", 100.0, 1000.0),
        _row("latentembed", "encode", 80.0, 1.0),
        _row("st-peft", "encode", 100.0, 1.0),
    ]
    rows[2].positions, rows[2].floor_s, rows[2].matmul_gflops = 100, 0.06, 150.0
    rows[3].positions, rows[3].floor_s, rows[3].matmul_gflops = 110, 0.066, 150.0
    report = train_step.summarize(rows)
    assert "causal: step time latentembed / st-peft = 0.90x (target <= 1.0x) -> met" in report
    assert "encode latentembed: 100 positions; its linear layers need 0.1 s at the measured 150 GFLOP/s" in report
    assert "75% of its median" in report and "66% of its median" in report
    assert "encode: latentembed at its matmul floor would be 0.60x st-peft" in report
    assert "causal: peak memory latentembed / st-peft = 1.20x (target <= 1.0x) -> MISSED" in report
    assert "encode: encode time latentembed / st-peft = 0.80x (target <= 0.75x) -> MISSED" in report


def test_import_row_measures_the_package_over_torch():
    row = train_step._import_row("latentembed", "tiny random Llama", reps=1)
    assert row.mode == "import" and 0 < row.over_torch_s < row.median_ms / 1e3
    report = train_step.summarize([row])
    assert "import latentembed:" in report and "over import torch (target <= 0.3 s)" in report


def test_ablation_variants_undo_one_saving_each():
    rows, _ = train_step.run(
        torch.device("cpu"),
        0.0,
        impls=["latentembed"],
        configs=["causal"],
        steps=1,
        warmup=1,
        variants=["padded", "stored-dropout"],
    )
    shipped = next(r for r in rows if r.impl == "latentembed")
    padded = next(r for r in rows if r.impl == "latentembed[padded]")
    assert padded.real_tokens == shipped.real_tokens == shipped.positions
    assert padded.positions > padded.real_tokens  # one [3B, L] forward computes the padding too
    stored = next(r for r in rows if r.impl == "latentembed[stored-dropout]")
    assert stored.positions == shipped.positions and stored.peak_extra_mib > 0
    with pytest.raises(ValueError, match="variants must be among"):
        train_step.run(torch.device("cpu"), 0.0, variants=["unpacked"])
