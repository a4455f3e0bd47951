"""The run's data and stage plan: the rows of each stage, the held-out split and each stage's
length and learning rate, all read and checked before any model exists.

Example::

    >>> from latentembed.training.config import TrainConfig
    >>> from latentembed.training.plan import load_run_data, plan_stages
    >>> cfg = TrainConfig()
    >>> data = load_run_data(cfg, rank=0)
    >>> [(s.number, s.steps) for s in plan_stages(cfg, data, tiny=True, lr=2e-3, rank=0, world_size=1)]
    [(1, 42), (2, 22)]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import DEMO_EPOCHS, STAGE2_LR_FACTOR, TrainConfig, eval_fraction
from .data import (
    EvalSet,
    TrainingExample,
    batch_examples,
    bundled_examples,
    load_eval_set,
    read_examples,
    repeated_rows_report,
    split_examples,
)

__all__ = [
    "RunData",
    "StagePlan",
    "load_rows",
    "load_run_data",
    "row_task",
    "row_prompt",
    "check_prompts",
    "plan_stages",
    "stage_epochs",
]


@dataclass
class RunData:
    """The rows of a run. ``stage1`` / ``stage2``: as read (``source1`` / ``source2``: where
    from, for messages; ``stage2`` is empty without a stage-2 set); ``train1`` / ``held_out``:
    ``stage1`` split for the evaluation; ``stage2_rows``: stage 2's training rows (``train1``
    plus ``stage2``; empty without a stage-2 set); ``eval_set``: the ``--eval-data`` set, which
    replaces ``held_out``."""

    stage1: list[TrainingExample]
    source1: str
    stage2: list[TrainingExample]
    source2: Optional[str]
    train1: list[TrainingExample]
    held_out: list[TrainingExample]
    stage2_rows: list[TrainingExample]
    eval_set: Optional[EvalSet] = None


@dataclass
class StagePlan:
    """One stage of the schedule: its ``number`` (1 or 2), training ``rows``, whether a query
    scores the other rows' documents (``in_batch_negatives``: stage 1) or only its own
    positive and hard negatives (stage 2), its length in optimizer ``steps`` and its peak
    ``lr``."""

    number: int
    rows: list[TrainingExample]
    in_batch_negatives: bool
    steps: int
    lr: float


def load_rows(path: Optional[str], bundled: str, group_key: Optional[str] = None) -> tuple[list[TrainingExample], str]:
    """(rows, source) of a JSONL file, or of the bundled set ``bundled`` when ``path`` is None;
    a missing or empty file is an error that says what the file should hold. ``group_key``: a
    field every row carries (see :func:`~.data.read_examples`)."""
    if path is None:
        if group_key is not None:
            raise ValueError(
                f"--eval-group-key {group_key}: the bundled {bundled} rows have no such field; pass --data FILE with it"
            )
        return bundled_examples(bundled), f"bundled:{bundled}"
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"data file {path!r} not found (expected JSONL rows with query, positive, "
            "negatives and an optional task / instruction)"
        )
    examples = read_examples(path, group_key)
    if not examples:
        raise ValueError(
            f"{path}: no rows (the file is empty or holds only blank lines); expected JSONL rows "
            "with query, positive, negatives and an optional task / instruction"
        )
    return examples, str(path)


def load_run_data(cfg: TrainConfig, rank: int) -> RunData:
    """Read both stages' rows as ``cfg`` says, warn once (on rank 0) about repeated rows, and
    split stage 1 into training and held-out rows (none held out without evaluation)."""
    stage1, source1 = load_rows(cfg.data, "retrieval", cfg.eval_group_key)
    if cfg.stage2_data is None and cfg.data is None:
        stage2, source2 = load_rows(None, "blended")
    elif cfg.stage2_data is None or cfg.stage2_data == "none":
        stage2, source2 = [], None
    else:
        stage2, source2 = load_rows(cfg.stage2_data, "blended")
    if rank == 0:
        repeats = repeated_rows_report(stage1 + stage2)
        if repeats:
            # Attributed to the caller of train(): train -> _run -> load_run_data -> here.
            warnings.warn(f"training data: {repeats}", stacklevel=4)
    train1, held_out = split_examples(
        stage1, eval_fraction(cfg), seed=cfg.seed, by_group=cfg.eval_group_key is not None
    )
    eval_set = load_eval_set(cfg.eval_data) if cfg.eval_data is not None else None
    return RunData(
        eval_set=eval_set,
        stage1=stage1,
        source1=source1,
        stage2=stage2,
        source2=source2,
        train1=train1,
        held_out=held_out,
        stage2_rows=train1 + stage2 if stage2 else [],
    )


def row_task(ex: TrainingExample, default_task: Optional[str]) -> Optional[str]:
    """The task of a row's query prompt: its own, or ``default_task`` when it names neither a
    task nor an instruction."""
    return ex.task if ex.task is not None or ex.instruction is not None else default_task


def row_prompt(
    ex: TrainingExample, default_task: Optional[str], instruction: Optional[str] = None
) -> tuple[Optional[str], Optional[str]]:
    """(task, instruction) of a row's query prompt: its own; a row naming neither takes
    ``instruction`` when given (``--instruction``), else ``default_task``."""
    if ex.task is None and ex.instruction is None and instruction is not None:
        return None, instruction
    return row_task(ex, default_task), ex.instruction


def check_prompts(
    examples: Sequence[TrainingExample],
    source: Optional[str],
    resolve: Callable,
    default_task: Optional[str],
    instruction: Optional[str] = None,
) -> None:
    """Resolve every row's prompt once (``resolve(task, instruction)``), so an unknown task
    fails before any training; the error names the row (``file:line``)."""
    for i, ex in enumerate(examples):
        try:
            resolve(*row_prompt(ex, default_task, instruction))
        except ValueError as e:
            raise ValueError(f"{ex.where or source}: example {i + 1}: {e}") from None


def _check_own_negatives(rows: Sequence[TrainingExample]) -> None:
    """Stage 2 scores each query against its own hard negatives only: every row needs one
    (a negative equal to the row's positive does not count)."""
    for i, ex in enumerate(rows):
        if not any(n != ex.positive for n in ex.negatives):
            raise ValueError(
                f"{ex.where or f'stage-2 row {i + 1}'}: no hard negative (besides its positive), "
                "and stage 2 (the stage-1 training rows plus --stage2-data) scores each query against "
                "its own hard negatives only; add negatives to the row, or pass --stage2-data none"
            )


def plan_stages(
    cfg: TrainConfig, data: RunData, *, tiny: bool, lr: float, rank: int, world_size: int
) -> list[StagePlan]:
    """The stages to run (stage 2 only with stage-2 rows and steps), their lengths (``steps``,
    else epochs of this rank's batches, ``cfg.grad_accum`` batches a step), in-batch negatives
    and peak learning rates; made, and so checked, before any model exists (too few rows for
    a global batch, stage-2 rows without hard negatives)."""
    epochs, epochs2 = stage_epochs(cfg, tiny)
    lr2 = cfg.stage2_lr if cfg.stage2_lr is not None else lr * STAGE2_LR_FACTOR
    stages = [(1, data.train1, cfg.in_batch_negatives, epochs, cfg.steps, lr)]
    s2_steps = cfg.stage2_steps if cfg.stage2_steps is not None else cfg.steps
    if data.stage2_rows and s2_steps != 0:
        if not cfg.stage2_in_batch_negatives:
            if cfg.hard_negatives == 0:
                raise ValueError(
                    "stage 2 scores each query against its own hard negatives only: with "
                    "hard_negatives=0 its loss is 0; pass --hard-negatives >= 1 or --stage2-data none"
                )
            _check_own_negatives(data.stage2_rows)
        stages.append((2, data.stage2_rows, cfg.stage2_in_batch_negatives, epochs2, s2_steps, lr2))
    plan = []
    for number, rows, in_batch, n_epochs, steps, stage_lr in stages:
        per_epoch = len(batch_examples(rows, cfg.batch_size, seed=cfg.seed, epoch=0, rank=rank, world_size=world_size))
        if per_epoch == 0:
            raise ValueError(
                f"stage {number}: {len(rows)} training rows, fewer than one global batch of "
                f"--batch-size {cfg.batch_size} x {world_size} rank(s); lower --batch-size"
            )
        if steps is None:
            steps = n_epochs * per_epoch // cfg.grad_accum
            if steps == 0:
                raise ValueError(
                    f"stage {number}: {n_epochs} epoch(s) of {per_epoch} batches make no step of "
                    f"--grad-accum {cfg.grad_accum} batches; lower --grad-accum or pass --steps"
                )
        plan.append(StagePlan(number=number, rows=rows, in_batch_negatives=in_batch, steps=steps, lr=stage_lr))
    return plan


def stage_epochs(cfg: TrainConfig, tiny: bool) -> tuple[int, int]:
    """Epochs of stage 1 and stage 2: ``cfg.epochs`` / ``cfg.stage2_epochs``, else 1 (the tiny
    model: :data:`DEMO_EPOCHS`), stage 2 defaulting to stage 1's."""
    epochs = cfg.epochs if cfg.epochs is not None else DEMO_EPOCHS[0] if tiny else 1
    epochs2 = cfg.stage2_epochs if cfg.stage2_epochs is not None else DEMO_EPOCHS[1] if tiny else epochs
    return epochs, epochs2
