"""The training loop: each stage gets a fresh AdamW and a warmup-then-linear-decay schedule,
walks its epochs' batches from the loop's position (:class:`~.state.LoopState`), takes one
:func:`~.steps.train_step` per batch, and logs loss, learning rate, tokens/s and memory.

Example::

    >>> from latentembed.training.loop import lr_schedule
    >>> factor = lr_schedule(total=10, warmup=0.2)   # 2 warmup steps, then 8 of linear decay
    >>> [round(factor(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.333, 0.667, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import resource
import time
from typing import Callable, Iterator, Sequence

import torch

from ..modules.contrastive import InfoNCELoss
from .data import TrainingExample, batch_examples
from .plan import StagePlan
from .state import LoopState, Stage, TrainingRun
from .steps import train_step

__all__ = ["lr_schedule", "make_stage", "stage_batches", "memory_report", "run_stage", "run_stages"]


def lr_schedule(total: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimizer steps of ``total``: a linear warmup
    over ``warmup`` steps (a fraction of ``total`` when < 1), then a linear decay to 0."""
    n_warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
    n_warm = min(max(n_warm, 0), total)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < n_warm:
            return (step + 1) / (n_warm + 1)
        return max(0.0, (total - step) / max(total - n_warm, 1))

    return factor


def make_stage(run: TrainingRun, plan: StagePlan) -> Stage:
    """A stage's loss (in-batch negatives in stage 1 only), a fresh AdamW over the trainable
    parameters at the stage's peak learning rate, and its schedule."""
    cfg = run.cfg
    loss_fn = InfoNCELoss(cfg.temperature, in_batch_negatives=plan.in_batch_negatives)
    optimizer = torch.optim.AdamW(run.params, lr=plan.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(plan.steps, cfg.warmup))
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


def memory_report(device: torch.device) -> str:
    """Peak memory so far: CUDA's allocator on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return f"cuda max {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return f"rss max {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"


def run_stage(run: TrainingRun, plan: StagePlan, state: LoopState, loss_history: list) -> dict:
    """Train one stage from ``state`` to its last step; appends ``{"stage", "step", "loss",
    "lr"}`` per step to ``loss_history`` (the loss averaged over the ranks) and returns the
    stage's summary (rows, steps, epochs started, negatives, seconds)."""
    cfg, dist = run.cfg, run.dist
    stage = make_stage(run, plan)
    run.module.train()
    tokens, t_log = 0, time.perf_counter()
    t_stage = t_log
    for batch in stage_batches(
        plan.rows, plan.steps, state, batch_size=cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world
    ):
        out = train_step(run, stage, batch)
        state.step += 1
        state.global_step += 1
        tokens += out.tokens
        entry = {"stage": plan.number, "step": state.step, "loss": float(dist.mean(out.loss)), "lr": out.lr}
        loss_history.append(entry)
        if state.step % cfg.log_every == 0 or state.step == plan.steps or state.step == 1:
            elapsed = time.perf_counter() - t_log
            run.say(
                f"stage {plan.number} step {state.step:4d}/{plan.steps} loss {entry['loss']:.4f} "
                f"lr {out.lr:.2e} "
                f"tok/s {tokens * dist.world / max(elapsed, 1e-9):,.0f} mem {memory_report(run.device)}"
            )
            tokens, t_log = 0, time.perf_counter()
    return {
        "stage": plan.number,
        "rows": len(plan.rows),
        "steps": plan.steps,
        "epochs_started": state.epochs_started(),
        "in_batch_negatives": plan.in_batch_negatives,
        "hard_negatives": cfg.hard_negatives,
        "seconds": time.perf_counter() - t_stage,
    }


def run_stages(run: TrainingRun, stages: Sequence[StagePlan], state: LoopState, result: dict) -> None:
    """Every stage from ``state.stage`` on, in order; each one's steps go to
    ``result["loss_history"]`` and its summary to ``result["stages"]``."""
    while state.stage < len(stages):
        result["stages"].append(run_stage(run, stages[state.stage], state, result["loss_history"]))
        state.next_stage()
