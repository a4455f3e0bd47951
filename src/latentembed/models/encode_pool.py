"""Encoding a large corpus with several processes, one per device (``encode(..., devices=[...])``
or an :class:`EncodePool` kept open across calls).

Each worker process holds the model on its device (sent once when the pool starts: CPU tensors
travel through shared memory) and encodes chunks of the texts taken from a shared queue, so a
fast device takes more chunks; the results are put back in input order. Processes start with
``spawn`` (CUDA cannot be used in a forked child), which costs an import of torch per worker:
worth it for a corpus, not for a few texts. On CPU each worker gets an equal share of the cores
as threads.

Example::

    >>> with EncodePool(model, ["cuda:0", "cuda:1"]) as pool:          # doctest: +SKIP
    ...     embeddings = pool.encode(corpus, batch_size=64)             # [N, D], input order
    >>> model.encode(corpus, devices=["cpu", "cpu"])                    # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import queue
from typing import Optional, Sequence

import torch

__all__ = ["EncodePool"]

_STOP = None


def _worker(model, device: str, threads: Optional[int], tasks, results) -> None:
    """A worker's loop: (task id, texts, encode kwargs) in, (task id, [n, D] CPU tensor or
    the error's text) out, until told to stop."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = model.to(device)
    except Exception as e:  # an unusable device: every chunk reports it
        failure = f"{type(e).__name__}: {e}"
        model = None
    while True:
        task = tasks.get()
        if task is _STOP:
            return
        chunk, texts, kwargs = task
        if model is None:
            results.put((chunk, failure))
            continue
        try:
            results.put((chunk, model.encode(texts, **kwargs).cpu()))
        except Exception as e:  # sent back: the caller raises it
            results.put((chunk, f"{type(e).__name__}: {e}"))


class EncodePool:
    """Worker processes encoding with ``model``, one per entry of ``devices`` (``"cpu"`` may
    repeat: several CPU processes). Use as a context manager, or call :meth:`close`.

    Args:
        model: an :class:`~latentembed.models.embedding.EmbeddingModel` with a tokenizer.
        devices: e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu", "cpu"]`` (at least one).
        threads: intra-op threads per CPU worker (default: the cores split evenly).
    """

    def __init__(self, model, devices: Sequence[str], *, threads: Optional[int] = None) -> None:
        devices = list(devices)
        if not devices or not all(isinstance(d, str) and d for d in devices):
            raise ValueError(
                f"devices: expected a non-empty list of device names such as 'cpu' or 'cuda:0', got {devices!r}"
            )
        for name in devices:
            try:
                device = torch.device(name)
            except RuntimeError as e:
                raise ValueError(f"devices: {name!r} is not a device ({e})") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"devices: {name!r} needs CUDA, which is not available on this machine")
        if model.tokenizer is None:
            raise ValueError("model: has no tokenizer (encode needs one)")
        import torch.multiprocessing as mp

        cpu_workers = sum(torch.device(d).type == "cpu" for d in devices)
        if threads is None and cpu_workers:
            threads = max(1, (os.cpu_count() or 1) // cpu_workers)
        context = mp.get_context("spawn")
        self.tasks, self.results = context.Queue(), context.Queue()
        # CPU tensors reach the workers through shared memory; a model on a GPU is copied to the
        # CPU first (temporarily), so the caller's model stays where it is.
        shared = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
        self.width = model.backbone.config.hidden_size
        self.processes = [
            context.Process(
                target=_worker,
                args=(shared, d, threads if torch.device(d).type == "cpu" else None, self.tasks, self.results),
                daemon=True,
            )
            for d in devices
        ]
        for p in self.processes:
            p.start()
        self.calls = 0

    def encode(self, texts: Sequence[str], *, chunk_size: Optional[int] = None, **kwargs) -> torch.Tensor:
        """``model.encode(texts, **kwargs)`` split across the workers: [N, D] float32 on the CPU,
        in input order. ``chunk_size``: texts per task (default: enough for 4 tasks a worker)."""
        texts = list(texts)
        if kwargs.get("convert_to", "torch") != "torch":
            raise ValueError("convert_to: EncodePool.encode returns a torch tensor; convert it afterwards")
        n = len(self.processes)
        size = chunk_size or max(1, -(-len(texts) // (4 * n)))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        self.calls += 1
        for i, chunk in enumerate(chunks):
            self.tasks.put(((self.calls, i), chunk, kwargs))
        out: list = [None] * len(chunks)
        errors = []
        done = 0
        while done < len(chunks):  # every chunk of this call, even after an error: none is left queued
            try:
                (call, i), value = self.results.get(timeout=5)
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"an encode worker died (exit codes {dead})") from None
                continue
            if call != self.calls:  # left by an interrupted earlier call
                continue
            done += 1
            if isinstance(value, str):
                errors.append(f"chunk {i}: {value}")
            out[i] = value
        if errors:
            raise RuntimeError("encode worker failed on " + "; ".join(errors[:3]))
        if not out:
            return torch.empty(0, kwargs.get("dim") or self.width)
        return torch.cat(out)

    def close(self) -> None:
        """Stop the workers and wait for them."""
        for _ in self.processes:
            self.tasks.put(_STOP)
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self.processes = []

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
