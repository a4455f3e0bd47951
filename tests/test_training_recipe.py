"""Every recipe choice of the trainer does what it says and is recorded truthfully: the resolved
settings in train_config.json (no null where a default was used), the dropout in the PEFT
config, GradCache equal to the unsplit batch, gradient accumulation equal to the mean of its
batches' gradients, schedules, a learnable temperature, fp16 autocast with loss scaling, causal
attention, the query instruction, evaluation on an --eval-data set and held-out groups."""

import json

import pytest
import torch

from latentembed.models.embedding import EmbeddingModel
from latentembed.modules.grad_cache import grad_cache_step
from latentembed.training.data import (
    TrainingExample,
    read_examples,
    retrieval_eval_set,
    split_examples,
    write_beir_files,
)
from latentembed.training.loop import lr_schedule
from latentembed.training.plan import row_prompt
from latentembed.training.trainer import TrainConfig, train
from tests.test_training_input_errors import _rows, _write
from tests.test_training_run import _model_for, _slice, _write_jsonl, one_thread  # noqa: F401


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _small(tmp_path, n: int = 32, **kw) -> TrainConfig:
    data = _write_jsonl(tmp_path / "train.jsonl", _slice("retrieval", n, kw.pop("seed", 0)))
    base = dict(data=str(data), steps=2, batch_size=4, quiet=True, max_length=48, eval=False)
    return TrainConfig(**{**base, **kw})


def test_train_config_records_the_resolved_recipe_and_reproduces_it(tmp_path, one_thread):
    cfg = _small(tmp_path, output=str(tmp_path / "out"), full=False, lora_rank=4, lora_dropout=0.1, steps=None)
    train(cfg)
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["lr"] == 1e-4 * 20 and saved["stage2_lr"] == saved["lr"] / 2  # the tiny model's 2e-3
    assert (saved["full"], saved["template"], saved["epochs"], saved["pooling"]) == (False, "e5", 6, "mean")
    assert (saved["causal"], saved["dtype"], saved["eval_fraction"]) == (False, "float32", 0.0)
    assert None not in (saved["lr"], saved["full"], saved["template"], saved["epochs"], saved["causal"])
    peft = json.loads((tmp_path / "out" / "adapters" / "default" / "adapter_config.json").read_text())
    assert peft["lora_dropout"] == 0.1 and peft["r"] == 4
    # The recorded settings are a TrainConfig that runs the same recipe.
    again = TrainConfig(**{**saved, "output": str(tmp_path / "again")})
    train(again)
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())["loss_history"]
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())["loss_history"]
    assert first == second


def _grads_of_steps(monkeypatch, cfg: TrainConfig, model: EmbeddingModel) -> list[dict]:
    """The gradients of every optimizer step (before clipping), by parameter name."""
    seen, original = [], torch.nn.utils.clip_grad_norm_
    names = {id(p): n for n, p in model.named_parameters()}

    def record(params, *a, **k):
        params = list(params)
        seen.append({names[id(p)]: p.grad.clone() for p in params if p.grad is not None})
        return original(params, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", record)
        train(cfg, model=model)
    return seen


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_cache_gives_the_gradients_of_the_whole_batch(tmp_path, monkeypatch, one_thread):
    seed = _seed()
    rows = _slice("retrieval", 24, seed)
    cfg = _small(tmp_path, seed=seed, steps=1, batch_size=6, hard_negatives=2, full=True)
    model = _model_for(rows)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    whole = _grads_of_steps(monkeypatch, cfg, model)
    model.load_state_dict(state)
    from latentembed.training import steps

    calls = []
    monkeypatch.setattr(steps, "grad_cache_step", lambda *a, **k: calls.append(a[-1]) or grad_cache_step(*a, **k))
    chunked = _grads_of_steps(monkeypatch, TrainConfig(**{**cfg.__dict__, "grad_cache": 5}), model)
    assert len(whole) == len(chunked) == 1 and calls == [5]
    _close(whole[0], chunked[0])


def test_gradient_accumulation_averages_its_batches(tmp_path, monkeypatch, one_thread):
    seed = _seed()
    rows = _slice("retrieval", 32, seed)
    model = _model_for(rows)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # lr 0: the weights stay, so two plain steps see the same model as one step of two batches.
    cfg = _small(tmp_path, seed=seed, steps=2, batch_size=4, full=True, lr=0.0, weight_decay=0.0)
    plain = _grads_of_steps(monkeypatch, cfg, model)
    model.load_state_dict(state)
    accumulated = _grads_of_steps(monkeypatch, TrainConfig(**{**cfg.__dict__, "steps": 1, "grad_accum": 2}), model)
    assert len(plain) == 2 and len(accumulated) == 1
    _close(accumulated[0], {n: (plain[0][n] + plain[1][n]) / 2 for n in plain[0]})


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [1 / 3, 2 / 3, 1.0, 0.5 * (1 + 0.5**0.5), 0.5, 0.5 * (1 - 0.5**0.5), 0.0]),
        ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0]),
    ],
)
def test_schedules_after_the_warmup(schedule, expected):
    factor = lr_schedule(6, 2, schedule)
    assert [factor(s) for s in range(7)] == pytest.approx(expected)


