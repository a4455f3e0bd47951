"""Exact resume: a `train` process killed with SIGKILL at random steps and resumed with
`--resume latest` ends with the same losses (every step, bit for bit), evaluations and final
weights as the run nobody killed, on CPU with one process and with two gloo processes (torchrun).

Each test runs the uninterrupted reference, then one chain: start, kill at a random step (and a
random instant inside it: during its evaluation or checkpoint save, too), resume, kill again
later, ..., resume to the end. The tiny random model with LoRA (dropout 0.1, so the random
generators matter), a learnable temperature, gradient accumulation (one process) or GradCache
(two processes), evaluation and checkpoints every few steps.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from latentembed.training.checkpoint import list_checkpoints
from latentembed.training.logs import read_log
from tests.test_training_run import _slice, _write_jsonl

ROOT = Path(__file__).resolve().parents[1]
KILLS = 3


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _argv(tmp: Path, seed: int, world: int) -> list[str]:
    data = _write_jsonl(tmp / "s1.jsonl", _slice("retrieval", 48, seed))
    stage2 = _write_jsonl(tmp / "s2.jsonl", _slice("blended", 24, seed))
    per_world = ["--grad-accum", "2"] if world == 1 else ["--grad-cache", "5"]
    return [
        "train",
        *("--data", str(data), "--stage2-data", str(stage2), "--eval-fraction", "0.25"),
        *("--steps", "8", "--stage2-steps", "4", "--batch-size", "4", "--max-length", "48"),
        *("--no-full", "--lora-rank", "4", "--lora-dropout", "0.1", "--learnable-temperature"),
        *("--save-every", "2", "--keep-last", "2", "--eval-every", "3", "--keep-best"),
        *("--seed", str(seed), "--threads", "1", "--log-every", "100"),
        *per_world,
    ]


def _command(argv: list[str], out: Path, world: int) -> list[str]:
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    return [*launcher, "-m", "latentembed", *argv, "--output", str(out)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _finish(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _steps_logged(log: Path) -> int:
    try:
        return max((e["global_step"] for e in read_log(log) if e["event"] == "step"), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def _kill_at(cmd: list[str], log: Path, step: int, rng: random.Random) -> None:
    """Run ``cmd`` until its log shows global step ``step``, wait a random instant (into the
    next step, an evaluation or a checkpoint save) and SIGKILL its whole process group."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and _steps_logged(log) < step and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[0][-3000:]}"
        time.sleep(rng.uniform(0, 0.08))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished in the meantime: the next resume redoes its tail
            pass
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)


def _outcome(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "losses": [(e["stage"], e["step"], e["loss"], e["lr"]) for e in metrics["loss_history"]],
        "evals": metrics["evals"],
        "best": metrics["best"],
        "temperature": metrics["temperature"],
        "eval_after": metrics["eval_after"],
        "weights": load_file(str(out / "model" / "model.safetensors")),
        "adapter": load_file(str(out / "adapters" / "default" / "adapter_model.safetensors")),
    }


def _check_chain(tmp_path: Path, world: int) -> None:
    seed = _seed()
    rng = random.Random(seed)
    argv = _argv(tmp_path, seed, world)
    total = 12
    _finish(_command(argv, tmp_path / "ref", world))
    expected = _outcome(tmp_path / "ref")
    assert len(expected["losses"]) == total

    out = tmp_path / "run"
    resume = _command(argv + ["--resume", "latest"], out, world)
    kills = sorted(rng.sample(range(1, total - 1), KILLS))
    for step in kills:
        _kill_at(resume, out / "train_log.jsonl", step, rng)
        for _, path in list_checkpoints(out / "checkpoints"):  # only whole checkpoints under their names
            assert {p.name for p in path.iterdir()} == {
                "trainer_state.json",
                "weights.safetensors",
                "optimizer.pt",
                "rng.pt",
            }
    _finish(resume)
    got = _outcome(out)
    for key in ("losses", "evals", "best", "temperature", "eval_after"):
        assert got[key] == expected[key], (key, seed, kills)
    for key in ("weights", "adapter"):
        assert got[key].keys() == expected[key].keys()
        for name, tensor in expected[key].items():
            assert torch.equal(got[key][name], tensor), (key, name, seed, kills)
    # The log holds each step once, in order, however often the run was killed.
    steps = [e["global_step"] for e in read_log(out / "train_log.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, total + 1)), (steps, kills)
    kept = [step for step, _ in list_checkpoints(out / "checkpoints")]
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["global_step"] == expected["best"]["global_step"] and best["global_step"] in kept
    assert len(kept) <= 3 and kept[-2:] == [10, 12]  # keep-last 2, and the best


def test_a_killed_run_resumes_bit_identically(tmp_path):
    _check_chain(tmp_path, world=1)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_killed_two_process_run_resumes_bit_identically(tmp_path):
    _check_chain(tmp_path, world=2)
