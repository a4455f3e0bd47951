"""What ``train --output DIR`` saves: ``model/`` (``EmbeddingModel.from_pretrained`` reads
it), ``adapters/`` (PEFT directories, LoRA runs only), ``train_config.json`` and
``metrics.json`` (:data:`~.config.TRAIN_OUTPUT_ENTRIES`), replaced whole and all-or-nothing.

Example::

    >>> from latentembed.training.output import save_output
    >>> save_output(model, TrainConfig(output="run"), result, full=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json

from ..atomic_io import atomic_directory
from ..models.embedding import EmbeddingModel
from .config import TRAIN_OUTPUT_ENTRIES, TrainConfig

__all__ = ["save_output"]


def save_output(model: EmbeddingModel, cfg: TrainConfig, result: dict, full: bool) -> None:
    """Save the run to ``cfg.output``, replaced whole and all-or-nothing: a killed save leaves
    the previous run's or this run's files, never a mix, and nothing of the previous run
    survives. ``result``: what :func:`~.trainer.train` returns (its ``"model"`` entry is not
    saved in ``metrics.json``); ``full``: no ``adapters/`` (every weight trained)."""
    metrics = {k: v for k, v in result.items() if k != "model"}
    with atomic_directory(cfg.output, owned=TRAIN_OUTPUT_ENTRIES) as tmp:
        model.save_pretrained(tmp / "model")
        if not full and model.adapter_names:
            model.save_adapters(tmp / "adapters")
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
