"""The training loop: each stage gets a fresh AdamW and a warmup-then-decay schedule (restored
from the checkpoint when a run resumes inside it), walks its epochs' batches from the loop's
position (:class:`~.state.LoopState`), takes one :func:`~.steps.train_step` per ``grad_accum``
batches, logs every step (:class:`~.logs.RunLog`), evaluates every ``eval_every`` steps and
saves a checkpoint every ``save_every`` steps.

Example::

    >>> from latentembed.training.loop import lr_schedule
    >>> factor = lr_schedule(total=10, warmup=0.2)   # 2 warmup steps, then 8 of linear decay
    >>> [round(factor(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.333, 0.667, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math
import time
from itertools import islice
from typing import Callable, Iterator, Sequence

import torch

from ..modules.contrastive import InfoNCELoss
from .data import TrainingExample, batch_examples
from .held_out import format_eval
from .plan import StagePlan
from .sharded_checkpoint import load_sharded, sharded_state
from .state import LoopState, Stage, TrainingRun
from .steps import train_step

__all__ = [
    "lr_schedule",
    "make_stage",
    "stage_batches",
    "run_stage",
    "run_stages",
    "record_evaluation",
    "checkpoint_payload",
]


def lr_schedule(total: int, warmup: float, schedule: str = "linear") -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimizer steps of ``total``: a linear warmup
    over ``warmup`` steps (a fraction of ``total`` when < 1), then ``schedule``: a linear or
    cosine decay to 0, or constant."""
    n_warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
    n_warm = min(max(n_warm, 0), total)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < n_warm:
            return (step + 1) / (n_warm + 1)
        if schedule == "constant":
            return 1.0
        left = max(0.0, (total - step) / max(total - n_warm, 1))
        return left if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))

    return factor


