"""Sharded checkpoints of an FSDP run (``train --fsdp``) with ``torch.distributed.checkpoint``
(DCP), and their export to one ``save_pretrained`` directory.

Under FSDP no rank holds the whole model, so every rank writes its own shards of the trained
weights and of the optimizer state (``sharded/``, DCP's format: one file per rank and a
``.metadata`` index); rank 0 adds what is the same everywhere. A checkpoint directory
``step-<N>/`` then holds ``trainer_state.json``, ``rng.pt`` (as the unsharded checkpoints do),
``schedule.pt`` (the learning-rate schedule and the fp16 loss scale) and ``sharded/``.

Atomic as the unsharded checkpoints (:meth:`~.checkpoint.Checkpointer.save` writes both): the
ranks write into a hidden staging directory; rank 0 then builds the checkpoint in a temporary
sibling, moves the staging directory into it and swaps it in
(:func:`latentembed.atomic_io.atomic_directory`). A kill leaves the checkpoint complete or absent
(the staging leftovers are removed by the next run).

DCP stores every tensor with its global shape and each shard's offsets, so a checkpoint loads
on any number of ranks: resuming 2 -> 4 or 4 -> 2 ranks reshards on read (the trainer allows
it when the global batch, ranks x batch size, is unchanged). :func:`export_checkpoint` reads one
in a single process (no process group) into a plain model and saves it with
``save_pretrained``.

Example::

    >>> export_checkpoint("run/checkpoints/step-00000200", "exported/")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..models.embedding import EmbeddingModel
from .checkpoint import SHARDED_DIR, read_state

__all__ = ["is_sharded_checkpoint", "sharded_state", "load_sharded", "export_checkpoint"]

_MODEL = "model."  # the trained module's name inside the state (see _Trained)


class _Trained(nn.Module):
    """The model and the run's learnable temperature under one root, so DCP's state-dict helpers
    name every parameter the optimizer holds (``model.*``, ``log_scale``)."""

    def __init__(self, model: nn.Module, temperature: Optional[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        if temperature is not None:
            self.log_scale = temperature


def _options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Not strict: with trainable_only the frozen base is absent on purpose; a trained tensor
    # missing from the checkpoint still fails, in dcp.load (its planner refuses missing keys).
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=False)


def is_sharded_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """Whether checkpoint ``path`` was written by an FSDP run (holds ``sharded/``)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def sharded_state(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    temperature: Optional[nn.Parameter] = None,
    *,
    trainable_only: bool,
) -> dict:
    """``{"model": ..., "optim": ...}``: this rank's shards (DTensors) of the weights (only
    those that train with ``trainable_only``: LoRA leaves the base to ``--model``) and of the
    optimizer state, keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root, options = _Trained(model, temperature), _options(trainable_only)
    state = {"model": get_model_state_dict(root, options=options)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(root, optimizer, options=options)
    return state


def load_sharded(
    path: Path,
    model: nn.Module,
    temperature: Optional[nn.Parameter] = None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainable_only: bool,
) -> None:
    """Put checkpoint ``path``'s weights (and with ``optimizer`` its state) into this run's
    shards, whatever the number of ranks that wrote it. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    root, options = _Trained(model, temperature), _options(trainable_only)
    state = sharded_state(model, optimizer, temperature, trainable_only=trainable_only)
    if optimizer is not None:
        state = {"optim": state["optim"]}  # the weights were loaded when the run resumed
    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
    if optimizer is None:
        set_model_state_dict(root, state["model"], options=options)
    else:
        set_optimizer_state_dict(root, optimizer, state["optim"], options=options)


def export_checkpoint(
    checkpoint: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    model: Optional[EmbeddingModel] = None,
) -> Path:
    """Save the model of sharded checkpoint ``checkpoint`` as one ``save_pretrained``
    directory ``output`` (one process, no process group; every tensor is read whole).

    ``model``: the model the run started from, as the trainer built it (adapters added for a
    LoRA run); default: the run's ``--model`` directory loaded with the run's pooling and
    attention, with the run's LoRA adapters added. The tiny random model (no ``--model``)
    needs ``model``. Returns ``output``.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = Path(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise ValueError(f"checkpoint {checkpoint}: no {SHARDED_DIR}/ here (not written by a train --fsdp run)")
    state = read_state(checkpoint)
    resolved = state["resolved"]
    if model is None:
        model = _initial_model(resolved, state.get("adapters") or [], checkpoint)
    tmp = checkpoint / f".export-{os.getpid()}.pt"
    try:
        dcp_to_torch_save(str(checkpoint / SHARDED_DIR), str(tmp))
        saved = torch.load(tmp, map_location="cpu", weights_only=True)
    finally:
        tmp.unlink(missing_ok=True)
    weights = {k[len(_MODEL) :]: v for k, v in saved["model"].items() if k.startswith(_MODEL)}
    own = dict(model.named_parameters())
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not fit the model: unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
    return model.save_pretrained(output)


def _initial_model(resolved: dict, adapters: list, checkpoint: Path) -> EmbeddingModel:
    """The run's starting model rebuilt from its recorded settings."""
    if not resolved.get("model"):
        raise ValueError(
            f"checkpoint {checkpoint}: the run trained the tiny random model (no --model); pass model= "
            "(the model it started from)"
        )
    model = EmbeddingModel.from_pretrained(resolved["model"], pooling=resolved["pooling"], causal=resolved["causal"])
    if resolved.get("template") and model.config.prompt_template != resolved["template"]:
        import dataclasses

        from ..prompts import get_template

        model.config = dataclasses.replace(model.config, prompt_template=resolved["template"])
        model.template = get_template(resolved["template"])
    if not resolved["full"] and model.config.lora is None:
        model.add_adapters(
            adapters or ["default"],
            rank=resolved["lora_rank"],
            alpha=resolved["lora_alpha"],
            dropout=resolved["lora_dropout"],
            target_modules=list(resolved["lora_targets"]),
        )
    return model
