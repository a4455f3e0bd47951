"""The trainer's settings (:class:`TrainConfig`) and the checks that need neither data nor model.

Example::

    >>> from latentembed.training.config import TrainConfig, check_config
    >>> check_config(TrainConfig(dtype="float16"), model=None)
    Traceback (most recent call last):
    ValueError: dtype must be auto, float32 or bfloat16, got 'float16'
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..atomic_io import check_replaceable
from ..models.embedding_config import DEFAULT_LORA_TARGETS
from ..models.embedding_io import ArgumentError
from ..prompts import get_template

__all__ = [
    "TrainConfig",
    "DEMO_EPOCHS",
    "DEMO_LR",
    "STAGE2_LR_FACTOR",
    "TRAIN_OUTPUT_ENTRIES",
    "check_config",
    "resolve_device",
    "peak_lr",
    "autocast_for",
]

#: Defaults for the tiny random model, tuned so the no-argument demo shows clear gains on CPU in
#: well under a minute: epochs of (stage 1, stage 2) and the peak learning rate.
DEMO_EPOCHS = (6, 2)
DEMO_LR = 2e-3
#: Stage 2's peak learning rate relative to stage 1's (NV-Embed: 2e-5 then 1.5e-5).
STAGE2_LR_FACTOR = 0.5
#: What ``--output DIR`` holds; a DIR with anything else is refused (its files are not deleted).
TRAIN_OUTPUT_ENTRIES = ("model", "adapters", "train_config.json", "metrics.json")


@dataclass
class TrainConfig:
    """Everything :func:`~latentembed.training.trainer.train` needs; the CLI maps its flags onto
    these fields one to one.

    Data: ``data`` (JSONL, None = the bundled retrieval set) is stage 1; ``stage2_data`` (None =
    the bundled blended set when ``data`` is None, else no stage 2; ``"none"`` = no stage 2).
    Model: ``model`` (a directory ``EmbeddingModel.from_pretrained`` reads; ``pooling`` for a
    plain decoder) or None = a tiny random model with a tokenizer trained on the data.
    ``full``: train every weight; None = full for the tiny random model (measured on the demo:
    as good as LoRA or better and ~1.5x faster per step; rank 16 on width 64 is no low-rank
    saving), LoRA otherwise.
    Length of each stage: ``steps`` (optimizer steps) when given, else ``epochs`` (None = 1, or
    :data:`DEMO_EPOCHS` for the tiny model); ``stage2_steps`` / ``stage2_epochs`` default to the
    stage-1 values (``stage2_steps=0``: no stage 2). ``lr`` None = :data:`DEMO_LR` for the tiny
    model, 1e-4 otherwise; ``stage2_lr`` None = ``lr * STAGE2_LR_FACTOR``. ``warmup``: a
    fraction of a stage's steps (< 1) or a number of steps; then linear decay to 0, per stage.
    ``dtype``: "auto" = bf16 autocast on CUDA, fp32 on CPU. ``template``: the prompt template
    (None: the model's own; e5 for the tiny model and plain decoders). Rows without task or
    instruction take ``default_task`` (dropped when the template lacks it); documents take
    ``doc_task`` (None: no prompt; the base weights of a multi-adapter model).
    """

    data: Optional[str] = None
    stage2_data: Optional[str] = None
    model: Optional[str] = None
    pooling: Optional[str] = None
    output: Optional[str] = None
    full: Optional[bool] = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS
    epochs: Optional[int] = None
    steps: Optional[int] = None
    stage2_epochs: Optional[int] = None
    stage2_steps: Optional[int] = None
    batch_size: int = 32
    hard_negatives: int = 1
    temperature: float = 0.02
    lr: Optional[float] = None
    stage2_lr: Optional[float] = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    train_embeddings: bool = True
    warmup: float = 0.1
    max_length: int = 128
    template: Optional[str] = None
    default_task: Optional[str] = "retrieval"
    doc_task: Optional[str] = None
    eval_fraction: float = 0.2
    eval: bool = True
    seed: int = 0
    device: Optional[str] = None
    dtype: str = "auto"
    log_every: int = 10
    grad_checkpointing: bool = False
    quiet: bool = False

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (what ``train_config.json`` holds)."""
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device to train on (``cfg.device``, else cuda when available); under ``torchrun`` a
    bare ``cuda`` is this process's ``LOCAL_RANK`` GPU, made the current one."""
    if cfg.device:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise ValueError(f"device {cfg.device!r}: expected cpu, cuda or cuda:N ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: CUDA is not available on this machine")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_config(cfg: TrainConfig, model) -> None:
    """Every check of ``cfg`` that needs no data and no model (``model``: the in-memory model
    given to ``train``, or None), so that a bad value fails before anything is read or loaded.
    An ``output`` directory is checked now too: the save at the end would have to delete a
    user's files."""
    if cfg.batch_size < 2 and cfg.hard_negatives == 0:
        raise ValueError("batch_size 1 without hard negatives gives a query no negative at all")
    if not isinstance(cfg.warmup, int) and cfg.warmup >= 1 and cfg.warmup != int(cfg.warmup):
        raise ValueError(f"warmup: a fraction of the steps (< 1) or a whole number of steps, got {cfg.warmup}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.template is not None:
        get_template(cfg.template)  # an unknown name fails here, not after loading the model
    if cfg.pooling is not None and (cfg.model is None or model is not None):
        raise ArgumentError(
            "pooling",
            cfg.pooling,
            "{arg} is the pooling of a checkpoint loaded with --model; "
            "the tiny random model (no --model) and an in-memory model have their own",
        )
    if cfg.output:
        check_replaceable(cfg.output, TRAIN_OUTPUT_ENTRIES)


def peak_lr(cfg: TrainConfig, tiny: bool) -> float:
    """Stage 1's peak learning rate: ``cfg.lr``, else :data:`DEMO_LR` for the tiny model, else 1e-4."""
    return cfg.lr if cfg.lr is not None else (DEMO_LR if tiny else 1e-4)


def autocast_for(cfg: TrainConfig, device: torch.device) -> tuple[bool, Callable[[], ContextManager]]:
    """(bf16?, a factory of the forward's autocast context): bf16 autocast when ``cfg.dtype``
    says so ("auto": on CUDA), else no autocast (fp32)."""
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return use_bf16, ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext)
