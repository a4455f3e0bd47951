"""Periodic checkpoints of a training run (``--save-every``, ``--keep-last``, ``--keep-best``) and
what exact resume (``--resume DIR|latest``) reads back.

A checkpoint is a directory ``OUTPUT/checkpoints/step-<global step, 8 digits>/`` written whole
and all-or-nothing (:func:`latentembed.atomic_io.atomic_directory`: a kill leaves it complete or
absent):

* ``trainer_state.json``: the loop's position (stage, step, global step, epoch, batch: the
  batches still to come are a pure function of it), the run's history so far (loss of every
  step, stage summaries, evaluations, the best one), the configuration as given and as resolved,
  fingerprints of the data files and of the frozen weights, the number of ranks;
* ``weights.safetensors``: every trained tensor (the adapters and the pooling head with LoRA,
  every weight with ``--full``; ``loss.log_scale``: a learnable temperature);
* ``optimizer.pt``: the stage's AdamW, its schedule and the fp16 loss scaler;
* ``rng.pt``: the random generators of every rank (Python, NumPy when loaded, torch CPU, every
  CUDA device), so dropout draws the same masks after a resume.

Only rank 0 writes; the others send it their generators. The newest ``keep_last`` checkpoints
stay (and the best by the evaluation metric with ``keep_best``); older ones are renamed to a
hidden ``.trash-...`` name first, so a kill in the middle of a deletion never leaves a partial
directory under a checkpoint's name.

Example::

    >>> from latentembed.training.checkpoint import list_checkpoints
    >>> [path.name for step, path in list_checkpoints("run/checkpoints")]  # doctest: +SKIP
    ['step-00000200', 'step-00000300']
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from ..atomic_io import atomic_directory, atomic_write_json, read_json, recover
from .distributed import DistContext

__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_NAME",
    "SHARDED_DIR",
    "SCHEDULE_NAME",
    "SHARDED_ENTRIES",
    "HARMLESS_CHANGES",
    "checkpoint_name",
    "list_checkpoints",
    "find_checkpoint",
    "capture_rng",
    "restore_rng",
    "file_fingerprint",
    "tensor_fingerprint",
    "config_differences",
    "Resume",
    "load_checkpoint",
    "Checkpointer",
]

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
WEIGHTS_NAME = "weights.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
#: A sharded (FSDP) checkpoint: DCP's directory of every rank's shards of the trained weights
#: and optimizer state, and the schedule and loss scale (the same on every rank) beside it.
SHARDED_DIR = "sharded"
SCHEDULE_NAME = "schedule.pt"
FORMAT, VERSION = "latentembed-train-checkpoint", 1
CHECKPOINT_ENTRIES = (STATE_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, RNG_NAME)
SHARDED_ENTRIES = (STATE_NAME, SCHEDULE_NAME, SHARDED_DIR, RNG_NAME)
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
#: Settings a resumed run may change: its length, what it logs and saves, where it runs, and
#: how a batch is computed when that gives the same gradients (GradCache, checkpointing).
HARMLESS_CHANGES = frozenset(
    {
        "steps",
        "epochs",
        "stage2_steps",
        "stage2_epochs",
        "log_every",
        "log_file",
        "report_to",
        "progress",
        "quiet",
        "save_every",
        "keep_last",
        "keep_best",
        "best_metric",
        "eval",
        "eval_every",
        "eval_data",
        "output",
        "resume",
        "device",
        "grad_cache",
        "grad_checkpointing",
        "merge_on_save",
        "export",
    }
)


def checkpoint_name(global_step: int) -> str:
    """``step-<global step, 8 digits>``: names sort in step order."""
    return f"step-{global_step:08d}"


def list_checkpoints(root: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    """(global step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / STATE_NAME).is_file():
            found.append((int(m[1]), entry))
    return sorted(found)


