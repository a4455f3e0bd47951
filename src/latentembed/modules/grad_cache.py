"""GradCache: contrastive batches larger than activation memory (Gao et al., 2021).

A contrastive loss couples every query with every document, so the batch cannot be split into
independent micro-batches. GradCache splits only the encoder: (1) embed the batch chunk by chunk
without a graph, (2) compute the loss on the detached embeddings and their gradients, (3)
re-embed each chunk with a graph and backpropagate its slice of the cached gradients. Peak
activation memory is one chunk's; the cost is one extra encoder forward (about +30%).

Dropout must draw the same masks in (1) and (3), so the random state (CPU and every CUDA device)
is saved before each chunk in (1) and restored before the same chunk in (3). The parameter
gradients then equal those of embedding the same chunks with a graph in the same order; on CPU
the random streams concatenate, so they also equal a single full-batch forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["grad_cache_step", "split_inputs"]

Inputs = Union[torch.Tensor, Mapping]


def split_inputs(inputs: Inputs, chunk_size: int) -> list:
    """Split a tensor, or a mapping of tensors sharing dim 0 (tokenizer output), into chunks of
    ``chunk_size`` rows. Non-tensor mapping values are passed to every chunk unchanged."""
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(chunk_size))
    if isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)}
        if len(sizes) != 1:
            raise ValueError(f"the tensors of an input mapping must share their first dim (batch), got {sorted(sizes)}")
        n = sizes.pop()
        return [
            {k: v[i : i + chunk_size] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            for i in range(0, n, chunk_size)
        ]
    raise TypeError(f"inputs must be a tensor or a mapping of tensors, got {type(inputs).__name__}")


def _cuda_devices() -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


class _RandomState:
    """CPU and CUDA generator states, captured now and restorable later."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices()]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


def _embed(encoder: Callable, chunk) -> torch.Tensor:
    out = encoder(**chunk) if isinstance(chunk, Mapping) else encoder(chunk)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TypeError(
            "the encoder must return embeddings [b, D] as a tensor, got "
            f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; wrap it, e.g. "
            "lambda **x: model(**x).pooler_output"
        )
    return out


def grad_cache_step(
    encoder: Callable[..., torch.Tensor],
    query_inputs: Inputs,
    doc_inputs: Inputs,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    *,
    doc_encoder: Optional[Callable[..., torch.Tensor]] = None,
) -> torch.Tensor:
    """Compute ``loss_fn(encoder(queries), doc_encoder(documents))`` and backpropagate it into
    the encoders' parameters, holding the activations of only ``chunk_size`` inputs at a time.

    Args:
        encoder: an ``nn.Module`` or callable mapping a chunk of inputs to embeddings [b, D]
            (a mapping chunk is passed as keyword arguments).
        query_inputs, doc_inputs: a tensor [B, ...] / [N, ...], or a mapping of such tensors
            (e.g. ``input_ids`` and ``attention_mask``).
        loss_fn: ``(queries [B, D], documents [N, D]) -> scalar`` (e.g. an ``InfoNCELoss``).
        chunk_size: rows embedded at once.
        doc_encoder: encoder of the documents when it differs from ``encoder``.

    Returns:
        The loss (detached). Parameter ``.grad`` are accumulated as by ``loss.backward()``.
        Under DDP, wrap the encoders in DDP as usual; gradient synchronisation is skipped
        (``no_sync``) for every chunk but the last.

    Example:
        >>> enc = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1))
        >>> from latentembed.modules.contrastive import InfoNCELoss
        >>> loss = grad_cache_step(enc, torch.randn(6, 8), torch.randn(12, 8), InfoNCELoss(), 4)
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    doc_encoder = encoder if doc_encoder is None else doc_encoder
    sides = [(encoder, split_inputs(query_inputs, chunk_size)), (doc_encoder, split_inputs(doc_inputs, chunk_size))]

    # (1) embed without a graph, remembering the random state before each chunk
    cached: list[list[tuple[_RandomState, torch.Tensor]]] = []
    with torch.no_grad():
        for enc, chunks in sides:
            side = []
            for chunk in chunks:
                state = _RandomState()
                side.append((state, _embed(enc, chunk)))
            cached.append(side)

    # (2) the loss and the gradient of every embedding
    embeddings = [torch.cat([e for _, e in side]).detach().requires_grad_(True) for side in cached]
    with torch.enable_grad():
        loss = loss_fn(*embeddings)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    # backward(), not autograd.grad(): the loss's own parameters (a learnable temperature) get
    # their gradient here; the embeddings' gradients land in their .grad
    loss.backward()
    grads = [e.grad for e in embeddings]
    after_loss = _RandomState()

    # (3) re-embed each chunk with a graph under its saved random state; push its gradients
    jobs = [
        (enc, chunk, state, None if grad is None else grad[start : start + e.shape[0]])
        for (enc, chunks), side, grad in zip(sides, cached, grads)
        for chunk, (state, e), start in zip(chunks, side, _offsets(side))
    ]
    for i, (enc, chunk, state, grad) in enumerate(jobs):
        if grad is None:
            continue
        # DDP all-reduces on the backward of a module's last chunk only
        last = all(g is None or e is not enc for e, _, _, g in jobs[i + 1 :])
        sync = contextlib.nullcontext() if last or not hasattr(enc, "no_sync") else enc.no_sync()
        state.restore()
        with sync, torch.enable_grad():
            out = _embed(enc, chunk)
            if out.requires_grad:
                out.backward(grad.to(out.dtype))
    after_loss.restore()
    return loss.detach()


def _offsets(side: list[tuple[Any, torch.Tensor]]) -> list[int]:
    starts, total = [], 0
    for _, e in side:
        starts.append(total)
        total += e.shape[0]
    return starts