def test_learnable_temperature_trains_and_fp16_autocast_scales_the_loss(tmp_path, one_thread):
    result = train(_small(tmp_path, learnable_temperature=True, temperature=0.05, steps=3, output=str(tmp_path / "t")))
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["temperature"] != pytest.approx(0.05, abs=1e-7) and 0.01 <= metrics["temperature"] <= 1
    log = [json.loads(line) for line in (tmp_path / "t" / "train_log.jsonl").read_text().splitlines()]
    assert all("temperature" in e for e in log if e["event"] == "step")
    assert len(result["loss_history"]) == 3
    half = train(_small(tmp_path, dtype="float16", steps=2, output=str(tmp_path / "h")))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in half["loss_history"])
    log = [json.loads(line) for line in (tmp_path / "h" / "train_log.jsonl").read_text().splitlines()]
    scales = [e["loss_scale"] for e in log if e["event"] == "step"]
    assert len(scales) == 2 and all(s <= 65536.0 and s == 2 ** round(torch.tensor(s).log2().item()) for s in scales)
    assert json.loads((tmp_path / "h" / "train_config.json").read_text())["dtype"] == "float16"


def test_causal_attention_and_the_query_instruction_reach_the_model(tmp_path, one_thread):
    result = train(_small(tmp_path, causal=True, instruction="Find the passage", output=str(tmp_path / "c")))
    assert result["model"].config.causal and result["model"].backbone.causal
    assert EmbeddingModel.from_pretrained(tmp_path / "c" / "model").config.causal
    saved = json.loads((tmp_path / "c" / "train_config.json").read_text())
    assert saved["causal"] is True and saved["instruction"] == "Find the passage"
    plain, own = TrainingExample("q", "p"), TrainingExample("q", "p", task="sts")
    assert row_prompt(plain, "retrieval", "Find the passage") == (None, "Find the passage")
    assert row_prompt(own, "retrieval", "Find the passage") == ("sts", None)
    assert row_prompt(plain, "retrieval") == ("retrieval", None)


def test_eval_data_is_evaluated_every_n_steps(tmp_path, one_thread):
    seed = _seed()
    rows = _slice("retrieval", 40, seed)
    write_beir_files(*retrieval_eval_set(rows[32:]), tmp_path / "beir")
    data = _write_jsonl(tmp_path / "train.jsonl", rows[:32])
    cfg = TrainConfig(
        data=str(data),
        eval_data=str(tmp_path / "beir"),
        eval_every=2,
        steps=4,
        batch_size=4,
        max_length=48,
        quiet=True,
        seed=seed,
        output=str(tmp_path / "out"),
    )
    result = train(cfg)
    assert [e["global_step"] for e in result["evals"]] == [0, 2, 4]
    assert result["eval_before"]["num_queries"] == 8 and result["eval_after"] == {
        k: v for k, v in result["evals"][-1].items() if k not in ("global_step", "stage", "step")
    }
    events = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in events if e["event"] == "eval"] == [0, 2, 4]
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 4 and all(e["peak_mem_mib"] > 0 and e["mem"] == "rss" for e in steps)
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["eval_fraction"] == 0.0


def test_held_out_groups_are_never_split(tmp_path):
    rows = [dict(r, doc=f"article {i % 7}") for i, r in enumerate(_rows(60, seed=_seed() % 1000))]
    examples = read_examples(_write(tmp_path / "g.jsonl", rows), group_key="doc")
    for fraction in (0.1, 0.25, 0.5):
        train_rows, held = split_examples(examples, fraction, seed=3, by_group=True)
        assert {ex.group for ex in train_rows}.isdisjoint({ex.group for ex in held})
        assert len(train_rows) + len(held) == 60 and held and train_rows
        assert abs(len(held) - fraction * 60) <= 9  # within one group of the target
    again = split_examples(examples, 0.25, seed=3, by_group=True)
    assert again == split_examples(examples, 0.25, seed=3, by_group=True)
