"""Contrastive fine-tuning of an :class:`~latentembed.models.embedding.EmbeddingModel`.

:func:`train` runs the two-stage schedule of NV-Embed: stage 1 trains on retrieval rows with
InfoNCE over in-batch and hard negatives; stage 2 on blended rows (the stage-1 training rows
plus the other tasks) with each query scored against its own positive and hard negatives only
(in another row of a classification or clustering batch a same-class text is no true negative).
Queries carry their row's prompt (task / instruction; documents get none) and run with their
task's adapter, per row. It logs loss, learning rate, tokens/s and memory, evaluates retrieval
on held-out rows before and after, and saves the model, the adapters and the metrics. Under
``torchrun`` it trains data-parallel (DDP, the loss gathers across ranks).

A run, in order (each step its own function, most in their own module):

1. :func:`~.config.resolve_device`, :class:`~.distributed.DistContext` and
   :func:`~.config.check_config`: every check that needs neither data nor model;
2. :func:`~.plan.load_run_data` and :func:`~.plan.plan_stages`: rows, held-out split, stages;
3. :mod:`~.model_setup`: the model and tokenizer, the template, the rows' prompts, what trains;
4. :func:`_build_run`: device, gradient checkpointing, DDP (:class:`~.state.TrainingRun`);
5. :func:`~.held_out.evaluate_held_out` before, :func:`~.loop.run_stages` (per stage an
   optimizer and schedule, per batch :func:`~.steps.train_step`), evaluation after;
6. :func:`~.output.save_output`.

Example::

    >>> from latentembed.training.trainer import TrainConfig, train
    >>> result = train(TrainConfig(steps=20, output="run"))            # doctest: +SKIP
    >>> result["eval_after"]["ndcg@10"], result["model"].encode(["a query"]).shape  # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..models.embedding import EmbeddingModel
from .config import TrainConfig, autocast_for, check_config, peak_lr, resolve_device
from .distributed import DistContext, wrap_data_parallel
from .held_out import evaluate_held_out, format_eval
from .loop import run_stages
from .model_setup import build_tiny_model, check_run_prompts, choose_template, load_model, set_trainable
from .output import save_output
from .plan import RunData, load_run_data, plan_stages
from .state import LoopState, TrainingRun

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, model: Optional[EmbeddingModel] = None) -> dict:
    """Train as ``config`` says (``model``: an in-memory model to train in place instead of
    ``config.model`` / the tiny random one; it needs a tokenizer); returns
    ``{"loss_history", "eval_before", "eval_after",
    "stages", "trainable_params", "total_params", "wall_s", "model"}`` (``model``: the trained
    :class:`EmbeddingModel`; the rest is what ``metrics.json`` holds)."""
    t_start = time.perf_counter()
    device = resolve_device(config)
    dist = DistContext(device.type)
    say = (lambda *a: print(*a, flush=True)) if dist.rank == 0 and not config.quiet else (lambda *a: None)
    try:
        return _run(config, model, device, dist, say, t_start)
    finally:
        dist.close()


def _run(
    cfg: TrainConfig,
    model: Optional[EmbeddingModel],
    device: torch.device,
    dist: DistContext,
    say: Callable[..., None],
    t_start: float,
) -> dict:
    """The steps of :func:`train`, in order; every check the data allows comes before the model."""
    check_config(cfg, model)  # 1. nothing read yet
    tiny = model is None and cfg.model is None
    data = load_run_data(cfg, rank=dist.rank)  # 2. the rows and the plan
    lr = peak_lr(cfg, tiny)
    stages = plan_stages(cfg, data, tiny=tiny, lr=lr, rank=dist.rank, world_size=dist.world)
    # The tiny model's and the adapters' initial weights and LoRA dropout draw from this stream.
    torch.manual_seed(cfg.seed)

    # 3. The model after every check the data allows alone; its prompt template then checks the rows' tasks.
    model = load_model(cfg, model)
    cfg, template = choose_template(cfg, model)
    check_run_prompts(cfg, model, template, data)
    if model is None:
        model = build_tiny_model(cfg, data, template, dist)
    full = tiny if cfg.full is None else cfg.full
    set_trainable(model, cfg, full=full, template=template, data=data)
    run = _build_run(cfg, model, device, dist, say, full)  # 4. device, DDP
    result: dict = {
        "loss_history": [],
        "stages": [],
        "trainable_params": sum(p.numel() for p in run.params),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    say(_describe(run, data, result, tiny=tiny, lr=lr))

    # 5. Evaluate, train every stage, evaluate; 6. save.
    do_eval = cfg.eval and bool(data.held_out)
    if cfg.eval and not data.held_out:
        say("no held-out rows (eval_fraction 0 or too few rows): no evaluation")
    if do_eval and dist.rank == 0:
        result["eval_before"] = _evaluate(run, data)
        say("eval before: " + format_eval(result["eval_before"]))
    run_stages(run, stages, LoopState(), result)
    model.eval()
    if do_eval and dist.rank == 0:
        result["eval_after"] = _evaluate(run, data)
        say("eval after:  " + format_eval(result["eval_after"]))
        say(_compare_evals(result["eval_before"], result["eval_after"]))
    result["wall_s"] = time.perf_counter() - t_start
    _save_run(run, result)
    dist.barrier()  # nobody leaves (and destroys the group) while rank 0 still evaluates or saves
    result["model"] = model
    return result


def _build_run(
    cfg: TrainConfig,
    model: EmbeddingModel,
    device: torch.device,
    dist: DistContext,
    say: Callable[..., None],
    full: bool,
) -> TrainingRun:
    """The model on its device (gradient checkpointing when asked), its trainable parameters,
    the autocast of its forward and its data-parallel wrapper."""
    model.to(device)
    if cfg.grad_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter (LoRA targets matched no module?)")
    bf16, autocast = autocast_for(cfg, device)
    # A layer's adapters are one stacked parameter, so one adapter trains them all; only a
    # batch whose rows all run the base weights (multi-adapter models) leaves them unused.
    module = wrap_data_parallel(model, device, dist, find_unused_parameters=not full and len(model.adapter_names) > 1)
    return TrainingRun(
        cfg=cfg,
        device=device,
        dist=dist,
        model=model,
        module=module,
        params=params,
        full=full,
        bf16=bf16,
        autocast=autocast,
        say=say,
    )


def _describe(run: TrainingRun, data: RunData, result: dict, *, tiny: bool, lr: float) -> str:
    """The run's first log line: data, model, what trains, device, precision, ranks, lr."""
    cfg, model = run.cfg, run.model
    return (
        f"latentembed train: {data.source1} ({len(data.train1)} train / {len(data.held_out)} held-out rows)"
        + (f", stage 2 {data.source2} (+{len(data.stage2)} rows)" if data.stage2_rows else "")
        + f"; model {'tiny random' if tiny else cfg.model or 'in memory'} "
        + f"({'full' if run.full else 'LoRA ' + ','.join(model.adapter_names)}: "
        f"{result['trainable_params']:,} of {result['total_params']:,} params trainable); {run.device}, "
        f"{'bf16 autocast' if run.bf16 else 'fp32'}, world {run.dist.world}, lr {lr:g}"
    )


def _evaluate(run: TrainingRun, data: RunData) -> dict:
    """Retrieval metrics of the model on the held-out rows (rank 0 only)."""
    cfg = run.cfg
    return evaluate_held_out(
        run.model,
        data.held_out,
        max_length=cfg.max_length,
        default_task=cfg.default_task,
        doc_task=cfg.doc_task,
        autocast=run.autocast(),
    )


def _compare_evals(b: dict, a: dict) -> str:
    return (
        f"held-out retrieval: nDCG@10 {b['ndcg@10']:.3f} -> {a['ndcg@10']:.3f}, "
        f"MRR@10 {b['mrr@10']:.3f} -> {a['mrr@10']:.3f}, recall@10 {b['recall@10']:.3f} -> {a['recall@10']:.3f}"
    )


def _save_run(run: TrainingRun, result: dict) -> None:
    """Rank 0 saves the run to ``--output`` (or says how to)."""
    cfg = run.cfg
    if run.dist.rank != 0:
        return
    if cfg.output:
        save_output(run.model, cfg, result, run.full)
        run.say(f"saved to {cfg.output}: model/, {'' if run.full else 'adapters/, '}train_config.json, metrics.json")
    else:
        run.say("(pass --output DIR to save the model)")
