"""What a run reports while it runs: a JSONL metrics file (always, with ``--output`` or
``--log-file``), the console lines, TensorBoard (``--report-to tensorboard``), a progress bar with
ETA on a terminal, and the peak memory of each step.

The JSONL file (``DIR/train_log.jsonl``) holds one JSON object a line: ``{"event": "start", ...}``
(the run's configuration), ``{"event": "step", "stage", "step", "global_step", "epoch", "loss",
"lr", "tokens", "tokens_per_s", "step_s", "peak_mem_mib", "mem": "rss"|"cuda", ...}`` after every
optimizer step, ``{"event": "eval", "global_step", ..., "ndcg@10", ...}``, ``{"event":
"checkpoint", ...}`` and ``{"event": "resume", ...}``. A line reaches the file in one ``write``
on a file opened for appending, so a killed process leaves whole lines; a line torn by a power
cut can only be the last one, which :func:`read_log` skips and a resumed run drops (it rewrites
the file atomically, keeping the lines up to its checkpoint).

Example::

    >>> from latentembed.training.logs import read_log
    >>> losses = [e["loss"] for e in read_log("run/train_log.jsonl") if e["event"] == "step"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..atomic_io import atomic_write_bytes

__all__ = ["LOG_NAME", "read_log", "StepMemory", "Progress", "RunLog"]

#: The JSONL metrics file's name inside ``--output DIR``.
LOG_NAME = "train_log.jsonl"


def read_log(path: Union[str, os.PathLike], *, drop_torn: bool = True) -> list[dict]:
    """The events of a JSONL metrics file, in order. A last line that is not a whole JSON object
    (no line break, or cut short by a crash) is skipped with ``drop_torn``; anything else that
    is not a JSON object raises ValueError naming ``file:line``."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    events = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = i == len(lines) - 1  # no line break after it: written only in part
        try:
            event = json.loads(raw)
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if last and drop_torn:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e})") from None
        if last and drop_torn:
            break  # complete JSON but no line break: the write did not finish
        events.append(event)
    return events


def _vm_hwm_kib() -> Optional[int]:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.M)
    return int(m[1]) if m else None


