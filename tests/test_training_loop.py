"""The trainer's steps on their own: the checks that need no data, the stage plan, the learning-rate
schedule, and the loop's walk over the batches, which a saved LoopState resumes exactly."""

import copy
import dataclasses

import pytest
import torch

from latentembed.training.config import DEMO_EPOCHS, STAGE2_LR_FACTOR, TrainConfig, check_config
from latentembed.training.data import TrainingExample, batch_examples
from latentembed.training.loop import lr_schedule, stage_batches
from latentembed.training.plan import RunData, plan_stages
from latentembed.training.state import LoopState


def _rows(n: int) -> list[TrainingExample]:
    ids = torch.randint(0, 10**9, (n, 3)).tolist()
    return [TrainingExample(f"q{a}-{i}", f"p{b}-{i}", [f"n{c}-{i}"]) for i, (a, b, c) in enumerate(ids)]


def _data(n1: int, n2: int) -> RunData:
    stage1, stage2 = _rows(n1), _rows(n2)
    return RunData(
        stage1=stage1,
        source1="s1",
        stage2=stage2,
        source2="s2" if stage2 else None,
        train1=stage1,
        held_out=[],
        stage2_rows=stage1 + stage2 if stage2 else [],
    )


@pytest.mark.parametrize(
    "cfg, message",
    [
        (TrainConfig(batch_size=1, hard_negatives=0), "no negative at all"),
        (TrainConfig(warmup=2.5), "warmup"),
        (TrainConfig(dtype="float64"), "dtype must be auto, float32, bfloat16 or float16, got 'float64'"),
        (TrainConfig(template="nope"), "unknown prompt template 'nope'"),
        (TrainConfig(pooling="last"), "pooling='last'"),
    ],
)
def test_check_config_refuses_each_bad_setting_by_name(cfg, message):
    with pytest.raises(ValueError, match=message):
        check_config(cfg, model=None)


def test_check_config_refuses_an_output_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="notes.txt"):
        check_config(TrainConfig(output=str(tmp_path)), model=None)
    check_config(TrainConfig(output=str(tmp_path / "new")), model=None)


def test_plan_lengths_learning_rates_and_when_stage_two_runs():
    seed = int(torch.randint(0, 1000, ()))
    batch = int(torch.randint(2, 6, ()))
    data = _data(int(torch.randint(13, 40, ())), int(torch.randint(3, 9, ())))
    cfg = TrainConfig(batch_size=batch, seed=seed)
    per_epoch = [len(data.train1) // batch, len(data.stage2_rows) // batch]
    tiny = plan_stages(cfg, data, tiny=True, lr=2e-3, rank=0, world_size=1)
    assert [(s.number, s.steps, s.in_batch_negatives) for s in tiny] == [
        (1, DEMO_EPOCHS[0] * per_epoch[0], True),
        (2, DEMO_EPOCHS[1] * per_epoch[1], False),
    ]
    assert [s.lr for s in tiny] == [2e-3, 2e-3 * STAGE2_LR_FACTOR]
    steps = plan_stages(
        dataclasses.replace(cfg, steps=7, stage2_lr=1e-5), data, tiny=False, lr=1e-4, rank=0, world_size=1
    )
    assert [(s.steps, s.lr) for s in steps] == [(7, 1e-4), (7, 1e-5)]
    for cfg_one, data_one in [(dataclasses.replace(cfg, stage2_steps=0), data), (cfg, _data(len(data.stage1), 0))]:
        assert [s.number for s in plan_stages(cfg_one, data_one, tiny=False, lr=1e-4, rank=0, world_size=1)] == [1]
    with pytest.raises(ValueError, match=f"fewer than one global batch of --batch-size {batch} x 2 rank"):
        plan_stages(cfg, _data(2 * batch - 1, 0), tiny=False, lr=1e-4, rank=1, world_size=2)


@pytest.mark.parametrize(
    "total, warmup, expected",
    [
        (10, 0.2, [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]),
        (5, 2, [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3, 0.0]),
        (3, 0.0, [1.0, 2 / 3, 1 / 3, 0.0]),
        (2, 7, [1 / 3, 2 / 3, 0.0]),  # warmup longer than the stage: cut to the stage
    ],
)
def test_lr_schedule_warms_up_then_decays_to_zero(total, warmup, expected):
    factor = lr_schedule(total, warmup)
    assert [factor(s) for s in range(total + 1)] == pytest.approx(expected)


def _walk(rows, total, state, **kw):
    """Every batch the loop takes from ``state`` on, counting steps as the loop does."""
    out = []
    for batch in stage_batches(rows, total, state, **kw):
        out.append(batch)
        state.step += 1
    return out


@pytest.mark.parametrize("world_size", [1, 3])
def test_stage_batches_walk_the_epochs_in_order_and_resume_from_any_state(world_size):
    rows = _rows(int(torch.randint(20, 40, ())))
    kw = dict(
        batch_size=int(torch.randint(2, 5, ())),
        seed=int(torch.randint(0, 1000, ())),
        rank=world_size - 1,
        world_size=world_size,
    )
    per_epoch = len(rows) // (kw["batch_size"] * world_size)
    for total in (0, per_epoch, 2 * per_epoch, 2 * per_epoch + 1, 3 * per_epoch - 1):
        expected = [
            b
            for e in range(3)
            for b in batch_examples(
                rows, kw["batch_size"], seed=kw["seed"], epoch=e, rank=kw["rank"], world_size=world_size
            )
        ][:total]
        state = LoopState()
        assert _walk(rows, total, state, **kw) == expected
        assert state.step == total and state.epochs_started() == -(-total // per_epoch)
        # A LoopState saved after any step resumes with the next batch.
        saved, state = [], LoopState()
        for _ in stage_batches(rows, total, state, **kw):
            state.step += 1
            saved.append(copy.deepcopy(state))
        for i, snapshot in enumerate(saved):
            resumed = copy.deepcopy(snapshot)
            assert _walk(rows, total, resumed, **kw) == expected[i + 1 :], (total, i)
            assert resumed == state


def test_next_stage_keeps_the_global_step():
    state = LoopState(stage=0, step=5, global_step=5, epoch=2, batch=1)
    assert state.epochs_started() == 3
    state.next_stage()
    assert state == LoopState(stage=1, step=0, global_step=5, epoch=0, batch=0)
