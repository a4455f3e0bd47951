"""Contrastive fine-tuning of an :class:`~latentembed.models.embedding.EmbeddingModel`.

:func:`train` runs the two-stage schedule of NV-Embed: stage 1 trains on retrieval rows with
InfoNCE over in-batch and hard negatives; stage 2 on blended rows (the stage-1 training rows
plus the other tasks) with each query scored against its own positive and hard negatives only
(in another row of a classification or clustering batch a same-class text is no true negative).
Queries carry their row's prompt (task / instruction; documents get none) and run with their
task's adapter, per row. It logs loss, learning rate, tokens/s and memory, evaluates retrieval
on held-out rows before and after, and saves the model, the adapters and the metrics. Under
``torchrun`` it trains data-parallel (DDP, the loss gathers across ranks).

Example::

    >>> from latentembed.training.trainer import TrainConfig, train
    >>> result = train(TrainConfig(steps=20, output="run"))            # doctest: +SKIP
    >>> result["eval_after"]["ndcg@10"], result["model"].encode(["a query"]).shape  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..atomic_io import atomic_directory, check_replaceable
from ..models.embedding import EmbeddingModel
from ..models.embedding_config import DEFAULT_LORA_TARGETS
from ..models.embedding_io import ArgumentError
from ..modules.contrastive import InfoNCELoss
from ..prompts import get_template, resolve_prompt
from ..tokenization import TextTokenizer, pack_sequences, tokenize_with_prompts
from .data import (TrainingExample, batch_examples, bundled_examples, read_examples, repeated_rows_report,
                   retrieval_eval_set, split_examples)
from .tiny import tiny_model, train_tokenizer, vocabulary_texts

__all__ = ["TrainConfig", "train"]

#: Defaults for the tiny random model, tuned so the no-argument demo shows clear gains on CPU in
#: well under a minute: epochs of (stage 1, stage 2) and the peak learning rate.
DEMO_EPOCHS = (6, 2)
DEMO_LR = 2e-3
#: Stage 2's peak learning rate relative to stage 1's (NV-Embed: 2e-5 then 1.5e-5).
STAGE2_LR_FACTOR = 0.5


@dataclass
class TrainConfig:
    """Everything :func:`train` needs; the CLI maps its flags onto these fields one to one.

    Data: ``data`` (JSONL, None = the bundled retrieval set) is stage 1; ``stage2_data`` (None =
    the bundled blended set when ``data`` is None, else no stage 2; ``"none"`` = no stage 2).
    Model: ``model`` (a directory ``EmbeddingModel.from_pretrained`` reads; ``pooling`` for a
    plain decoder) or None = a tiny random model with a tokenizer trained on the data.
    ``full``: train every weight; None = full for the tiny random model (measured on the demo:
    as good as LoRA or better and ~1.5x faster per step; rank 16 on width 64 is no low-rank
    saving), LoRA otherwise.
    Length of each stage: ``steps`` (optimizer steps) when given, else ``epochs`` (None = 1, or
    :data:`DEMO_EPOCHS` for the tiny model); ``stage2_steps`` / ``stage2_epochs`` default to the
    stage-1 values (``stage2_steps=0``: no stage 2). ``lr`` None = :data:`DEMO_LR` for the tiny
    model, 1e-4 otherwise; ``stage2_lr`` None = ``lr * STAGE2_LR_FACTOR``. ``warmup``: a
    fraction of a stage's steps (< 1) or a number of steps; then linear decay to 0, per stage.
    ``dtype``: "auto" = bf16 autocast on CUDA, fp32 on CPU. ``template``: the prompt template
    (None: the model's own; e5 for the tiny model and plain decoders). Rows without task or
    instruction take ``default_task`` (dropped when the template lacks it); documents take
    ``doc_task`` (None: no prompt; the base weights of a multi-adapter model).
    """

    data: Optional[str] = None
    stage2_data: Optional[str] = None
    model: Optional[str] = None
    pooling: Optional[str] = None
    output: Optional[str] = None
    full: Optional[bool] = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS
    epochs: Optional[int] = None
    steps: Optional[int] = None
    stage2_epochs: Optional[int] = None
    stage2_steps: Optional[int] = None
    batch_size: int = 32
    hard_negatives: int = 1
    temperature: float = 0.02
    lr: Optional[float] = None
    stage2_lr: Optional[float] = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    train_embeddings: bool = True
    warmup: float = 0.1
    max_length: int = 128
    template: Optional[str] = None
    default_task: Optional[str] = "retrieval"
    doc_task: Optional[str] = None
    eval_fraction: float = 0.2
    eval: bool = True
    seed: int = 0
    device: Optional[str] = None
    dtype: str = "auto"
    log_every: int = 10
    grad_checkpointing: bool = False
    quiet: bool = False

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out


# -- data -----------------------------------------------------------------------------------------

def _load(path: Optional[str], bundled: str) -> tuple[list[TrainingExample], str]:
    if path is None:
        return bundled_examples(bundled), f"bundled:{bundled}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path!r} not found (expected JSONL rows with query, positive, "
                                "negatives and an optional task / instruction)")
    examples = read_examples(path)
    if not examples:
        raise ValueError(f"{path}: no rows (the file is empty or holds only blank lines); expected JSONL rows "
                         "with query, positive, negatives and an optional task / instruction")
    return examples, str(path)


def _row_task(ex: TrainingExample, default_task: Optional[str]) -> Optional[str]:
    """The task of a row's query prompt: its own, or ``default_task`` when it names neither a
    task nor an instruction."""
    return ex.task if ex.task is not None or ex.instruction is not None else default_task


def _check_prompts(examples: Sequence[TrainingExample], source: str, resolve, default_task) -> None:
    """Resolve every row's prompt once (``resolve(task, instruction)``), so an unknown task
    fails before any training."""
    for i, ex in enumerate(examples):
        task = _row_task(ex, default_task)
        try:
            resolve(task, ex.instruction)
        except ValueError as e:
            raise ValueError(f"{ex.where or source}: example {i + 1}: {e}") from None


def _check_own_negatives(rows: Sequence[TrainingExample]) -> None:
    """Stage 2 scores each query against its own hard negatives only: every row needs one
    (a negative equal to the row's positive does not count)."""
    for i, ex in enumerate(rows):
        if not any(n != ex.positive for n in ex.negatives):
            raise ValueError(f"{ex.where or f'stage-2 row {i + 1}'}: no hard negative (besides its positive), "
                             "and stage 2 (the stage-1 training rows plus --stage2-data) scores each query against "
                             "its own hard negatives only; add negatives to the row, or pass --stage2-data none")


def _text_id(text: str) -> int:
    """A 63-bit id of a text, equal on every rank (duplicate documents are masked by it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _negatives(batch: Sequence[TrainingExample], k: int, borrow: bool = True) -> list[list[str]]:
    """k hard negatives per row: the row's own first; if short and ``borrow``, the distinct
    positives of the next rows of the batch (cyclically) that differ from the row's positive;
    then the row's negatives again, cyclically. Stage 2 does not borrow: there another row's
    positive may share the row's label (no true negative)."""
    out = []
    for i, ex in enumerate(batch):
        negs = list(dict.fromkeys(n for n in ex.negatives if n != ex.positive))[:k]
        if borrow:
            others = dict.fromkeys(batch[(i + j) % len(batch)].positive for j in range(1, len(batch)))
            negs += [t for t in others if t != ex.positive and t not in negs][:k - len(negs)]
        if not negs:
            raise ValueError(f"{ex.where or 'a row'}: no hard negative"
                             f"{'' if not borrow else ' and its batch no other positive'} "
                             f"to use (stage {'1' if borrow else '2'}): {ex.query!r:.60}")
        base = list(negs)
        negs += [base[j % len(base)] for j in range(k - len(negs))]
        out.append(negs)
    return out


def _adapter_names(template, tasks: set) -> list[str]:
    """The template's adapters for the tasks in use (jina-v3 style), else one named "default"."""
    mapped = sorted({resolve_prompt(template, task=t).adapter for t in tasks if t is not None} - {None})
    return mapped or ["default"]


# -- one step -------------------------------------------------------------------------------------

def _embed(module: nn.Module, model: EmbeddingModel, texts, prefixes, adapters, cfg: TrainConfig, device):
    """Embeddings [N, D] of texts with per-row prefixes and adapters, and the number of tokens."""
    tokenized = tokenize_with_prompts(model.tokenizer, texts, prefixes, max_length=cfg.max_length,
                                      add_eos=model.config.add_eos, mask_instruction=model.config.mask_instruction)
    batch = pack_sequences(tokenized.input_ids, tokenized.pool_mask).to(device)
    tasks = None if not model.adapter_names else [a if a is not None else "base" for a in adapters]
    args, kwargs = model.batch_inputs(batch)  # called through ``module``: DDP must see the forward
    out = module(*args, **kwargs, tasks=tasks)
    return out, batch.num_tokens


def _step_loss(module, model, batch, k, in_batch, loss_fn, cfg, device):
    """InfoNCE of one batch: one forward over queries, positives and hard negatives."""
    B = len(batch)
    queries, q_prefixes, q_adapters = [], [], []
    for ex in batch:
        task = _row_task(ex, cfg.default_task)
        prefix, adapter = model.resolve(task, ex.instruction)
        queries.append(ex.query)
        q_prefixes.append(prefix)
        q_adapters.append(adapter)
    negs = _negatives(batch, k, borrow=in_batch) if k > 0 else [[] for _ in batch]
    docs = [ex.positive for ex in batch] + [n for row in negs for n in row]
    d_prefix, d_adapter = model.resolve(cfg.doc_task)
    texts = queries + docs
    emb, tokens = _embed(module, model, texts, q_prefixes + [d_prefix] * len(docs),
                         q_adapters + [d_adapter] * len(docs), cfg, device)
    emb = emb.float()
    q, pos = emb[:B], emb[B:2 * B]
    hard = emb[2 * B:].view(B, k, -1) if k > 0 else None
    doc_ids = torch.tensor([_text_id(t) for t in docs], dtype=torch.int64, device=device)
    return loss_fn(q, pos, hard_negatives=hard, doc_ids=doc_ids), tokens


# -- the loop -------------------------------------------------------------------------------------

class _Dist:
    def __init__(self, device_type: str) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Rank 0 evaluates and saves alone while the others wait in a collective: allow
            # that longer than NCCL's default 10 minutes.
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
            self.owned = True
        self.on = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def broadcast(self, obj):
        if not self.on:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def _resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise ValueError(f"device {cfg.device!r}: expected cpu, cuda or cuda:N ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: CUDA is not available on this machine")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda max {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    return f"rss max {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"


def _schedule(total: int, warmup: float):
    n_warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
    n_warm = min(max(n_warm, 0), total)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < n_warm:
            return (step + 1) / (n_warm + 1)
        return max(0.0, (total - step) / max(total - n_warm, 1))

    return factor


class _QueryPrompts:
    """An encoder for evaluate_retrieval that gives each held-out query its own row's prompt."""

    def __init__(self, model: EmbeddingModel, prompts: dict, max_length: int, doc_task: Optional[str]) -> None:
        self.model, self.prompts, self.max_length, self.doc_task = model, prompts, max_length, doc_task

    def encode(self, texts, batch_size=32, side="doc", **kwargs):
        out = [None] * len(texts)
        groups: dict = {}
        for i, t in enumerate(texts):
            groups.setdefault(self.prompts[t] if side == "query" else (self.doc_task, None), []).append(i)
        for (task, instruction), idx in groups.items():
            emb = self.model.encode([texts[i] for i in idx], task=task, instruction=instruction,
                                    batch_size=batch_size, max_length=self.max_length, **kwargs)
            for i, e in zip(idx, emb):
                out[i] = e
        return torch.stack(out)


def _evaluate(model: EmbeddingModel, held_out, cfg: TrainConfig, autocast) -> dict:
    corpus, queries, qrels = retrieval_eval_set(held_out)
    prompts = {ex.query: (_row_task(ex, cfg.default_task), ex.instruction) for ex in held_out}
    from ..evaluation import evaluate_retrieval

    with autocast:
        scores = evaluate_retrieval(_QueryPrompts(model, prompts, cfg.max_length, cfg.doc_task), corpus, queries, qrels,
                                    k_values=(1, 10), batch_size=64, query_kwargs={"side": "query"})
    return {k: v for k, v in scores.items() if k in ("ndcg@10", "mrr@10", "recall@10", "recall@1",
                                                     "num_queries", "num_docs")}


def _plan_stages(cfg: TrainConfig, train1, stage2_rows, tiny: bool, lr: float, dist: _Dist) -> list[tuple]:
    """(stage, rows, in-batch negatives?, optimizer steps, peak lr) of each stage; made, and so
    checked, before any model exists."""
    epochs = cfg.epochs if cfg.epochs is not None else DEMO_EPOCHS[0] if tiny else 1
    epochs2 = cfg.stage2_epochs if cfg.stage2_epochs is not None else DEMO_EPOCHS[1] if tiny else epochs
    lr2 = cfg.stage2_lr if cfg.stage2_lr is not None else lr * STAGE2_LR_FACTOR
    stages = [("1", train1, True, epochs, cfg.steps, lr)]
    s2_steps = cfg.stage2_steps if cfg.stage2_steps is not None else cfg.steps
    if stage2_rows and s2_steps != 0:
        if cfg.hard_negatives == 0:
            raise ValueError("stage 2 scores each query against its own hard negatives only: with "
                             "hard_negatives=0 its loss is 0; pass --hard-negatives >= 1 or --stage2-data none")
        _check_own_negatives(stage2_rows)
        stages.append(("2", stage2_rows, False, epochs2, s2_steps, lr2))
    plan = []
    for stage, rows, in_batch, n_epochs, steps, stage_lr in stages:
        per_epoch = len(batch_examples(rows, cfg.batch_size, seed=cfg.seed, epoch=0, rank=dist.rank,
                                       world_size=dist.world))
        if per_epoch == 0:
            raise ValueError(f"stage {stage}: {len(rows)} training rows, fewer than one global batch of "
                             f"--batch-size {cfg.batch_size} x {dist.world} rank(s); lower --batch-size")
        plan.append((stage, rows, in_batch, steps if steps is not None else n_epochs * per_epoch, stage_lr))
    return plan


def train(config: TrainConfig, model: Optional[EmbeddingModel] = None) -> dict:
    """Train as ``config`` says (``model``: an in-memory model to train in place instead of
    ``config.model`` / the tiny random one; it needs a tokenizer); returns
    ``{"loss_history", "eval_before", "eval_after",
    "stages", "trainable_params", "total_params", "wall_s", "model"}`` (``model``: the trained
    :class:`EmbeddingModel`; the rest is what ``metrics.json`` holds)."""
    cfg = config
    t_start = time.perf_counter()
    device = _resolve_device(cfg)
    dist = _Dist(device.type)
    say = (lambda *a: print(*a, flush=True)) if dist.rank == 0 and not cfg.quiet else (lambda *a: None)
    try:
        return _train(cfg, model, device, dist, say, t_start)
    finally:
        dist.close()


def _train(cfg: TrainConfig, model: Optional[EmbeddingModel], device, dist: _Dist, say, t_start) -> dict:
    if cfg.batch_size < 2 and cfg.hard_negatives == 0:
        raise ValueError("batch_size 1 without hard negatives gives a query no negative at all")
    if not isinstance(cfg.warmup, int) and cfg.warmup >= 1 and cfg.warmup != int(cfg.warmup):
        raise ValueError(f"warmup: a fraction of the steps (< 1) or a whole number of steps, got {cfg.warmup}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.template is not None:
        get_template(cfg.template)  # an unknown name fails here, not after loading the model
    tiny = model is None and cfg.model is None
    if cfg.pooling is not None and (cfg.model is None or model is not None):
        raise ArgumentError("pooling", cfg.pooling, "{arg} is the pooling of a checkpoint loaded with --model; "
                            "the tiny random model (no --model) and an in-memory model have their own")
    if cfg.output:  # before training, not after it: the save would have to delete a user's files
        check_replaceable(cfg.output, TRAIN_OUTPUT_ENTRIES)
    stage1, source1 = _load(cfg.data, "retrieval")
    stage2_path = cfg.stage2_data
    if stage2_path is None and cfg.data is None:
        stage2, source2 = _load(None, "blended")
    elif stage2_path is None or stage2_path == "none":
        stage2, source2 = [], None
    else:
        stage2, source2 = _load(stage2_path, "blended")
    if dist.rank == 0:
        repeats = repeated_rows_report(stage1 + stage2)
        if repeats:
            warnings.warn(f"training data: {repeats}", stacklevel=3)  # the caller of train()
    train1, held_out = split_examples(stage1, cfg.eval_fraction if cfg.eval else 0.0, seed=cfg.seed)
    stage2_rows = train1 + stage2 if stage2 else []
    lr = cfg.lr if cfg.lr is not None else (DEMO_LR if tiny else 1e-4)
    stages = _plan_stages(cfg, train1, stage2_rows, tiny, lr, dist)
    torch.manual_seed(cfg.seed)

    # The model (after every check the data allows alone; its prompt template then checks the
    # rows' tasks) and tokenizer.
    if model is not None:
        if model.tokenizer is None:
            raise ValueError("the model to train has no tokenizer")
    elif cfg.model is not None:
        path = Path(cfg.model)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {cfg.model!r}: expected a model directory with config.json "
                                    "(latentembed, NV-Embed-style or plain HF decoder checkpoint)")
        model = EmbeddingModel.from_pretrained(path, pooling=cfg.pooling)
        if model.tokenizer is None:
            raise FileNotFoundError(f"--model {cfg.model!r} has no tokenizer.json")
    if model is not None:
        # The model's own template unless told otherwise; e5 where it has none (plain decoders).
        want = cfg.template or (model.config.prompt_template if model.template.name != "none" else "e5")
        if get_template(want) != model.template:
            model.config = dataclasses.replace(model.config, prompt_template=want)
            model.template = get_template(want)
    template = model.template if model is not None else get_template(cfg.template or "e5")
    if cfg.default_task is not None and cfg.default_task not in template.tasks:
        cfg = dataclasses.replace(cfg, default_task=None)
    resolve = model.resolve if model is not None else (lambda t, i: resolve_prompt(template, task=t, instruction=i))
    if cfg.doc_task is not None:
        try:
            resolve(cfg.doc_task, None)
        except ValueError as e:
            raise ValueError(f"doc_task: {e}") from None
    _check_prompts(stage1, source1, resolve, cfg.default_task)
    _check_prompts(stage2, source2, resolve, cfg.default_task)
    if model is None:
        texts = vocabulary_texts(train1 + stage2, template)
        tok_json = dist.broadcast(train_tokenizer(texts).tokenizer.to_str() if dist.rank == 0 else None)
        from tokenizers import Tokenizer

        tokenizer = TextTokenizer(Tokenizer.from_str(tok_json), bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")
        model = tiny_model(tokenizer, template=cfg.template or "e5", max_length=cfg.max_length)
    full = tiny if cfg.full is None else cfg.full
    if not full:
        tasks = {ex.task for ex in stage1 + stage2} | {cfg.default_task, cfg.doc_task}
        if model.config.lora is None:
            model.add_adapters(_adapter_names(template, tasks), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
        # The base stays frozen; the adapters train, and so does a pooling head with weights
        # (NV-Embed trains its latent-attention block fully alongside the LoRA backbone).
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or name.startswith("pooling."))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(cfg.train_embeddings or not name.startswith("backbone.embed_tokens."))
    model.to(device)
    if cfg.grad_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter (LoRA targets matched no module?)")
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    module: nn.Module = model
    if dist.on:
        # A layer's adapters are one stacked parameter, so one adapter trains them all; only a
        # batch whose rows all run the base weights (multi-adapter models) leaves them unused.
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not full and len(model.adapter_names) > 1)
    say(f"latentembed train: {source1} ({len(train1)} train / {len(held_out)} held-out rows)"
        + (f", stage 2 {source2} (+{len(stage2)} rows)" if stage2_rows else "")
        + f"; model {'tiny random' if tiny else cfg.model or 'in memory'} "
        + f"({'full' if full else 'LoRA ' + ','.join(model.adapter_names)}: "
        f"{n_train:,} of {n_total:,} params trainable); {device}, {'bf16 autocast' if use_bf16 else 'fp32'}, "
        f"world {dist.world}, lr {lr:g}")

    result: dict = {"loss_history": [], "stages": [], "trainable_params": n_train, "total_params": n_total}
    do_eval = cfg.eval and bool(held_out)
    if cfg.eval and not held_out:
        say("no held-out rows (eval_fraction 0 or too few rows): no evaluation")
    if do_eval and dist.rank == 0:
        result["eval_before"] = _evaluate(model, held_out, cfg, autocast())
        say("eval before: " + _fmt_eval(result["eval_before"]))

    step_global = 0
    for stage, rows, in_batch, total, stage_lr in stages:
        loss_fn = InfoNCELoss(cfg.temperature, in_batch_negatives=in_batch)
        optimizer = torch.optim.AdamW(params, lr=stage_lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, cfg.warmup))
        k = cfg.hard_negatives
        module.train()
        step, epoch, tokens, t_log = 0, 0, 0, time.perf_counter()
        t_stage = t_log
        while step < total:
            for batch in batch_examples(rows, cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=dist.rank,
                                        world_size=dist.world):
                if step >= total:
                    break
                with autocast():
                    loss, n_tok = _step_loss(module, model, batch, k, in_batch, loss_fn, cfg, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1
                step_global += 1
                tokens += n_tok
                value = loss.detach()
                if dist.on:
                    dist.dist.all_reduce(value)
                    value /= dist.world
                entry = {"stage": int(stage), "step": step, "loss": float(value),
                         "lr": lr_used}
                result["loss_history"].append(entry)
                if step % cfg.log_every == 0 or step == total or step == 1:
                    elapsed = time.perf_counter() - t_log
                    say(f"stage {stage} step {step:4d}/{total} loss {entry['loss']:.4f} "
                        f"lr {lr_used:.2e} "
                        f"tok/s {tokens * dist.world / max(elapsed, 1e-9):,.0f} mem {_memory(device)}")
                    tokens, t_log = 0, time.perf_counter()
            epoch += 1
        result["stages"].append({"stage": int(stage), "rows": len(rows), "steps": total, "epochs_started": epoch,
                                 "in_batch_negatives": in_batch, "hard_negatives": k,
                                 "seconds": time.perf_counter() - t_stage})

    model.eval()
    if do_eval and dist.rank == 0:
        result["eval_after"] = _evaluate(model, held_out, cfg, autocast())
        say("eval after:  " + _fmt_eval(result["eval_after"]))
        b, a = result["eval_before"], result["eval_after"]
        say(f"held-out retrieval: nDCG@10 {b['ndcg@10']:.3f} -> {a['ndcg@10']:.3f}, "
            f"MRR@10 {b['mrr@10']:.3f} -> {a['mrr@10']:.3f}, recall@10 {b['recall@10']:.3f} -> {a['recall@10']:.3f}")
    result["wall_s"] = time.perf_counter() - t_start
    if cfg.output and dist.rank == 0:
        _save(model, cfg, result, full)
        say(f"saved to {cfg.output}: model/, {'' if full else 'adapters/, '}train_config.json, metrics.json")
    elif dist.rank == 0:
        say("(pass --output DIR to save the model)")
    if dist.on:  # nobody leaves (and destroys the group) while rank 0 still evaluates or saves
        dist.dist.barrier()
    result["model"] = model
    return result


def _fmt_eval(m: dict) -> str:
    return (f"nDCG@10 {m['ndcg@10']:.4f}  MRR@10 {m['mrr@10']:.4f}  recall@10 {m['recall@10']:.4f}  "
            f"({m['num_queries']} queries, {m['num_docs']} docs)")


#: What ``--output DIR`` holds; a DIR with anything else is refused (its files are not deleted).
TRAIN_OUTPUT_ENTRIES = ("model", "adapters", "train_config.json", "metrics.json")


def _save(model: EmbeddingModel, cfg: TrainConfig, result: dict, full: bool) -> None:
    """The run's output directory, replaced whole and all-or-nothing: a killed save leaves the
    previous run's or this run's files, never a mix, and nothing of the previous run survives."""
    metrics = {k: v for k, v in result.items() if k != "model"}
    with atomic_directory(cfg.output, owned=TRAIN_OUTPUT_ENTRIES) as tmp:
        model.save_pretrained(tmp / "model")
        if not full and model.adapter_names:
            model.save_adapters(tmp / "adapters")
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
