"""The run's reports: the JSONL metrics file (whole lines; a torn last line is skipped when read
and dropped on resume), the progress bar with ETA, TensorBoard scalars (through a stand-in
SummaryWriter: the package is optional) and the peak memory of each step."""

import io
import json
import sys
import types

import pytest
import torch

from latentembed.training.logs import Progress, RunLog, StepMemory, read_log
from latentembed.training.trainer import TrainConfig, train
from tests.test_training_run import _slice, _write_jsonl, one_thread  # noqa: F401


def _log(path, **kw) -> RunLog:
    return RunLog(path, lambda *a: None, Progress(10, 0, enabled=False), **kw)


def _step(g: int) -> dict:
    return dict(
        stage=1,
        step=g,
        stage_steps=10,
        global_step=g,
        loss=1.0 / g,
        lr=1e-3,
        tokens=100,
        tokens_per_s=1e4,
        step_s=0.01,
        peak_mem_mib=10.0,
        mem="rss",
    )


def test_a_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
    path = tmp_path / "train_log.jsonl"
    log = _log(path)
    log.open({"global_step": 0})
    for g in range(1, 6):
        log.step(_step(g))
    with open(path, "ab") as f:
        f.write(b'{"event": "step", "global_step": 6, "lo')  # a write cut by a power loss
    events = read_log(path)
    assert [e["event"] for e in events] == ["start"] + ["step"] * 5
    with pytest.raises(ValueError, match=r"train_log.jsonl:7: not a JSON object"):
        read_log(path, drop_torn=False)
    # Resuming from the checkpoint of step 3: steps 4, 5 and the torn line go.
    _log(path).open({"global_step": 3}, resume_step=3)
    events = read_log(path, drop_torn=False)
    assert [(e["event"], e.get("global_step")) for e in events] == [
        ("start", 0),
        ("step", 1),
        ("step", 2),
        ("step", 3),
        ("resume", 3),
    ]
    assert path.read_bytes().endswith(b"\n")
    middle = path.read_bytes().replace(b'"step", "time"', b'"step" "time"', 1)
    path.write_bytes(middle)
    with pytest.raises(ValueError, match=r"train_log.jsonl:2: not a JSON object"):
        read_log(path)


def test_progress_bar_shows_steps_and_eta():
    stream = io.StringIO()
    bar = Progress(total=8, done=2, enabled=True, stream=stream)
    bar.update(4, stage=1)
    text = stream.getvalue()
    assert "stage 1 [" in text and "4/8 steps" in text and "s/step" in text and "ETA 0:00:0" in text
    bar.clear()
    assert stream.getvalue().endswith("\r\x1b[K")
    silent = io.StringIO()
    Progress(total=8, done=0, enabled=False, stream=silent).update(3, stage=1)
    assert silent.getvalue() == ""


def test_step_memory_is_the_peak_of_the_step():
    memory = StepMemory(torch.device("cpu"))
    memory.start()
    small = memory.peak_mib()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    big += 1
    grown = memory.peak_mib()
    assert grown >= small + 60 or not memory.resettable
    del big
    memory.start()
    if memory.resettable:  # Linux: the peak restarts with the step
        assert memory.peak_mib() < grown - 30


class _Writer:
    """A stand-in for torch.utils.tensorboard.SummaryWriter that records its calls."""

    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_step_and_evaluation(tmp_path, monkeypatch, one_thread):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _Writer.made.clear()
    data = _write_jsonl(tmp_path / "t.jsonl", _slice("retrieval", 32, 0))
    cfg = TrainConfig(
        data=str(data),
        steps=4,
        batch_size=4,
        max_length=32,
        eval_every=2,
        eval_fraction=0.25,
        save_every=2,
        report_to=("tensorboard",),
        output=str(tmp_path / "out"),
        quiet=True,
    )
    train(cfg)
    (writer,) = _Writer.made
    assert writer.log_dir == str(tmp_path / "out" / "tensorboard") and writer.closed and writer.purge_step is None
    assert [s for t, s in writer.scalars if t == "train/loss"] == [1, 2, 3, 4]
    assert [s for t, s in writer.scalars if t == "eval/ndcg@10"] == [0, 2, 4]
    assert ("train/peak_mem_mib", 1) in writer.scalars
    # Resumed from step 2 (more steps: allowed), TensorBoard forgets what came after it.
    train(TrainConfig(**{**cfg.__dict__, "resume": str(tmp_path / "out" / "checkpoints" / "step-00000002")}))
    assert _Writer.made[-1].purge_step == 3
    events = read_log(tmp_path / "out" / "train_log.jsonl")
    assert [e["global_step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert [e["event"] for e in events].count("resume") == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["resumed_from"].endswith("step-00000002")


def test_a_log_rewrite_killed_midway_blocks_nothing(tmp_path, one_thread):
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".train_log.jsonl.tmp-otherhost-4242-0123abcd"  # a dead rewrite's temporary file
    leftover.write_text('{"event": "start"')
    data = _write_jsonl(tmp_path / "t.jsonl", _slice("retrieval", 16, 0))
    train(TrainConfig(data=str(data), steps=1, batch_size=4, max_length=32, eval=False, quiet=True, output=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model", "train_config.json", "train_log.jsonl"]