def find_checkpoint(resume: Optional[str], output: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume`` names: a directory, or ``"latest"``: the newest under
    ``output/checkpoints`` (None when there is none yet: the run starts from the beginning)."""
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume)
    found = list_checkpoints(Path(output) / CHECKPOINTS_DIR)
    return found[-1][1] if found else None


# -- random generators ------------------------------------------------------------------------------


def capture_rng() -> dict:
    """This process's random generators: Python's, NumPy's (when loaded), torch's CPU one and
    every initialised CUDA device's."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what :func:`capture_rng` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- fingerprints and the configuration check ---------------------------------------------------


def file_fingerprint(path: Optional[str]) -> Optional[str]:
    """sha256 of a data file's bytes (None for None, ``"none"`` and the bundled sets)."""
    if path is None or path == "none" or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_fingerprint(tensors) -> str:
    """A fingerprint of (name, floating tensor) pairs: names, shapes, dtypes, and the float64
    sum and 2-norm of the values (cheap: one pass over the weights, no copy, two host reads a
    tensor)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, t in tensors:
            total = t.sum(dtype=torch.float64).item()
            norm = torch.linalg.vector_norm(t, dtype=torch.float64).item()
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}{total:.17g}{norm:.17g}".encode())
    return digest.hexdigest()[:32]


def config_differences(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): one line per setting that differs between a checkpoint's run and
    this one; allowed are :data:`HARMLESS_CHANGES`, refused the rest."""
    refused, allowed = [], []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a or []), list(b or [])
        if a != b:
            line = f"{key}: {a!r} in the checkpoint, {b!r} now"
            (allowed if key in HARMLESS_CHANGES else refused).append(line)
    return refused, allowed


# -- reading -----------------------------------------------------------------------------------------


@dataclass
class Resume:
    """A checkpoint read back: its ``path``, ``state`` (trainer_state.json), trained
    ``weights`` {name: tensor}, ``optimizer`` ({"optimizer", "scheduler", "scaler"} state
    dicts) and this rank's ``rng`` (:func:`capture_rng`'s dict; None when the checkpoint was
    written by fewer ranks). ``sharded``: written by an FSDP run: ``weights`` is empty and
    ``optimizer`` lacks "optimizer" (both are read from ``sharded/`` by every rank)."""

    path: Path
    state: dict
    weights: dict
    optimizer: dict
    rng: Optional[dict]
    sharded: bool = False


def read_state(path: Path) -> dict:
    """trainer_state.json of checkpoint ``path``, its format checked."""
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"checkpoint {path}: no {STATE_NAME} here (under torchrun, --output must be on a file system "
            "every rank sees: rank 0 writes the checkpoints, every rank reads them)"
        )
    state = read_json(path / STATE_NAME)
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(
            f"{path / STATE_NAME}: expected format {FORMAT!r} version {VERSION}, "
            f"got {state.get('format')!r} version {state.get('version')!r}"
        )
    return state


def load_checkpoint(path: Path, rank: int, device: torch.device) -> Resume:
    """Read checkpoint ``path`` for rank ``rank`` (tensors onto ``device``)."""
    state = read_state(path)
    sharded = (path / SHARDED_DIR).is_dir()
    entries = SHARDED_ENTRIES if sharded else CHECKPOINT_ENTRIES
    missing = [n for n in entries if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} lacks {missing}")
    if sharded:
        weights = {}
        optimizer = torch.load(path / SCHEDULE_NAME, map_location=device, weights_only=True)
    else:
        weights = load_file(str(path / WEIGHTS_NAME), device=str(device))
        optimizer = torch.load(path / OPTIMIZER_NAME, map_location=device, weights_only=True)
    rngs = torch.load(path / RNG_NAME, map_location="cpu", weights_only=True)
    if len(rngs) <= rank and not sharded:
        raise ValueError(f"checkpoint {path} holds the generators of {len(rngs)} rank(s); this is rank {rank}")
    rng = rngs[rank] if rank < len(rngs) else None  # a sharded run resumed on more ranks
    return Resume(path=path, state=state, weights=weights, optimizer=optimizer, rng=rng, sharded=sharded)