class StepMemory:
    """Peak memory of one step: on CUDA ``torch.cuda.max_memory_allocated`` since
    :meth:`start`; on CPU the resident set's peak (``VmHWM``) since :meth:`start`, which resets
    it through ``/proc/self/clear_refs`` (Linux); elsewhere the process's peak so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "rss"
        self.resettable = device.type == "cuda" or self._reset_rss()

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return _vm_hwm_kib() is not None

    def start(self) -> None:
        """Start a step: reset the peak."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._reset_rss()

    def peak_mib(self) -> float:
        """The peak since :meth:`start`, MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        kib = _vm_hwm_kib() if self.resettable else None
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on stderr: steps done of the run, seconds per step and the time
    left (from the steps of this process, so a resumed run's estimate starts afresh)."""

    def __init__(self, total: int, done: int, enabled: bool, stream=None) -> None:
        self.total, self.first, self.enabled = max(total, 1), done, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.line = ""

    def update(self, done: int, stage: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        per_step = elapsed / max(done - self.first, 1)
        left = per_step * max(self.total - done, 0)
        width = 24
        filled = min(width, width * done // self.total)
        self.line = (
            f"stage {stage} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} steps, "
            f"{per_step:.2f} s/step, ETA {_clock(left)}"
        )
        self.stream.write("\r\x1b[K" + self.line)
        self.stream.flush()

    def clear(self) -> None:
        """Wipe the bar (before a console line); :meth:`redraw` puts it back."""
        if self.enabled and self.line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def redraw(self) -> None:
        if self.enabled and self.line:
            self.stream.write(self.line)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.line:
            self.stream.write("\n")
            self.stream.flush()
            self.line = ""


class RunLog:
    """The reports of rank 0 (other ranks get a silent one): console lines through ``say``, the
    JSONL file ``path`` (None: none), TensorBoard scalars into ``tensorboard_dir`` (None: none)
    and the progress bar.

    Args:
        path: the JSONL file; :meth:`open` starts it.
        say: prints a console line (rank 0, unless quiet).
        progress: a :class:`Progress` (disabled when not on a terminal).
        tensorboard_dir: where ``SummaryWriter`` writes.
        log_every: console lines every this many steps (the JSONL file gets every step).
    """

    def __init__(
        self,
        path: Optional[Path],
        say: Callable[..., None],
        progress: Progress,
        *,
        tensorboard_dir: Optional[Path] = None,
        log_every: int = 10,
    ) -> None:
        self.path, self._say, self.progress = path, say, progress
        self.tensorboard_dir, self.log_every = tensorboard_dir, log_every
        self.writer = None
        self.step_seconds: list = []  # this process's step times, for the ETA of the console lines

    def say(self, *args) -> None:
        """A console line, with the progress bar kept below it."""
        self.progress.clear()
        self._say(*args)
        self.progress.redraw()

    def open(self, header: dict, resume_step: Optional[int] = None) -> None:
        """Start the JSONL file with ``header`` (a fresh run replaces the file) or, resuming
        from ``resume_step``, keep its events up to that step, drop the rest (steps the killed
        run took after its checkpoint, and a torn last line) and append a resume event.
        TensorBoard forgets the events after ``resume_step`` the same way (``purge_step``)."""
        if self.path is not None:
            kept = []
            if resume_step is not None and self.path.is_file():
                kept = [e for e in read_log(self.path) if e.get("global_step", 0) <= resume_step]
            event = {"event": "resume" if resume_step is not None else "start", "time": time.time(), **header}
            lines = b"".join(_line(e) for e in [*kept, event])
            atomic_write_bytes(self.path, lines)
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge)

    def event(self, kind: str, **fields) -> None:
        """Append one event to the JSONL file (one ``write``: a kill leaves whole lines)."""
        if self.path is None:
            return
        data = _line({"event": kind, "time": time.time(), **fields})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it whole; a short write (disk full) continues
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def step(self, entry: dict) -> None:
        """One optimizer step's ``entry`` (stage, step, global_step, loss, lr, tokens_per_s,
        peak_mem_mib, ...): JSONL, TensorBoard, the progress bar and, every ``log_every``
        steps (and a stage's first and last), a console line."""
        self.event("step", **entry)
        if self.writer is not None:
            g = entry["global_step"]
            for key in ("loss", "lr", "tokens_per_s", "step_s", "peak_mem_mib", "temperature"):
                if key in entry:
                    self.writer.add_scalar(f"train/{key}", entry[key], g)
        self.progress.update(entry["global_step"], entry["stage"])
        self.step_seconds.append(entry.get("step_s", 0.0))
        step, stage_steps = entry["step"], entry["stage_steps"]
        if step % self.log_every == 0 or step == stage_steps or step == 1:
            temp = f" temp {entry['temperature']:.4f}" if "temperature" in entry else ""
            self.say(
                f"stage {entry['stage']} step {step:4d}/{stage_steps} loss {entry['loss']:.4f} "
                f"lr {entry['lr']:.2e}{temp} tok/s {entry['tokens_per_s']:,.0f} "
                f"{entry['step_s']:.2f} s/step mem {entry['mem']} max {entry['peak_mem_mib']:.0f} MiB "
                f"ETA {self.eta(entry['global_step'])}"
            )

    def eta(self, global_step: int) -> str:
        """Time left for the steps (``h:mm:ss``) at the mean step time so far, evaluations not
        counted; on the console lines too, since a log piped to a file has no progress bar."""
        mean = sum(self.step_seconds) / max(len(self.step_seconds), 1)
        return _clock(mean * max(self.progress.total - global_step, 0))

    def evaluation(self, global_step: int, stage: int, step: int, metrics: dict) -> None:
        """An evaluation's metrics: JSONL and TensorBoard (the console line is the caller's)."""
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.event("eval", global_step=global_step, stage=stage, step=step, **values)
        if self.writer is not None:
            for key, value in values.items():
                if "@" in key:
                    self.writer.add_scalar(f"eval/{key}", value, global_step)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _line(event: dict) -> bytes:
    return (json.dumps(event, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
