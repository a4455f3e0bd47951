"""The settings a run records (resolved: no "default" left) and what resuming checks against a
checkpoint before it trusts it.

:func:`resolve_before_model` fills in what the arguments and data decide (full or LoRA, learning
rates, epochs, held-out fraction, autocast dtype), :func:`resolve_with_model` what the model
decides (template, pooling, causal attention, default task): the result is what
``train_config.json`` and every checkpoint record, and ``TrainConfig(**it)`` runs the same recipe.

Resuming (``--resume``) compares, before the model is loaded, the checkpoint's settings with
this run's (:func:`~.checkpoint.config_differences`: a changed model, data file, batch size,
learning rate... is refused with the list of differences; more steps, another log interval or
checkpoint interval are allowed and said), the data files' contents and the number of ranks;
after loading, the settings the model decides and a fingerprint of the frozen weights.

Example::

    >>> from latentembed.training.resume import resolve_before_model
    >>> resolve_before_model(TrainConfig(), tiny=True, device=torch.device("cpu")).lr  # doctest: +SKIP
    0.002
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from ..models.embedding import EmbeddingModel
from ..prompts import PromptTemplate
from .checkpoint import (
    CHECKPOINTS_DIR,
    config_differences,
    file_fingerprint,
    list_checkpoints,
    read_state,
    tensor_fingerprint,
)
from .config import STAGE2_LR_FACTOR, TrainConfig, amp_dtype, eval_fraction, peak_lr
from .plan import stage_epochs

__all__ = [
    "resolve_before_model",
    "resolve_with_model",
    "data_fingerprints",
    "frozen_fingerprint",
    "check_fresh_output",
    "check_resume_before_model",
    "check_resume_with_model",
    "checkpoint_identity",
]

_DTYPE_NAMES = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_before_model(cfg: TrainConfig, *, tiny: bool, device: torch.device) -> TrainConfig:
    """``cfg`` with the defaults the arguments decide filled in: ``full``, ``lr``,
    ``stage2_lr``, ``epochs`` / ``stage2_epochs`` (when the stage's length is in epochs),
    ``eval_fraction`` and ``dtype`` (auto -> the autocast dtype on ``device``)."""
    lr = peak_lr(cfg, tiny)
    epochs, epochs2 = stage_epochs(cfg, tiny)
    s2_steps = cfg.stage2_steps if cfg.stage2_steps is not None else cfg.steps
    return dataclasses.replace(
        cfg,
        full=tiny if cfg.full is None else cfg.full,
        lr=lr,
        stage2_lr=cfg.stage2_lr if cfg.stage2_lr is not None else lr * STAGE2_LR_FACTOR,
        epochs=epochs if cfg.steps is None else cfg.epochs,
        stage2_epochs=epochs2 if s2_steps is None else cfg.stage2_epochs,
        eval_fraction=eval_fraction(cfg),
        dtype=_DTYPE_NAMES[amp_dtype(cfg, device)],
    )


def resolve_with_model(resolved: TrainConfig, model: EmbeddingModel, template: PromptTemplate, cfg: TrainConfig):
    """``resolved`` with what the model decides: its template, pooling, attention (causal or
    not) and the default task (None when the template lacks it; ``cfg`` after
    :func:`~.model_setup.choose_template`)."""
    return dataclasses.replace(
        resolved,
        template=template.name,
        pooling=model.config.pooling,
        causal=bool(model.config.causal),
        default_task=cfg.default_task,
    )


def data_fingerprints(cfg: TrainConfig) -> dict:
    """sha256 of each data file (None: a bundled set or none)."""
    return {"data": file_fingerprint(cfg.data), "stage2_data": file_fingerprint(cfg.stage2_data)}


def frozen_fingerprint(model: EmbeddingModel) -> str:
    """A fingerprint of the weights that do not train (the base under LoRA; buffers), which a
    checkpoint does not hold: resuming on another base is refused."""
    tensors = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    return tensor_fingerprint(tensors + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()])


def check_fresh_output(cfg: TrainConfig) -> None:
    """A run that does not resume may not write its checkpoints among an earlier run's:
    ``--resume latest`` continues that run, another ``--output`` starts a new one."""
    if not cfg.output:
        return
    found = list_checkpoints(Path(cfg.output) / CHECKPOINTS_DIR)
    if found:
        raise ValueError(
            f"--output {cfg.output} holds {len(found)} checkpoint(s) of an earlier run (newest {found[-1][1].name}): "
            "pass --resume latest to continue it, or another --output (or delete its checkpoints/) to start over"
        )


def _refuse(path: Path, refused: list) -> None:
    raise ValueError(
        f"--resume {path}: this run differs from the checkpoint's in what decides the result:\n  "
        + "\n  ".join(refused)
        + "\nresume with the checkpoint's settings, or start a new run in another --output"
    )


def check_resume_before_model(
    path: Path,
    resolved: TrainConfig,
    fingerprints: dict,
    world: int,
    say: Callable[..., None],
    *,
    sharded: bool = False,
) -> dict:
    """Compare checkpoint ``path`` with this run before any model is loaded: settings
    (``resolved`` as far as the arguments go), data files, ranks. Raises ValueError listing
    every difference that would make the result meaningless; says the harmless ones.
    ``sharded`` (``--fsdp``): another number of ranks (several, on both sides) is allowed when
    the global batch (ranks x ``batch_size``) is the same: the global batches are then the
    same rows (:func:`~.data.batch_examples`) and DCP reshards the checkpoint on load.
    Returns the checkpoint's trainer_state.json."""
    saved = read_state(path)
    before_model = ("template", "pooling", "causal", "default_task")
    theirs = {k: v for k, v in saved["resolved"].items() if k not in before_model}
    mine = {k: v for k, v in resolved.to_dict().items() if k not in before_model}
    refused, allowed = config_differences(theirs, mine)
    for name, digest in fingerprints.items():
        if saved["fingerprints"].get(name) != digest:
            refused.append(f"{name}: the file's content differs from the checkpoint's run (sha256)")
    theirs_global = saved["world_size"] * saved["resolved"]["batch_size"]
    reshard = (
        sharded
        and saved["resolved"].get("fsdp")
        and min(saved["world_size"], world) > 1
        and theirs_global == world * resolved.batch_size
    )
    if reshard and saved["world_size"] != world:
        refused = [line for line in refused if not line.startswith("batch_size:")]
        allowed.append(
            f"ranks: {saved['world_size']} in the checkpoint, {world} now, with the same global batch of "
            f"{theirs_global} rows (the sharded checkpoint is resharded)"
        )
    elif saved["world_size"] != world:
        refused.append(
            f"ranks: {saved['world_size']} in the checkpoint, {world} now (each rank's batches depend on the count)"
        )
    if refused:
        _refuse(path, refused)
    if allowed:
        say(f"resuming {path} with changed settings that keep it meaningful: " + "; ".join(allowed))
    return saved


def check_resume_with_model(path: Path, saved: dict, resolved: TrainConfig, frozen: str) -> None:
    """The checks that need the model: what it decides (template, pooling, attention) and
    its frozen weights."""
    refused, _ = config_differences(
        {k: saved["resolved"].get(k) for k in ("template", "pooling", "causal", "default_task")},
        {k: getattr(resolved, k) for k in ("template", "pooling", "causal", "default_task")},
    )
    if saved["fingerprints"].get("frozen") != frozen:
        refused.append("frozen weights: the model's weights that do not train differ from the checkpoint's run")
    if refused:
        _refuse(path, refused)


def checkpoint_identity(cfg: TrainConfig, resolved: TrainConfig, fingerprints: dict, world: int) -> dict:
    """What every checkpoint records about the run besides its position and history."""
    return {
        "config": cfg.to_dict(),
        "resolved": resolved.to_dict(),
        "fingerprints": fingerprints,
        "world_size": world,
    }
