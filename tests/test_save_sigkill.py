"""Saves killed with SIGKILL at random instants leave the old or the new version, never a mix.

For each kind of save (EmbeddingModel.save_pretrained, save_decoder, the trainer's --output
directory) a worker process (tests/sigkill_worker.py: torch imported once) forks a child per
trial that saves over the previous version and kills it after a random delay spread over one
save's duration; every surviving directory must load and equal one of the two versions byte for
byte, and the next save must clean up what the killed ones left. One more trial kills a real
``python -m latentembed train --output`` process while it writes its output.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentembed.atomic_io import recover

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 16


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _run_worker(scenario: str, root: Path, trials: int = TRIALS) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.sigkill_worker", scenario, str(root), str(trials), str(_seed())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(result: dict, trials: int = TRIALS) -> None:
    runs = result["trials"]
    for t in runs:
        assert t["state"] in (t["old"], t["new"]), f"a save killed {t['delay_s'] * 1e3:.1f} ms in left {t}"
        assert t["killed"] or t["exit"] == 0, f"a save failed on its own: {t}"
    assert len(runs) == trials
    # The kills landed inside saves (some left a temporary sibling), and some saves completed.
    assert any(t["leftovers"] for t in runs), runs
    assert any(t["state"] == t["new"] for t in runs), runs
    assert result["final_leftovers"] == [], "the next save did not clean up after the killed ones"
    assert result["final_state"] == result["final_expected"]


@pytest.mark.parametrize("scenario", ["model", "decoder"])
def test_killed_saves_leave_the_old_or_the_new_checkpoint(tmp_path, scenario):
    _check(_run_worker(scenario, tmp_path))


@pytest.mark.slow
def test_killed_train_output_saves_leave_one_whole_run(tmp_path):
    _check(_run_worker("train_output", tmp_path))
    # A real `train --output` over the worker's last run, killed while it writes its output.
    from tests.sigkill_worker import _leftovers, _state_train

    target = tmp_path / "target"
    old = _state_train(target)
    seed = _seed()
    cmd = [
        sys.executable,
        "-m",
        "latentembed",
        "train",
        "--steps",
        "2",
        "--stage2-steps",
        "0",
        "--no-eval",
        "--batch-size",
        "4",
        "--seed",
        str(seed),
        "--output",
        str(target),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and not _leftovers(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.0005)
        saving = proc.poll() is None and bool(_leftovers(tmp_path))
        time.sleep(random.Random(seed).uniform(0, 0.03))  # a few ms into a tiny model's save
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert saving or proc.returncode == 0, err[-3000:]
    recover(target)
    assert _leftovers(tmp_path) == []
    new = _state_train(target)
    if new != old:  # then the whole new run: every file of it, none of the old one's
        assert set(new["files"]) == {
            "train_config.json",
            "metrics.json",
            "model/config.json",
            "model/latentembed.json",
            "model/model.safetensors",
            "model/tokenizer.json",
            "model/tokenizer_config.json",
        }, new["files"]
        assert json.loads((target / "train_config.json").read_text())["seed"] == seed
        assert len(json.loads((target / "metrics.json").read_text())["loss_history"]) == 2
        assert new["files"]["model/model.safetensors"] != old["files"]["model/model.safetensors"]
