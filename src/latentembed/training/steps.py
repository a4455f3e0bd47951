"""One training step: a batch's texts (queries with their row's prompt and adapter, positives,
hard negatives), their embeddings in one forward, the InfoNCE loss, and the optimizer step.

Example::

    >>> from latentembed.training.data import TrainingExample
    >>> from latentembed.training.steps import hard_negatives
    >>> hard_negatives([TrainingExample("q0", "p0", ["n0"]), TrainingExample("q1", "p1")], 2)
    [['n0', 'p1'], ['p0', 'p0']]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..tokenization import pack_sequences, tokenize_with_prompts
from .data import TrainingExample
from .plan import row_task
from .state import Stage, TrainingRun

__all__ = ["text_id", "hard_negatives", "embed_texts", "batch_loss", "StepOutput", "train_step"]


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


def batch_loss(run: TrainingRun, stage: Stage, batch: Sequence[TrainingExample]) -> tuple[torch.Tensor, int]:
    """(InfoNCE loss [], tokens) of one batch of B rows: one forward over the B queries, the B
    positives and the B x k hard negatives (k = ``cfg.hard_negatives``; stage 1 borrows other
    rows' positives where a row has too few)."""
    cfg, model = run.cfg, run.model
    k, in_batch = cfg.hard_negatives, stage.plan.in_batch_negatives
    B = len(batch)
    queries, q_prefixes, q_adapters = [], [], []
    for ex in batch:
        task = row_task(ex, cfg.default_task)
        prefix, adapter = model.resolve(task, ex.instruction)
        queries.append(ex.query)
        q_prefixes.append(prefix)
        q_adapters.append(adapter)
    negs = hard_negatives(batch, k, borrow=in_batch) if k > 0 else [[] for _ in batch]
    docs = [ex.positive for ex in batch] + [n for row in negs for n in row]
    d_prefix, d_adapter = model.resolve(cfg.doc_task)
    texts = queries + docs
    emb, tokens = embed_texts(run, texts, q_prefixes + [d_prefix] * len(docs), q_adapters + [d_adapter] * len(docs))
    emb = emb.float()
    q, pos = emb[:B], emb[B : 2 * B]
    hard = emb[2 * B :].view(B, k, -1) if k > 0 else None
    doc_ids = torch.tensor([text_id(t) for t in docs], dtype=torch.int64, device=run.device)
    return stage.loss_fn(q, pos, hard_negatives=hard, doc_ids=doc_ids), tokens


@dataclass
class StepOutput:
    """What one step reports: this rank's ``loss`` (detached), the ``tokens`` it embedded and
    the learning rate ``lr`` the step used."""

    loss: torch.Tensor
    tokens: int
    lr: float


def train_step(run: TrainingRun, stage: Stage, batch: Sequence[TrainingExample]) -> StepOutput:
    """One optimizer step on ``batch``: the loss under autocast, backward (DDP averages the
    gradients), gradients clipped to ``cfg.max_grad_norm``, the optimizer step and the
    schedule's step."""
    with run.autocast():
        loss, tokens = batch_loss(run, stage, batch)
    stage.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    lr = stage.optimizer.param_groups[0]["lr"]
    stage.optimizer.step()
    stage.scheduler.step()
    return StepOutput(loss=loss.detach(), tokens=tokens, lr=lr)