def make_stage(run: TrainingRun, plan: StagePlan) -> Stage:
    """A stage's loss (its in-batch negatives; a learnable temperature shared by the stages),
    a fresh AdamW over the trainable parameters at the stage's peak learning rate (the
    temperature without weight decay), and its schedule."""
    cfg = run.cfg
    loss_fn = InfoNCELoss(
        cfg.temperature,
        learnable_temperature=cfg.learnable_temperature,
        in_batch_negatives=plan.in_batch_negatives,
    ).to(run.device)
    groups = [{"params": run.params}]
    if run.temperature is not None:
        loss_fn.log_scale = run.temperature  # one temperature for the whole run
        groups.append({"params": [run.temperature], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(plan.steps, cfg.warmup, cfg.schedule))
    return Stage(plan=plan, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler)


def stage_batches(
    rows: Sequence[TrainingExample],
    total: int,
    state: LoopState,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
) -> Iterator[list[TrainingExample]]:
    """This rank's batches from ``state`` on until ``state.step`` reaches ``total``: epoch after
    epoch, each in the order :func:`batch_examples` gives for (seed, epoch, rank). ``state``
    moves to the next batch's (epoch, batch) as a batch is handed out; the caller counts
    ``state.step``. So a ``state`` saved after a step resumes with the next batch."""
    while state.step < total:
        order = batch_examples(rows, batch_size, seed=seed, epoch=state.epoch, rank=rank, world_size=world_size)
        for position in range(state.batch, len(order)):
            if state.step >= total:
                return
            if position + 1 < len(order):
                state.batch = position + 1
            else:
                state.epoch, state.batch = state.epoch + 1, 0
            yield order[position]


def _restore_stage(run: TrainingRun, stage: Stage, state: LoopState) -> None:
    """Resuming inside this stage: its optimizer, schedule and loss scale as saved."""
    if run.resume is None or run.resume.state["loop"]["stage"] != state.stage:
        return
    saved = run.resume.optimizer
    if run.resume.sharded:  # every rank its shards of the optimizer state
        load_sharded(
            run.resume.path, run.model, run.temperature, optimizer=stage.optimizer, trainable_only=not run.full
        )
    else:
        stage.optimizer.load_state_dict(saved["optimizer"])
    stage.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.resume = None


def run_stage(run: TrainingRun, plan: StagePlan, state: LoopState, result: dict) -> dict:
    """Train one stage from ``state`` to its last step; appends ``{"stage", "step", "loss",
    "lr"}`` per step to ``result["loss_history"]`` (the loss averaged over the ranks), logs
    each step, evaluates and saves checkpoints when due, and returns the stage's summary
    (rows, steps, epochs started, negatives, seconds)."""
    cfg, dist = run.cfg, run.dist
    stage = make_stage(run, plan)
    _restore_stage(run, stage, state)
    run.module.train()
    t_stage = time.perf_counter()
    batches = stage_batches(
        plan.rows, plan.steps, state, batch_size=cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world
    )
    while state.step < plan.steps:
        group = list(islice(batches, cfg.grad_accum))
        run.memory.start()
        t0 = time.perf_counter()
        out = train_step(run, stage, group)
        loss = float(dist.mean(out.loss))
        step_s = time.perf_counter() - t0
        state.step += 1
        state.global_step += 1
        result["loss_history"].append({"stage": plan.number, "step": state.step, "loss": loss, "lr": out.lr})
        entry = {
            "stage": plan.number,
            "step": state.step,
            "stage_steps": plan.steps,
            "global_step": state.global_step,
            "epoch": state.epoch,
            "loss": loss,
            "lr": out.lr,
            "tokens": out.tokens * dist.world,
            "tokens_per_s": out.tokens * dist.world / max(step_s, 1e-9),
            "step_s": step_s,
            "peak_mem_mib": run.memory.peak_mib(),
            "mem": run.memory.kind,
        }
        if run.temperature is not None:
            entry["temperature"] = result["temperature"] = float(stage.loss_fn.temperature)
        if run.scaler.is_enabled():
            entry["loss_scale"] = float(run.scaler.get_scale())
        run.log.step(entry)
        _after_step(run, stage, state, result)
    return {
        "stage": plan.number,
        "rows": len(plan.rows),
        "steps": plan.steps,
        "epochs_started": state.epochs_started(),
        "in_batch_negatives": plan.in_batch_negatives,
        "hard_negatives": cfg.hard_negatives,
        "seconds": time.perf_counter() - t_stage,
    }


def record_evaluation(run: TrainingRun, state: LoopState, result: dict, metrics: dict, stage: int) -> None:
    """Keep an evaluation in ``result["evals"]`` (and ``result["best"]`` by ``cfg.best_metric``)
    and log it."""
    entry = {"global_step": state.global_step, "stage": stage, "step": state.step, **metrics}
    result.setdefault("evals", []).append(entry)
    value = metrics.get(run.cfg.best_metric)
    best = result.get("best")
    if state.global_step > 0 and value is not None and (best is None or value > best["value"]):
        result["best"] = {"global_step": state.global_step, "metric": run.cfg.best_metric, "value": value}
    run.log.evaluation(state.global_step, stage, state.step, metrics)


def _after_step(run: TrainingRun, stage: Stage, state: LoopState, result: dict) -> None:
    """Evaluate (rank 0; the others wait) every ``eval_every`` steps, and save a checkpoint
    every ``save_every`` steps and, with ``keep_best``, after every evaluation."""
    cfg = run.cfg
    evaluated = cfg.eval_every is not None and state.global_step % cfg.eval_every == 0
    if evaluated and run.evaluate is not None:
        metrics = run.evaluate()
        record_evaluation(run, state, result, metrics, stage.plan.number)
        run.say(f"eval at step {state.global_step}: " + format_eval(metrics))
    if evaluated:
        run.dist.barrier()
    due = cfg.save_every is not None and state.global_step % cfg.save_every == 0
    if run.checkpoints is not None and (due or (cfg.keep_best and evaluated)):
        schedule = {
            "scheduler": stage.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        }
        if run.sharded:  # every rank writes its shards of the weights and the optimizer state
            shards = sharded_state(run.model, stage.optimizer, run.temperature, trainable_only=not run.full)
            path = run.checkpoints.save(checkpoint_payload(run, state, result), {}, schedule, sharded=shards)
        else:
            path = run.checkpoints.save(
                checkpoint_payload(run, state, result),
                run.trained_tensors(),
                {"optimizer": stage.optimizer.state_dict(), **schedule},
            )
        if path is not None:
            run.log.event("checkpoint", global_step=state.global_step, path=str(path))


def checkpoint_payload(run: TrainingRun, state: LoopState, result: dict) -> dict:
    """trainer_state.json of a checkpoint after ``state``: the loop's position, the history so
    far and the run's identity (configs, fingerprints, ranks)."""
    history = {k: v for k, v in result.items() if k != "model"}
    return {
        "loop": {
            "stage": state.stage,
            "step": state.step,
            "global_step": state.global_step,
            "epoch": state.epoch,
            "batch": state.batch,
        },
        "result": history,
        **run.identity,
    }


def run_stages(run: TrainingRun, stages: Sequence[StagePlan], state: LoopState, result: dict) -> None:
    """Every stage from ``state.stage`` on, in order; each one's steps go to
    ``result["loss_history"]`` and its summary to ``result["stages"]``."""
    while state.stage < len(stages):
        result["stages"].append(run_stage(run, stages[state.stage], state, result))
        state.next_stage()
