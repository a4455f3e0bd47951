"""What ``train --output DIR`` saves at the end: ``model/`` (``EmbeddingModel.from_pretrained``
reads it), ``adapters/`` (PEFT directories, LoRA runs only), ``train_config.json`` and
``metrics.json`` (:data:`~.config.TRAIN_OUTPUT_ENTRIES`), replaced whole and all-or-nothing.
What the run wrote while it ran (:data:`~.config.LIVE_OUTPUT_ENTRIES`: ``train_log.jsonl``,
``checkpoints/``, ``tensorboard/``) is kept: hard-linked into the new directory (no copy) before
it replaces the old one.

With ``--export sentence-transformers`` the model is also written as ``sentence-transformers/``
(the classic layout: :mod:`~latentembed.models.st_export`), its adapter merged; a multi-adapter
model gets ``sentence-transformers/<adapter>/``, one directory per adapter.

With ``--merge-on-save`` the single LoRA adapter is folded into the weights of ``model/``
(a plain model: no adapter work per call); ``adapters/`` still holds it as PEFT files. A
multi-adapter model keeps its routing (one merged weight cannot serve several adapters).

Example::

    >>> from latentembed.training.output import save_output
    >>> save_output(model, TrainConfig(output="run"), result, full=True)  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..atomic_io import atomic_directory
from ..models.embedding import EmbeddingModel
from ..models.st_export import ST_FORMAT, save_sentence_transformers_per_adapter
from .config import LIVE_OUTPUT_ENTRIES, OUTPUT_LEFTOVERS, TRAIN_OUTPUT_ENTRIES, TrainConfig

__all__ = ["save_output", "link_tree"]


def link_tree(src: Path, dst: Path) -> None:
    """Recreate file or directory ``src`` at ``dst`` with hard links to its files (copies where
    the file system has no hard links)."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        for entry in src.iterdir():
            link_tree(entry, dst / entry.name)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copy2(src, dst, follow_symlinks=False)


def save_output(
    model: EmbeddingModel, cfg: TrainConfig, result: dict, full: bool, *, config: Optional[dict] = None
) -> Optional[str]:
    """Save the run to ``cfg.output``, replaced whole and all-or-nothing: a killed save leaves
    the previous run's or this run's files, never a mix, and nothing of the previous run
    survives but the entries this run wrote while it ran. ``result``: what
    :func:`~.trainer.train` returns (its ``"model"`` entry is not saved in ``metrics.json``);
    ``full``: no ``adapters/`` (every weight trained); ``config``: what ``train_config.json``
    holds (default ``cfg.to_dict()``; the trainer passes the resolved settings).

    Returns None, or why ``cfg.merge_on_save`` did not merge (several adapters). With a merge,
    ``model`` stays merged (:meth:`EmbeddingModel.unmerge_adapters` undoes it)."""
    metrics = {k: v for k, v in result.items() if k != "model"}
    output = Path(os.path.realpath(cfg.output))
    not_merged = None
    with atomic_directory(output, owned=TRAIN_OUTPUT_ENTRIES + LIVE_OUTPUT_ENTRIES + OUTPUT_LEFTOVERS) as tmp:
        for name in LIVE_OUTPUT_ENTRIES:
            if os.path.lexists(output / name):
                link_tree(output / name, tmp / name)
        if not full and model.adapter_names:
            model.save_adapters(tmp / "adapters")
        if cfg.export == ST_FORMAT and len(model.adapter_names) > 1:
            save_sentence_transformers_per_adapter(model, tmp / ST_FORMAT)  # one folder per adapter
        elif cfg.export == ST_FORMAT:
            model.save_pretrained(tmp / ST_FORMAT, format=ST_FORMAT)
        if cfg.merge_on_save and len(model.adapter_names) == 1:
            model.merge_adapters()
        elif cfg.merge_on_save:
            not_merged = (
                f"--merge-on-save: the model has {len(model.adapter_names)} adapters "
                f"{list(model.adapter_names)}; one merged weight cannot serve them all, so model/ keeps them "
                "(routed per task)"
            )
        model.save_pretrained(tmp / "model")
        (tmp / "train_config.json").write_text(json.dumps(config or cfg.to_dict(), indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return not_merged
