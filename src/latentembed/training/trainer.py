"""Contrastive fine-tuning of an :class:`~latentembed.models.embedding.EmbeddingModel`.

:func:`train` runs the two-stage schedule of NV-Embed: stage 1 trains on retrieval rows with
InfoNCE over in-batch and hard negatives; stage 2 on blended rows (the stage-1 training rows
plus the other tasks) with each query scored against its own positive and hard negatives only
(in another row of a classification or clustering batch a same-class text is no true negative).
Queries carry their row's prompt (task / instruction; documents get none) and run with their
task's adapter, per row. It logs every step (loss, learning rate, tokens/s, peak memory) to the
console, a JSONL file and optionally TensorBoard, evaluates retrieval before, every
``eval_every`` steps and after, saves periodic checkpoints it can resume from exactly, and saves
the model, the adapters, the resolved settings and the metrics. Under ``torchrun`` it trains
data-parallel (DDP, the loss gathers across ranks).

A run, in order (each step its own function, most in their own module):

1. :func:`~.config.resolve_device`, :class:`~.distributed.DistContext` and
   :func:`~.config.check_config`: every check that needs neither data nor model;
2. :func:`~.plan.load_run_data` and :func:`~.plan.plan_stages`: rows, held-out split, stages;
   resuming, :func:`~.resume.check_resume_before_model` compares the checkpoint's run;
3. :mod:`~.model_setup`: the model and tokenizer, the template, the rows' prompts, what trains;
4. :func:`_build_run`: device, gradient checkpointing, DDP, logs, checkpoints
   (:class:`~.state.TrainingRun`); resuming, the checkpoint's weights and history;
5. evaluation before, :func:`~.loop.run_stages` (per stage an optimizer and schedule, per step
   :func:`~.steps.train_step`, evaluations and checkpoints when due), evaluation after;
6. :func:`~.output.save_output`.

Example::

    >>> from latentembed.training.trainer import TrainConfig, train
    >>> result = train(TrainConfig(steps=20, output="run", save_every=5))            # doctest: +SKIP
    >>> result = train(TrainConfig(steps=40, output="run", save_every=5, resume="latest"))  # doctest: +SKIP
    >>> result["eval_after"]["ndcg@10"], result["model"].encode(["a query"]).shape  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..models.embedding import EmbeddingModel
from ..modules.matryoshka import check_matryoshka
from .checkpoint import CHECKPOINTS_DIR, Checkpointer, find_checkpoint, load_checkpoint, restore_rng
from .config import TrainConfig, autocast_for, check_config, resolve_device
from .distributed import DistContext, wrap_data_parallel
from .fsdp import full_state_dict, make_mesh, shard_model, unsharded_copy
from .held_out import evaluate_eval_set, evaluate_held_out, format_eval
from .logs import LOG_NAME, Progress, RunLog, StepMemory
from .loop import record_evaluation, run_stages
from .model_setup import build_tiny_model, check_run_prompts, choose_template, load_model, set_trainable
from .output import save_output
from .plan import RunData, load_run_data, plan_stages
from .resume import (
    check_fresh_output,
    check_resume_before_model,
    check_resume_with_model,
    checkpoint_identity,
    data_fingerprints,
    frozen_fingerprint,
    resolve_before_model,
    resolve_with_model,
)
from .sharded_checkpoint import load_sharded
from .state import LoopState, TrainingRun

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, model: Optional[EmbeddingModel] = None) -> dict:
    """Train as ``config`` says (``model``: an in-memory model to train in place instead of
    ``config.model`` / the tiny random one; it needs a tokenizer); returns
    ``{"loss_history", "eval_before", "evals", "best", "eval_after", "stages",
    "trainable_params", "total_params", "wall_s", "model"}`` (``model``: the trained
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
    # Rank 0 chooses, so every rank resumes from the same checkpoint (or none).
    found = find_checkpoint(cfg.resume, cfg.output) if dist.rank == 0 else None
    checkpoint = dist.broadcast(None if found is None else str(found))
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if checkpoint is None:
        check_fresh_output(cfg)
        if cfg.resume == "latest":
            say(
                f"--resume latest: no checkpoint in {Path(cfg.output) / CHECKPOINTS_DIR} yet; "
                "starting from the beginning"
            )
    data = load_run_data(cfg, rank=dist.rank)  # 2. the rows and the plan
    resolved = resolve_before_model(cfg, tiny=tiny, device=device)
    stages = plan_stages(cfg, data, tiny=tiny, lr=resolved.lr, rank=dist.rank, world_size=dist.world)
    fingerprints = data_fingerprints(cfg)
    saved = None
    if checkpoint is not None:
        saved = check_resume_before_model(checkpoint, resolved, fingerprints, dist.world, say, sharded=cfg.fsdp)
    # The tiny model's and the adapters' initial weights draw from this stream (and LoRA
    # dropout, until a resumed run puts back the checkpoint's generators).
    torch.manual_seed(cfg.seed)

    # 3. The model after every check the data allows alone; its prompt template then checks the rows' tasks.
    model = load_model(cfg, model)
    cfg, template = choose_template(cfg, model)
    check_run_prompts(cfg, model, template, data)
    if model is None:
        model = build_tiny_model(cfg, data, template, dist)
    set_trainable(model, cfg, full=resolved.full, template=template, data=data)
    if cfg.matryoshka:
        try:
            check_matryoshka(tuple(cfg.matryoshka), tuple(cfg.matryoshka_weights), model.backbone.config.hidden_size)
        except ValueError as e:
            raise ValueError(f"--matryoshka {list(cfg.matryoshka)}: {e}") from None
    resolved = resolve_with_model(resolved, model, template, cfg)
    fingerprints["frozen"] = frozen_fingerprint(model)
    if saved is not None:
        check_resume_with_model(checkpoint, saved, resolved, fingerprints["frozen"])
    total = sum(s.steps for s in stages)
    run = _build_run(cfg, model, device, dist, say, resolved, data, total)  # 4. device, DDP, logs
    run.identity = {
        **checkpoint_identity(cfg, resolved, fingerprints, dist.world),
        "total_steps": total,
        "adapters": list(model.adapter_names),  # what exporting a sharded checkpoint rebuilds
    }
    result: dict = {
        "loss_history": [],
        "stages": [],
        "trainable_params": sum(p.numel() for p in run.params),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    state = LoopState()
    if checkpoint is not None:
        state = _resume(run, checkpoint, result)
        run.log.progress.first = state.global_step
    run.log.open(
        {"global_step": state.global_step, "config": resolved.to_dict(), "world_size": dist.world},
        resume_step=state.global_step if checkpoint is not None else None,
    )
    run.say(_describe(run, data, result, tiny=tiny, lr=resolved.lr))
    if checkpoint is not None:
        run.say(
            f"resumed from {checkpoint} (stage {state.stage + 1}, step {state.step}, global step {state.global_step})"
        )

    # 5. Evaluate, train every stage, evaluate; 6. save.
    if cfg.eval and run.evaluate is None and dist.rank == 0:
        run.say("no held-out rows (eval_fraction 0 or too few rows): no evaluation")
    if run.evaluate is not None and checkpoint is None:
        result["eval_before"] = run.evaluate()
        record_evaluation(run, state, result, result["eval_before"], stage=1)
        run.say("eval before: " + format_eval(result["eval_before"]))
    if checkpoint is not None and run.resume.rng is not None:
        restore_rng(run.resume.rng)  # last: every draw from here on is the one the killed run made
    elif checkpoint is not None:  # a rank the sharded checkpoint's run did not have: its own stream
        torch.manual_seed(cfg.seed * 1_000_003 + state.global_step * 1_009 + dist.rank)
    try:
        run_stages(run, stages, state, result)
        model.eval()
        if run.evaluate is not None:
            last = result.get("evals", [])[-1:]
            same = last and last[0]["global_step"] == state.global_step and state.global_step > 0
            result["eval_after"] = _metrics(last[0]) if same else run.evaluate()
            run.say("eval after:  " + format_eval(result["eval_after"]))
            if "eval_before" in result:
                run.say(_compare_evals(result["eval_before"], result["eval_after"]))
        result["wall_s"] = time.perf_counter() - t_start
        _save_run(run, result)
    finally:
        run.log.close()
    dist.barrier()  # nobody leaves (and destroys the group) while rank 0 still evaluates or saves
    result["model"] = model
    return result


def _metrics(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("global_step", "stage", "step")}


def _resume(run: TrainingRun, checkpoint: Path, result: dict) -> LoopState:
    """Put the checkpoint's trained weights into the model, keep its optimizer state for its
    stage and its generators for the loop, and continue its history; returns its position."""
    resume = load_checkpoint(checkpoint, run.dist.rank, run.device)
    if resume.sharded != run.sharded:
        raise ValueError(
            f"checkpoint {checkpoint} is {'sharded (FSDP)' if resume.sharded else 'unsharded'}; this run is "
            f"{'sharded (--fsdp with several ranks)' if run.sharded else 'not'}: resume it as it was written"
        )
    if resume.sharded:  # every rank reads its shards, resharded to this run's ranks
        load_sharded(checkpoint, run.model, run.temperature, trainable_only=not run.full)
    else:
        _copy_weights(run, checkpoint, resume.weights)
    run.resume = resume
    saved = resume.state["result"]
    result.update({k: v for k, v in saved.items() if k not in ("trainable_params", "total_params")})
    result["resumed_from"] = str(checkpoint)
    return LoopState(**resume.state["loop"])


def _copy_weights(run: TrainingRun, checkpoint: Path, weights: dict) -> None:
    """Put an unsharded checkpoint's trained tensors into the model."""
    trained = run.trained_tensors()
    missing = sorted(set(trained) - set(weights))
    unexpected = sorted(set(weights) - set(trained))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, tensor in trained.items():
            tensor.copy_(weights[name])


def _build_run(
    cfg: TrainConfig,
    model: EmbeddingModel,
    device: torch.device,
    dist: DistContext,
    say: Callable[..., None],
    resolved: TrainConfig,
    data: RunData,
    total_steps: int,
) -> TrainingRun:
    """The model on its device (gradient checkpointing when asked), its trainable parameters,
    the autocast and loss scale of its forward, its data-parallel wrapper, the logs, the
    checkpoints and the evaluation."""
    model.to(device)
    if cfg.grad_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter (LoRA targets matched no module?)")
    full = resolved.full
    dtype, autocast = autocast_for(cfg, device)
    # A layer's adapters are one stacked parameter, so one adapter trains them all; only a
    # batch whose rows all run the base weights (multi-adapter models) leaves them unused.
    if cfg.fsdp and dist.on:
        # Sharded after the trainable flags are set and before the optimizer exists: the
        # optimizer must hold the sharded (DTensor) parameters.
        module = shard_model(model, mesh=make_mesh(device, world=dist.world), param_dtype=dtype)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        module = wrap_data_parallel(
            model, device, dist, find_unused_parameters=not full and len(model.adapter_names) > 1
        )
    temperature = None
    if cfg.learnable_temperature:
        temperature = torch.nn.Parameter(torch.tensor(1.0 / cfg.temperature, device=device).log())
    output = Path(cfg.output) if cfg.output else None
    rank0 = dist.rank == 0
    log_path = Path(cfg.log_file) if cfg.log_file else (output / LOG_NAME if output else None)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    log = RunLog(
        log_path if rank0 else None,
        say,
        Progress(total_steps, 0, enabled=bool(show) and rank0 and not cfg.quiet),
        tensorboard_dir=output / "tensorboard" if rank0 and "tensorboard" in cfg.report_to else None,
        log_every=cfg.log_every,
    )
    checkpoints = None
    if cfg.save_every is not None or cfg.keep_best:
        checkpoints = Checkpointer(output / CHECKPOINTS_DIR, dist, keep_last=cfg.keep_last, keep_best=cfg.keep_best)
    run = TrainingRun(
        cfg=cfg,
        device=device,
        dist=dist,
        model=model,
        module=module,
        params=params,
        full=full,
        amp_dtype=dtype,
        autocast=autocast,
        scaler=_loss_scaler(device, enabled=dtype == torch.float16, sharded=cfg.fsdp and dist.on),
        log=log,
        memory=StepMemory(device),
        temperature=temperature,
        checkpoints=checkpoints,
    )
    # Sharded, every rank runs the evaluation's forwards (each gathers weights from all ranks);
    # rank 0 keeps the result.
    if cfg.eval and (rank0 or run.sharded) and (data.held_out or data.eval_set is not None):
        run.evaluate = lambda: _evaluate(run, data)
    return run


def _loss_scaler(device: torch.device, *, enabled: bool, sharded: bool) -> torch.amp.GradScaler:
    """The fp16 loss scaler; sharded, one whose overflow check is all-reduced over the ranks
    (each rank sees only its shards' gradients: ranks deciding apart would diverge)."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _describe(run: TrainingRun, data: RunData, result: dict, *, tiny: bool, lr: float) -> str:
    """The run's first log line: data, model, what trains, device, precision, ranks, lr."""
    cfg, model = run.cfg, run.model
    held = f"eval set {data.eval_set.source}" if data.eval_set is not None else f"{len(data.held_out)} held-out rows"
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[run.amp_dtype]
    return (
        f"latentembed train: {data.source1} ({len(data.train1)} train rows, {held})"
        + (f", stage 2 {data.source2} (+{len(data.stage2)} rows)" if data.stage2_rows else "")
        + f"; model {'tiny random' if tiny else cfg.model or 'in memory'} "
        + f"({'full' if run.full else 'LoRA ' + ','.join(model.adapter_names)}: "
        f"{result['trainable_params']:,} of {result['total_params']:,} params trainable"
        f"{', causal' if model.config.causal else ''}); {run.device}, {precision}, world {run.dist.world}, "
        f"lr {lr:g}"
        + (f", {cfg.grad_accum} batches a step" if cfg.grad_accum > 1 else "")
        + (f", GradCache chunks of {cfg.grad_cache}" if cfg.grad_cache else "")
    )


def _evaluate(run: TrainingRun, data: RunData) -> dict:
    """Retrieval metrics of the model on the ``--eval-data`` set or the held-out rows (rank 0)."""
    cfg = run.cfg
    common = dict(
        max_length=cfg.max_length,
        default_task=cfg.default_task,
        doc_task=cfg.doc_task,
        instruction=cfg.instruction,
        autocast=run.autocast(),
    )
    if data.eval_set is not None:
        return evaluate_eval_set(run.model, data.eval_set, **common)
    return evaluate_held_out(run.model, data.held_out, **common)


def _compare_evals(b: dict, a: dict) -> str:
    return (
        f"held-out retrieval: nDCG@10 {b['ndcg@10']:.3f} -> {a['ndcg@10']:.3f}, "
        f"MRR@10 {b['mrr@10']:.3f} -> {a['mrr@10']:.3f}, recall@10 {b['recall@10']:.3f} -> {a['recall@10']:.3f}"
    )


def _save_run(run: TrainingRun, result: dict) -> None:
    """Rank 0 saves the run to ``--output`` (or says how to); sharded, every rank first sends
    it its shards and rank 0 saves a plain copy of the whole model."""
    cfg = run.cfg
    model = run.model
    if run.sharded and cfg.output:
        state = full_state_dict(model)  # collective
        model = unsharded_copy(model, state) if run.dist.rank == 0 else model
    if run.dist.rank != 0:
        return
    if cfg.output:
        resolved = run.identity["resolved"]
        note = save_output(model, cfg, result, run.full, config=resolved)
        if note:
            run.say(note)
        merged = " (adapter merged into model/)" if model.merged else ""
        exported = f"{cfg.export}/, " if cfg.export else ""
        run.say(
            f"saved to {cfg.output}: model/{merged}, {'' if run.full else 'adapters/, '}{exported}"
            "train_config.json, metrics.json"
        )
    else:
        run.say("(pass --output DIR to save the model)")
