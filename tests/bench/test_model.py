"""The CPU-side performance model (bench/model.py), the sm_90 resource reading (bench/sm90.py,
bench/kernels.py) and the target parsing of the GPU check's JSON (bench/report.py)."""

import json
import os
import subprocess
import sys

import pytest

from latentembed.bench import model
from latentembed.bench.report import EXPECTED_TARGETS, complete_targets, parse_targets
from latentembed.bench.sm90 import occupancy, parse_ptxas_log


def _by_target(models):
    return {(m.op, m.target): m for m in models}


def test_floors_at_the_measured_ceilings():
    got = _by_target(model.all_models())
    nce = got[("infonce_lse", "fwd+bwd <= 3.4 ms")]
    assert nce.flops == 4 * 2 * 4096 * 16384 * 4096
    assert nce.floor_ms == pytest.approx(3.110, abs=1e-3)  # 2.2 TFLOP at 707 TFLOP/s
    assert nce.needs == pytest.approx(3.110 / 3.4, abs=1e-3)
    assert "168.2 MiB" in nce.note  # the backward memory plan at the target shape
    mm = got[("masked_mean_pool", "padded fwd <= 0.1 ms")]
    assert mm.floor_ms == pytest.approx((64 * 512 * 4096 + 64 * 4096) * 2 / 2960e9 * 1e3, rel=1e-9)
    pool = got[("latent_attention_pooling", "fwd <= 2.6 ms")]
    assert pool.floor_ms == pytest.approx(2.19, abs=0.01)
    # The steps run one after the other: the design's floor is their sum, above the total's.
    assert pool.design_floor_ms == pytest.approx(sum(s.floor_ms for s in pool.steps))
    assert pool.design_floor_ms > pool.floor_ms
    training = got[("latent_attention_pooling", "fwd+bwd <= 8 ms")]
    assert training.needs > 1  # above the target at the ceilings, as docs/gpu.md says
    assert {s.bound for s in pool.steps} == {"compute", "memory"}


def test_model_text_and_dicts():
    text = model.format_models()
    assert "floor 3.110 ms" in text and "needs 91% of the ceilings" in text
    row = dict(
        name="tile fwd", num_warps=8, num_stages=3, registers=221, spill_stores=0, spill_loads=0,
        shared_bytes=98304, blocks_per_sm=1, occupancy=0.125,
    )  # fmt: skip
    assert "regs 221" in model.format_models(resources=[row])
    json.dumps([m.as_dict() for m in model.all_models()])  # serialisable for gpu_check.json


def test_occupancy_and_ptxas_log():
    assert occupancy(255, 96 * 1024, 8) == (1, 0.125)  # the InfoNCE tile: registers bound it
    assert occupancy(32, 0, 4) == (16, 1.0)
    assert occupancy(64, 120 * 1024, 4) == (1, 0.0625)  # shared memory bounds it
    log = (
        "ptxas info    : Used 168 registers, used 1 barriers\n"
        "ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    )
    assert parse_ptxas_log(log) == (168, 0, 0, 0)
    with pytest.raises(ValueError, match="no register / spill report"):
        parse_ptxas_log("nothing")


def test_target_lines_and_missing_targets():
    summary = "\n".join(
        [
            "target fwd+bwd <= 3.4 ms: triton 3.912 ms -> MISSED",
            "target extra peak memory <= 200 MiB: triton 168 MiB -> met",
            "target 128k x 512k runs: not measured -> MISSED",
            "info: not a target",
        ]
    )
    found = parse_targets("infonce_lse", summary)
    assert [(t["target"], t["verdict"], t["value"], t["unit"]) for t in found] == [
        ("fwd+bwd <= 3.4 ms", "MISSED", 3.912, "ms"),
        ("extra peak memory <= 200 MiB", "met", 168.0, "MiB"),
        ("128k x 512k runs", "MISSED", None, None),
    ]
    every = complete_targets(found, ["infonce_lse"])
    assert len(every) == sum(len(v) for v in EXPECTED_TARGETS.values())
    assert {t["verdict"] for t in every if t["op"] == "decoder"} == {"not run"}
    # Every benchmark's own "target ..." statements are the expected ones.
    multi = parse_targets("multi_lora", "target mixed fwd / single-adapter fwd: not measured")
    assert complete_targets(multi, ["multi_lora"])[0]["verdict"] == "not measured"


def test_target_kernels_compile_for_sm90_and_report_resources():
    # One variant of each target kernel's list compiles (the sm_90 compile checks build the rest).
    pytest.importorskip("triton")
    code = (
        "import json\n"
        "from latentembed.bench.kernels import compile_all, target_variants\n"
        "variants = target_variants()\n"
        "labels = {v[0].split(' BLOCK')[0] for v in variants}\n"
        "first = [next(v for v in variants if v[0].startswith('tile bwd'))]\n"
        "print(json.dumps({'labels': sorted(labels), 'resources': compile_all(first)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    labels = set(out["labels"])
    for m in model.all_models():
        assert all(any(label.startswith(k) for label in labels) for k in m.kernels), (m.kernels, labels)
    (res,) = out["resources"]
    assert "error" not in res, res
    assert res["spill_stores"] == 0 and res["registers"] <= 255 and res["blocks_per_sm"] >= 1
