"""Sharded (DCP) checkpoints of ``train --fsdp`` under torchrun with gloo ranks: a run killed
with SIGKILL at a random instant and resumed equals the uninterrupted run bit for bit; a
checkpoint written by 2 ranks resumes on 4 and one written by 4 on 2 (same global batch) and
reaches the uninterrupted run's losses and weights within fp32 reduction-order rounding; a
checkpoint exports to one ``save_pretrained`` directory equal to the run's saved model.

One uninterrupted run serves every comparison (five launches in all: keep them few).
"""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from latentembed.__main__ import main as cli_main
from latentembed.models.embedding import EmbeddingModel
from latentembed.training.checkpoint import list_checkpoints
from latentembed.training.logs import read_log
from latentembed.training.sharded_checkpoint import export_checkpoint
from tests.test_training_resume import _finish, _kill_at
from tests.test_training_run import _model_for, _slice, _write_jsonl

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
TOTAL = 4


def _command(tmp: Path, seed: int, world: int, out: Path, *extra: str, torchrun: bool = False) -> list[str]:
    """The train command on ``world`` ranks: under torchrun, or forked from one launcher
    process (:func:`tests.test_training_fsdp.launch_cli`: the same ranks, one torch import)."""
    argv = [
        *("train", "--fsdp", "--model", str(tmp / "init"), "--full"),
        *("--data", str(tmp / "s1.jsonl"), "--stage2-data", "none", "--eval-fraction", "0.2"),
        *("--steps", str(TOTAL), "--batch-size", str(8 // world), "--max-length", "48", "--grad-cache", "6"),
        *("--learnable-temperature", "--save-every", "2", "--eval-every", "3", "--lr", "1e-3"),
        *("--seed", str(seed), "--threads", "1", "--log-every", "100", "--output", str(out), *extra),
    ]
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] + [
            "-m",
            "latentembed",
            *argv,
        ]
    code = f"from tests.test_training_fsdp import launch_cli; launch_cli({world}, {argv[1:]!r})"
    return [sys.executable, "-c", code]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def test_fsdp_checkpoints_resume_exactly_reshard_and_export(tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    rng = random.Random(seed)
    rows = _slice("retrieval", 40, seed)
    _write_jsonl(tmp_path / "s1.jsonl", rows)
    torch.manual_seed(seed)
    _model_for(rows).save_pretrained(tmp_path / "init")

    ref = tmp_path / "ref"
    _finish(_command(tmp_path, seed, 2, ref, torchrun=True))
    expected = _metrics(ref)
    assert len(expected["loss_history"]) == TOTAL
    kept = list_checkpoints(ref / "checkpoints")
    assert [step for step, _ in kept] == [2, 4]
    assert {p.name for p in kept[0][1].iterdir()} == {"trainer_state.json", "rng.pt", "schedule.pt", "sharded"}

    # Killed at a random instant after a random step, then resumed (same command): bit-identical.
    run = tmp_path / "run"
    resume = _command(tmp_path, seed, 2, run, "--resume", "latest")
    step = rng.randrange(1, TOTAL - 1)
    _kill_at(resume, run / "train_log.jsonl", step, rng)
    for _, path in list_checkpoints(run / "checkpoints"):  # only whole checkpoints under their names
        assert {p.name for p in path.iterdir()} == {"trainer_state.json", "rng.pt", "schedule.pt", "sharded"}
    _finish(resume)
    got = _metrics(run)
    for key in ("loss_history", "evals", "temperature", "eval_after"):
        assert got[key] == expected[key], (key, seed, step)
    want = _weights(ref)
    for name, tensor in _weights(run).items():
        assert torch.equal(tensor, want[name]), (name, seed, step)
    steps = [e["global_step"] for e in read_log(run / "train_log.jsonl") if e["event"] == "step"]
    assert steps == list(range(1, TOTAL + 1)), (steps, step)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]

    # 2 ranks -> 4 (from step 2), then 4 -> 2 (from the 4-rank run's step 3): the same global
    # batches, so the same losses and weights up to reduction order.
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    _finish(_command(tmp_path, seed, 4, wide, "--resume", str(kept[0][1]), "--save-every", "1"))
    from_wide = [p for s, p in list_checkpoints(wide / "checkpoints") if s == 3][0]
    assert len(list((from_wide / "sharded").glob("*.distcp"))) == 4  # written by 4 ranks
    _finish(_command(tmp_path, seed, 2, narrow, "--resume", str(from_wide)))
    init = EmbeddingModel.from_pretrained(tmp_path / "init").state_dict()
    for out in (wide, narrow):
        losses = [e["loss"] for e in _metrics(out)["loss_history"]]
        assert losses == pytest.approx([e["loss"] for e in expected["loss_history"]], rel=1e-4), (out.name, seed)
        for name, tensor in _weights(out).items():
            update_ref, update = want[name] - init[name], tensor - init[name]
            assert (update - update_ref).norm() <= 5e-3 * update_ref.norm() + 1e-7, (out.name, name, seed)

    # The last checkpoint exported in one process equals the run's own saved model.
    assert cli_main(["export", str(kept[-1][1]), str(tmp_path / "exported")]) == 0
    model = EmbeddingModel.from_pretrained(tmp_path / "exported")
    for name, tensor in model.state_dict().items():
        if name in want:
            assert torch.equal(tensor, want[name]), name
    with pytest.raises(ValueError, match="not written by a train --fsdp run"):
        export_checkpoint(tmp_path / "init", tmp_path / "nowhere")