# -- writing ----------------------------------------------------------------------------------------


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Checkpointer:
    """Writes the checkpoints of a run into ``root`` (``OUTPUT/checkpoints``) and keeps the
    newest ``keep_last`` (None: all) plus, with ``keep_best``, the best one by
    ``result["best"]``. Every rank calls :meth:`save`; rank 0 writes."""

    def __init__(
        self,
        root: Path,
        dist: DistContext,
        *,
        keep_last: Optional[int],
        keep_best: bool,
    ) -> None:
        self.root, self.dist, self.keep_last, self.keep_best = root, dist, keep_last, keep_best
        if dist.rank == 0:
            self.clean_leftovers()

    def clean_leftovers(self) -> None:
        """Finish what killed saves and deletions left: their temporary siblings and trash."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith((".trash-", ".staging-")):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                m = re.match(r"^\.(step-\d{8,})\.(tmp|old)-", entry.name)
                if m:
                    recover(self.root / m[1])

    def save(self, payload: dict, trained: dict, optimizer: dict, *, sharded: Optional[dict] = None) -> Optional[Path]:
        """Write one checkpoint: ``payload`` (trainer_state.json; its ``loop.global_step``
        names the directory), ``trained`` {name: tensor} and ``optimizer`` (state dicts).
        ``sharded``: an FSDP run's DCP state ({"model", "optim"}: this rank's shards), written
        by every rank into ``sharded/`` in place of ``trained`` and the optimizer's own state
        (``optimizer`` then holds the schedule and loss scale only). Collective: every rank
        calls it (their generators go into ``rng.pt``)."""
        rngs = self.dist.gather_objects(capture_rng())
        name = checkpoint_name(payload["loop"]["global_step"])
        staging = self.root / f".staging-{name}"
        if sharded is not None:
            import torch.distributed.checkpoint as dcp

            if self.dist.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.dist.barrier()
            dcp.save(sharded, checkpoint_id=str(staging))  # collective: every rank its shards
            self.dist.barrier()
        path = None
        if self.dist.rank == 0:
            path = self.root / name
            state = {"format": FORMAT, "version": VERSION, **payload}
            entries = CHECKPOINT_ENTRIES if sharded is None else SHARDED_ENTRIES
            with atomic_directory(path, owned=entries) as tmp:
                (tmp / STATE_NAME).write_text(json.dumps(state, indent=1, allow_nan=True) + "\n")
                if sharded is None:
                    tensors = {k: v.detach().contiguous().cpu() for k, v in trained.items()}
                    save_file(tensors, str(tmp / WEIGHTS_NAME))
                    (tmp / OPTIMIZER_NAME).write_bytes(_torch_bytes(optimizer))
                else:
                    (tmp / SCHEDULE_NAME).write_bytes(_torch_bytes(optimizer))
                    os.rename(staging, tmp / SHARDED_DIR)  # fsynced with the rest before the swap
                (tmp / RNG_NAME).write_bytes(_torch_bytes(rngs))
            self.retain(payload["result"].get("best"))
        self.dist.barrier()
        return path

    def retain(self, best: Optional[dict]) -> None:
        """Delete the checkpoints beyond the newest ``keep_last`` (never the best one with
        ``keep_best``); each is renamed to ``.trash-<name>`` and then removed."""
        found = list_checkpoints(self.root)
        keep = {step for step, _ in found[-self.keep_last :]} if self.keep_last else {step for step, _ in found}
        if self.keep_best and best is not None:
            keep.add(best["global_step"])
            atomic_write_json(self.root / "best.json", {**best, "checkpoint": checkpoint_name(best["global_step"])})
        for step, path in found:
            if step not in keep:
                trash = self.root / f".trash-{path.name}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
