"""What a training run holds while it runs: the objects every step uses (:class:`TrainingRun`),
one stage's loss, optimizer and schedule (:class:`Stage`) and the loop's position
(:class:`LoopState`).

The position, the stage's optimizer and scheduler, the model and the RNG states are what a
checkpoint must save to resume exactly; the batch order of an epoch is a pure function of
(seed, epoch, rank) (:func:`~latentembed.training.data.batch_examples`), so (stage, epoch,
batch) fixes every batch still to come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from ..models.embedding import EmbeddingModel
from ..modules.contrastive import InfoNCELoss
from .checkpoint import Checkpointer, Resume
from .config import TrainConfig
from .distributed import DistContext
from .logs import RunLog, StepMemory
from .plan import StagePlan

__all__ = ["TrainingRun", "Stage", "LoopState"]


@dataclass
class TrainingRun:
    """The objects of a run, built once by the trainer: its settings, device and ranks, the
    ``model`` and the ``module`` its forward goes through (the model, or its DDP wrapper), the
    trainable ``params``, ``full`` (every weight trains; else LoRA adapters and the pooling
    head), ``amp_dtype`` (the forward's autocast dtype, None: fp32) with ``autocast`` (a
    factory of its context) and ``scaler`` (the loss scaler, enabled for float16 only),
    ``temperature`` (the learnable ``log_scale`` every stage's loss shares, or None), ``log``
    (console, JSONL, TensorBoard, progress), ``memory`` (each step's peak), ``checkpoints``
    (None: no periodic checkpoints), ``evaluate`` (the held-out evaluation on rank 0, or None)
    and ``resume`` (the checkpoint being resumed, until its stage's optimizer is restored)."""

    cfg: TrainConfig
    device: torch.device
    dist: DistContext
    model: EmbeddingModel
    module: nn.Module
    params: list[nn.Parameter]
    full: bool
    amp_dtype: Optional[torch.dtype]
    autocast: Callable[[], ContextManager]
    scaler: torch.amp.GradScaler
    log: RunLog
    memory: StepMemory
    temperature: Optional[nn.Parameter] = None
    checkpoints: Optional[Checkpointer] = None
    evaluate: Optional[Callable[[], dict]] = None
    resume: Optional[Resume] = None
    identity: dict = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """The model is sharded across the ranks (``--fsdp`` with several ranks)."""
        return self.cfg.fsdp and self.dist.on

    def say(self, *args) -> None:
        """A console line (rank 0, unless quiet)."""
        self.log.say(*args)

    def trained_tensors(self) -> dict:
        """{name: tensor} of everything that trains (a checkpoint's weights)."""
        out = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if self.temperature is not None:
            out["loss.log_scale"] = self.temperature
        return out


@dataclass
class Stage:
    """One stage as it trains: its plan, its loss (in-batch negatives or not), and the
    optimizer and learning-rate schedule made fresh for it."""

    plan: StagePlan
    loss_fn: InfoNCELoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class LoopState:
    """Where the training loop is: ``stage`` (index into the plan), ``step`` (optimizer steps
    taken in this stage), ``global_step`` (over all stages), ``epoch`` (of this stage) and
    ``batch`` (batches of this epoch's order already taken)."""

    stage: int = 0
    step: int = 0
    global_step: int = 0
    epoch: int = 0
    batch: int = 0

    def epochs_started(self) -> int:
        """Epochs of this stage begun so far (a partly run epoch counts)."""
        return self.epoch + (self.batch > 0)

    def next_stage(self) -> None:
        """Move to the start of the next stage."""
        self.stage, self.step, self.epoch, self.batch = self.stage + 1, 0, 0, 0
