"""One training step: a batch's texts (queries with their row's prompt and adapter, positives,
hard negatives), their embeddings in one forward (or chunk by chunk: GradCache), the InfoNCE
loss, gradient accumulation over several batches, and the optimizer step.

Example::

    >>> from latentembed.training.data import TrainingExample
    >>> from latentembed.training.steps import hard_negatives
    >>> hard_negatives([TrainingExample("q0", "p0", ["n0"]), TrainingExample("q1", "p1")], 2)
    [['n0', 'p1'], ['p0', 'p0']]
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from ..modules.grad_cache import grad_cache_step
from ..modules.matryoshka import matryoshka_loss
from ..tokenization import pack_sequences, tokenize_with_prompts
from .data import TrainingExample
from .fsdp import clip_grad_norm
from .plan import row_prompt
from .state import Stage, TrainingRun

__all__ = [
    "text_id",
    "hard_negatives",
    "embed_texts",
    "BatchTexts",
    "batch_texts",
    "texts_loss",
    "batch_loss",
    "grad_cache_backward",
    "StepOutput",
    "train_step",
]


def text_id(text: str) -> int:
    """A 63-bit id of a text, equal on every rank (duplicate documents are masked by it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def hard_negatives(batch: Sequence[TrainingExample], k: int, borrow: bool = True) -> list[list[str]]:
    """k hard negatives per row: the row's own first; if short and ``borrow``, the distinct
    positives of the next rows of the batch (cyclically) that differ from the row's positive;
    then the row's negatives again, cyclically. Stage 2 does not borrow: there another row's
    positive may share the row's label (no true negative)."""
    out = []
    for i, ex in enumerate(batch):
        negs = list(dict.fromkeys(n for n in ex.negatives if n != ex.positive))[:k]
        if borrow:
            others = dict.fromkeys(batch[(i + j) % len(batch)].positive for j in range(1, len(batch)))
            negs += [t for t in others if t != ex.positive and t not in negs][: k - len(negs)]
        if not negs:
            raise ValueError(
                f"{ex.where or 'a row'}: no hard negative"
                f"{'' if not borrow else ' and its batch no other positive'} "
                f"to use (stage {'1' if borrow else '2'}): {ex.query!r:.60}"
            )
        base = list(negs)
        negs += [base[j % len(base)] for j in range(k - len(negs))]
        out.append(negs)
    return out


def embed_texts(
    run: TrainingRun, texts: Sequence[str], prefixes: Sequence[str], adapters: Sequence[Optional[str]]
) -> tuple[torch.Tensor, int]:
    """(embeddings [N, D], number of tokens) of N texts with per-text prompt prefixes and
    adapters (None: the base weights), packed into one forward through ``run.module``."""
    model = run.model
    tokenized = tokenize_with_prompts(
        model.tokenizer,
        texts,
        prefixes,
        max_length=run.cfg.max_length,
        add_eos=model.config.add_eos,
        mask_instruction=model.config.mask_instruction,
    )
    batch = pack_sequences(tokenized.input_ids, tokenized.pool_mask).to(run.device)
    tasks = None if not model.adapter_names else [a if a is not None else "base" for a in adapters]
    args, kwargs = model.batch_inputs(batch)  # called through ``module``: DDP must see the forward
    out = run.module(*args, **kwargs, tasks=tasks)
    return out, batch.num_tokens


class BatchTexts(NamedTuple):
    """The texts of one batch of B rows as one forward embeds them: the B queries, then the B
    positives, then B x k hard negatives (row by row), each with its prompt prefix and adapter
    (None: the base weights); ``doc_ids`` [B + B k] int64 ids of the documents' texts."""

    texts: list
    prefixes: list
    adapters: list
    rows: int
    k: int
    doc_ids: torch.Tensor


def batch_texts(run: TrainingRun, stage: Stage, batch: Sequence[TrainingExample]) -> BatchTexts:
    """The texts of ``batch``: queries with their row's prompt, positives, and k hard negatives
    per row (k = ``cfg.hard_negatives``; a stage with in-batch negatives borrows other rows'
    positives where a row has too few)."""
    cfg, model = run.cfg, run.model
    k = cfg.hard_negatives
    queries, q_prefixes, q_adapters = [], [], []
    for ex in batch:
        prefix, adapter = model.resolve(*row_prompt(ex, cfg.default_task, cfg.instruction))
        queries.append(ex.query)
        q_prefixes.append(prefix)
        q_adapters.append(adapter)
    negs = hard_negatives(batch, k, borrow=stage.plan.in_batch_negatives) if k > 0 else [[] for _ in batch]
    docs = [ex.positive for ex in batch] + [n for row in negs for n in row]
    d_prefix, d_adapter = model.resolve(cfg.doc_task)
    return BatchTexts(
        texts=queries + docs,
        prefixes=q_prefixes + [d_prefix] * len(docs),
        adapters=q_adapters + [d_adapter] * len(docs),
        rows=len(batch),
        k=k,
        doc_ids=torch.tensor([text_id(t) for t in docs], dtype=torch.int64, device=run.device),
    )


def texts_loss(run: TrainingRun, stage: Stage, texts: BatchTexts, q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """The InfoNCE loss [] of queries ``q`` [B, D] against ``docs`` [B + B k, D] (the positives,
    then the hard negatives row by row); with ``--matryoshka``, the weighted sum of the losses
    of the renormalised prefixes."""
    B, k = texts.rows, texts.k
    hard = docs[B:].view(B, k, -1) if k > 0 else None
    q, pos = q.float(), docs[:B].float()
    if run.cfg.matryoshka:
        return matryoshka_loss(
            stage.loss_fn,
            q,
            pos,
            dims=tuple(run.cfg.matryoshka),
            weights=tuple(run.cfg.matryoshka_weights),
            normalize=run.model.config.normalize,
            hard_negatives=hard,
            doc_ids=texts.doc_ids,
        )
    return stage.loss_fn(q, pos, hard_negatives=hard, doc_ids=texts.doc_ids)


def batch_loss(run: TrainingRun, stage: Stage, batch: Sequence[TrainingExample]) -> tuple[torch.Tensor, int]:
    """(InfoNCE loss [], tokens) of one batch of B rows: one forward over the B queries, the B
    positives and the B x k hard negatives."""
    texts = batch_texts(run, stage, batch)
    emb, tokens = embed_texts(run, texts.texts, texts.prefixes, texts.adapters)
    emb = emb.float()
    return texts_loss(run, stage, texts, emb[: texts.rows], emb[texts.rows :]), tokens


class _ChunkEncoder:
    """GradCache's encoder over one batch's texts: a chunk of text indices [c] -> embeddings
    [c, D] under the run's autocast; counts the tokens of the first (graph-free) pass. Under
    DDP it offers the wrapper's ``no_sync`` so only the last chunk's backward all-reduces."""

    def __init__(self, run: TrainingRun, texts: BatchTexts) -> None:
        self.run, self.texts, self.tokens = run, texts, 0
        # Sharded (FSDP), every chunk's backward reduce-scatters its gradients: skipping that
        # would hold whole unsharded gradients on every rank, the memory FSDP exists to save.
        if run.dist.on and not run.sharded:
            self.no_sync = run.module.no_sync

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        idx = index.tolist()
        t = self.texts
        with self.run.autocast():
            emb, tokens = embed_texts(
                self.run, [t.texts[i] for i in idx], [t.prefixes[i] for i in idx], [t.adapters[i] for i in idx]
            )
        if not torch.is_grad_enabled():
            self.tokens += tokens
        return emb.float()


def grad_cache_backward(
    run: TrainingRun, stage: Stage, batch: Sequence[TrainingExample], weight: float
) -> tuple[torch.Tensor, int]:
    """GradCache (``--grad-cache CHUNK``): the loss of ``batch`` and its gradients, times
    ``weight`` and the loss scale, accumulated into the parameters while only ``CHUNK`` texts
    hold activations at a time. Returns (loss [] unweighted, detached; tokens)."""
    texts = batch_texts(run, stage, batch)
    encoder = _ChunkEncoder(run, texts)
    losses = []

    def loss_fn(q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        with run.autocast():
            loss = texts_loss(run, stage, texts, q, docs)
        losses.append(loss.detach())
        scaled = run.scaler.scale(loss)
        return scaled * weight if weight != 1 else scaled

    index = torch.arange(len(texts.texts))
    grad_cache_step(encoder, index[: texts.rows], index[texts.rows :], loss_fn, run.cfg.grad_cache)
    return losses[0], encoder.tokens


@dataclass
class StepOutput:
    """What one step reports: this rank's ``loss`` (detached; the mean over the step's
    batches), the ``tokens`` it embedded and the learning rate ``lr`` the step used."""

    loss: torch.Tensor
    tokens: int
    lr: float


def train_step(run: TrainingRun, stage: Stage, batches: Sequence[Sequence[TrainingExample]]) -> StepOutput:
    """One optimizer step on ``batches`` (``cfg.grad_accum`` of them): for each, the loss under
    autocast and its backward (GradCache with ``cfg.grad_cache``), weighted 1 / len(batches)
    (DDP averages the gradients on the last one only); then gradients unscaled (float16),
    clipped to ``cfg.max_grad_norm``, the optimizer step and the schedule's step (float16: both
    skipped when the gradients overflowed, and the loss scale halves)."""
    n = len(batches)
    weight = 1.0 / n
    stage.optimizer.zero_grad(set_to_none=True)
    losses, tokens = [], 0
    for i, batch in enumerate(batches):
        # DDP all-reduces on the last batch only; FSDP reduce-scatters each (see _ChunkEncoder)
        sync = run.module.no_sync() if run.dist.on and not run.sharded and i < n - 1 else nullcontext()
        with sync:
            if run.cfg.grad_cache is not None:
                loss, t = grad_cache_backward(run, stage, batch, weight)
            else:
                with run.autocast():
                    loss, t = batch_loss(run, stage, batch)
                scaled = run.scaler.scale(loss)
                (scaled * weight if n > 1 else scaled).backward()
        losses.append(loss.detach())
        tokens += t
    if run.temperature is not None and run.dist.on and run.temperature.grad is not None:
        run.dist.mean(run.temperature.grad)  # not a DDP parameter: average it as DDP does the rest
    run.scaler.unscale_(stage.optimizer)
    if run.sharded:  # DTensor gradients: the norm needs the other ranks' shards
        clip_grad_norm(run.params, run.cfg.max_grad_norm)
    else:
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    lr = stage.optimizer.param_groups[0]["lr"]
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(stage.optimizer)
    run.scaler.update()
    if scale is None or run.scaler.get_scale() >= scale:
        stage.scheduler.step()  # not after a step the scaler skipped (inf / nan gradients)
    loss = losses[0] if n == 1 else torch.stack(losses).mean()
    return StepOutput(loss=loss, tokens=tokens, lr=lr)
