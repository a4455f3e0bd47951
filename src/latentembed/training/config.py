"""The trainer's settings (:class:`TrainConfig`) and the checks that need neither data nor model.

Example::

    >>> from latentembed.training.config import TrainConfig, check_config
    >>> check_config(TrainConfig(dtype="float64"), model=None)
    Traceback (most recent call last):
    ValueError: dtype must be auto, float32, bfloat16 or float16, got 'float64'
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..atomic_io import check_replaceable
from ..models.embedding_config import DEFAULT_LORA_TARGETS
from ..models.embedding_io import ArgumentError
from ..modules.contrastive import InfoNCELoss
from ..modules.matryoshka import check_matryoshka
from ..prompts import get_template

__all__ = [
    "TrainConfig",
    "DEMO_EPOCHS",
    "DEMO_LR",
    "DEFAULT_EVAL_FRACTION",
    "STAGE2_LR_FACTOR",
    "SCHEDULES",
    "DTYPES",
    "BEST_METRICS",
    "TRAIN_OUTPUT_ENTRIES",
    "EXPORT_FORMATS",
    "LIVE_OUTPUT_ENTRIES",
    "OUTPUT_LEFTOVERS",
    "check_config",
    "resolve_device",
    "peak_lr",
    "eval_fraction",
    "amp_dtype",
    "autocast_for",
]

#: Defaults for the tiny random model, tuned so the no-argument demo shows clear gains on CPU in
#: well under a minute: epochs of (stage 1, stage 2) and the peak learning rate.
DEMO_EPOCHS = (6, 2)
DEMO_LR = 2e-3
#: Stage-1 rows held out for the evaluation when neither ``eval_fraction`` nor ``eval_data`` is given.
DEFAULT_EVAL_FRACTION = 0.2
#: Stage 2's peak learning rate relative to stage 1's (NV-Embed: 2e-5 then 1.5e-5).
STAGE2_LR_FACTOR = 0.5
#: Learning-rate schedules after the warmup: linear or cosine decay to 0, or constant.
SCHEDULES = ("linear", "cosine", "constant")
#: ``dtype`` values: auto (bf16 autocast on CUDA, fp32 on CPU) or the autocast dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Metrics the best checkpoint may be chosen by (higher is better).
BEST_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@1")
#: What the final save of ``--output DIR`` writes, replaced all-or-nothing at the end of a run.
TRAIN_OUTPUT_ENTRIES = ("model", "adapters", "sentence-transformers", "train_config.json", "metrics.json")
#: ``--export`` formats: also write the trained model in this layout (DIR/sentence-transformers).
EXPORT_FORMATS = ("sentence-transformers",)
#: What a run writes into ``--output DIR`` while it runs (kept by the final save).
LIVE_OUTPUT_ENTRIES = ("train_log.jsonl", "checkpoints", "tensorboard")
#: What a run killed while rewriting its log may leave there (the final save removes it).
OUTPUT_LEFTOVERS = (".train_log.jsonl.tmp-*",)


@dataclass
class TrainConfig:
    """Everything :func:`~latentembed.training.trainer.train` needs; the CLI maps its flags onto
    these fields one to one (``--grad-accum`` -> ``grad_accum``).

    Data: ``data`` (JSONL, None = the bundled retrieval set) is stage 1; ``stage2_data`` (None =
    the bundled blended set when ``data`` is None, else no stage 2; ``"none"`` = no stage 2).
    Model: ``model`` (a directory ``EmbeddingModel.from_pretrained`` reads; ``pooling`` for a
    plain decoder) or None = a tiny random model with a tokenizer trained on the data.
    ``causal``: causal attention (None: the model's own; a plain decoder and the tiny model
    train bidirectionally). ``full``: train every weight; None = full for the tiny random model
    (measured on the demo: as good as LoRA or better and ~1.5x faster per step), LoRA otherwise.
    Length of each stage: ``steps`` (optimizer steps) when given, else ``epochs`` (None = 1, or
    :data:`DEMO_EPOCHS` for the tiny model); ``stage2_steps`` / ``stage2_epochs`` default to the
    stage-1 values (``stage2_steps=0``: no stage 2). An optimizer step takes ``grad_accum``
    batches of ``batch_size`` rows per rank (each batch its own in-batch negatives);
    ``grad_cache`` embeds a batch in chunks of that many texts (GradCache: the same gradients
    as the whole batch at once, one chunk's activation memory). ``lr`` None = :data:`DEMO_LR`
    for the tiny model, 1e-4 otherwise; ``stage2_lr`` None = ``lr * STAGE2_LR_FACTOR``.
    ``warmup``: a fraction of a stage's steps (< 1) or a number of steps; then ``schedule``
    (linear / cosine decay to 0, or constant), per stage. ``dtype``: "auto" = bf16 autocast on
    CUDA, fp32 on CPU; float16 autocast scales the loss (GradScaler). ``template``: the prompt
    template (None: the model's own; e5 for the tiny model and plain decoders). Rows without
    task or instruction take ``instruction`` if given, else ``default_task`` (dropped when the
    template lacks it); documents take ``doc_task`` (None: no prompt).
    Evaluation: on ``eval_data`` (a BEIR-style directory) or on ``eval_fraction`` of the
    stage-1 rows (None: :data:`DEFAULT_EVAL_FRACTION` without ``eval_data``), held out whole
    ``eval_group_key`` groups at a time when given; before and after training and every
    ``eval_every`` steps. Checkpoints: every ``save_every`` steps into ``output/checkpoints``,
    the newest ``keep_last`` kept (and the best by ``best_metric`` with ``keep_best``);
    ``resume``: a checkpoint directory or ``"latest"``. ``fsdp``: under ``torchrun``, shard
    the parameters, gradients and optimizer state across the ranks (FSDP2; checkpoints become
    sharded DCP directories) instead of replicating them (DDP). ``matryoshka``: the loss is the
    sum over these prefix lengths of the embedding (``matryoshka_weights`` each, default 1) of
    the loss on the renormalised prefixes (:mod:`latentembed.modules.matryoshka`).
    """

    data: Optional[str] = None
    stage2_data: Optional[str] = None
    model: Optional[str] = None
    pooling: Optional[str] = None
    causal: Optional[bool] = None
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
    grad_accum: int = 1
    grad_cache: Optional[int] = None
    hard_negatives: int = 1
    in_batch_negatives: bool = True
    stage2_in_batch_negatives: bool = False
    temperature: float = 0.02
    learnable_temperature: bool = False
    lr: Optional[float] = None
    stage2_lr: Optional[float] = None
    schedule: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    train_embeddings: bool = True
    warmup: float = 0.1
    max_length: int = 128
    template: Optional[str] = None
    instruction: Optional[str] = None
    default_task: Optional[str] = "retrieval"
    doc_task: Optional[str] = None
    eval_fraction: Optional[float] = None
    eval_data: Optional[str] = None
    eval_group_key: Optional[str] = None
    eval: bool = True
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_last: Optional[int] = None
    keep_best: bool = False
    best_metric: str = "ndcg@10"
    resume: Optional[str] = None
    seed: int = 0
    device: Optional[str] = None
    dtype: str = "auto"
    log_every: int = 10
    log_file: Optional[str] = None
    report_to: Sequence[str] = ()
    progress: Optional[bool] = None
    grad_checkpointing: bool = False
    fsdp: bool = False
    matryoshka: Sequence[int] = ()
    matryoshka_weights: Sequence[float] = ()
    merge_on_save: bool = False
    export: Optional[str] = None
    quiet: bool = False

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (what ``train_config.json`` holds)."""
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        out["report_to"] = list(self.report_to)
        out["matryoshka"] = list(self.matryoshka)
        out["matryoshka_weights"] = list(self.matryoshka_weights)
        return out


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device to train on (``cfg.device``, else cuda when available); under ``torchrun`` a
    bare ``cuda`` is this process's ``LOCAL_RANK`` GPU, made the current one."""
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


def peak_lr(cfg: TrainConfig, tiny: bool) -> float:
    """Stage 1's peak learning rate: ``cfg.lr``, else :data:`DEMO_LR` for the tiny model, else 1e-4."""
    return cfg.lr if cfg.lr is not None else (DEMO_LR if tiny else 1e-4)


def eval_fraction(cfg: TrainConfig) -> float:
    """The fraction of stage-1 rows held out: 0 without evaluation or with ``eval_data``, else
    ``cfg.eval_fraction`` or :data:`DEFAULT_EVAL_FRACTION`."""
    if not cfg.eval or cfg.eval_data is not None:
        return 0.0
    return DEFAULT_EVAL_FRACTION if cfg.eval_fraction is None else cfg.eval_fraction


def amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the forward (None: fp32, no autocast): ``cfg.dtype``, where
    "auto" is bf16 on CUDA and fp32 on CPU."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def autocast_for(cfg: TrainConfig, device: torch.device) -> tuple[Optional[torch.dtype], Callable[[], ContextManager]]:
    """(autocast dtype or None, a factory of the forward's autocast context)."""
    dtype = amp_dtype(cfg, device)
    return dtype, ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _check_ranges(cfg: TrainConfig) -> None:
    """Single values out of their range, each named by its flag."""
    positive = ("batch_size", "grad_accum", "grad_cache", "eval_every", "save_every", "keep_last", "log_every")
    for field in positive:
        value = getattr(cfg, field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{_flag(field)} must be a positive int, got {value!r}")
    if cfg.hard_negatives < 0:
        raise ValueError(f"--hard-negatives must be >= 0, got {cfg.hard_negatives}")
    if cfg.batch_size < 2 and cfg.hard_negatives == 0:
        raise ValueError("batch_size 1 without hard negatives gives a query no negative at all")
    if not cfg.in_batch_negatives and cfg.hard_negatives == 0:
        raise ValueError("--no-in-batch-negatives with --hard-negatives 0 leaves a stage-1 query no negative at all")
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")
    if not isinstance(cfg.warmup, int) and cfg.warmup >= 1 and cfg.warmup != int(cfg.warmup):
        raise ValueError(f"warmup: a fraction of the steps (< 1) or a whole number of steps, got {cfg.warmup}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.eval_fraction is not None and not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm <= 0:
        raise ValueError(
            f"--weight-decay must be >= 0 and --max-grad-norm > 0, got {cfg.weight_decay} and {cfg.max_grad_norm}"
        )
    choices = (("dtype", DTYPES), ("schedule", SCHEDULES), ("best_metric", BEST_METRICS))
    for field, allowed in choices:
        if getattr(cfg, field) not in allowed:
            names = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise ValueError(f"{field} must be {names}, got {getattr(cfg, field)!r}")
    bad = sorted(set(cfg.report_to) - {"tensorboard", "none"})
    if bad:
        raise ValueError(f"--report-to: expected tensorboard or none, got {bad}")
    if cfg.matryoshka or cfg.matryoshka_weights:
        try:
            check_matryoshka(tuple(cfg.matryoshka), tuple(cfg.matryoshka_weights))
        except ValueError as e:
            raise ValueError(f"--matryoshka {list(cfg.matryoshka)} --matryoshka-weights: {e}") from None
    try:  # the temperature's own checks (range, learnable within its clamp), made now
        InfoNCELoss(cfg.temperature, learnable_temperature=cfg.learnable_temperature)
    except ValueError as e:
        raise ValueError(f"--temperature {cfg.temperature}: {e}") from None


def _check_evaluation(cfg: TrainConfig) -> None:
    """The evaluation flags that contradict each other or have nothing to evaluate on."""
    if cfg.eval_data is not None and cfg.eval_fraction:
        raise ValueError(
            f"--eval-data {cfg.eval_data} and --eval-fraction {cfg.eval_fraction}: pass one evaluation set "
            "(--eval-data replaces the held-out rows)"
        )
    if cfg.eval_group_key is not None and (cfg.eval_data is not None or eval_fraction(cfg) == 0):
        raise ValueError(
            f"--eval-group-key {cfg.eval_group_key} holds out whole groups of the stage-1 rows: it needs a held-out "
            f"fraction (--eval-fraction > 0, no --eval-data, evaluation on), got eval_fraction {cfg.eval_fraction}, "
            f"eval_data {cfg.eval_data}, eval {cfg.eval}"
        )
    if not cfg.eval and (cfg.eval_every is not None or cfg.keep_best or cfg.eval_data is not None):
        raise ValueError("--no-eval contradicts --eval-every, --eval-data and --keep-best")
    if cfg.eval_every is not None and cfg.eval_data is None and eval_fraction(cfg) == 0:
        raise ValueError(f"--eval-every {cfg.eval_every}: nothing to evaluate on (--eval-fraction 0, no --eval-data)")
    if cfg.eval_data is not None and not os.path.exists(cfg.eval_data):
        raise FileNotFoundError(
            f"--eval-data {cfg.eval_data}: not found (expected a BEIR-style directory with corpus.jsonl, "
            "queries.jsonl and qrels)"
        )


def _check_run_files(cfg: TrainConfig, tiny: bool) -> None:
    """Checkpoints, logs and the merged export: what they need."""
    if cfg.save_every is not None and not cfg.output:
        raise ValueError(f"--save-every {cfg.save_every} needs --output DIR (checkpoints go to DIR/checkpoints)")
    if cfg.keep_last is not None and cfg.save_every is None and not cfg.keep_best:
        raise ValueError(f"--keep-last {cfg.keep_last} needs --save-every N or --keep-best (no checkpoints otherwise)")
    if cfg.keep_best and (cfg.eval_every is None or not cfg.output):
        raise ValueError(
            "--keep-best keeps the checkpoint of the best evaluation: it needs --eval-every N and --output"
        )
    if cfg.resume == "latest" and not cfg.output:
        raise ValueError("--resume latest resumes from DIR/checkpoints: it needs --output DIR")
    if cfg.resume not in (None, "latest") and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise FileNotFoundError(
            f"--resume {cfg.resume}: not a checkpoint directory (no trainer_state.json); "
            "pass a DIR/checkpoints/step-N directory or 'latest'"
        )
    if "tensorboard" in cfg.report_to:
        if not cfg.output:
            raise ValueError("--report-to tensorboard writes to DIR/tensorboard: it needs --output DIR")
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"--report-to tensorboard: the tensorboard package is not installed ({e}); "
                "pip install tensorboard, or leave --report-to out (the JSONL log is always written)"
            ) from None
    if cfg.log_file is not None and os.path.isdir(cfg.log_file):
        raise ValueError(f"--log-file {cfg.log_file}: is a directory; expected the path of a file")
    if cfg.export is not None and (cfg.export not in EXPORT_FORMATS or not cfg.output):
        raise ValueError(
            f"--export writes DIR/sentence-transformers: it takes one of {list(EXPORT_FORMATS)} and needs --output, "
            f"got export={cfg.export!r}, output={cfg.output}"
        )
    if cfg.merge_on_save:
        full = tiny if cfg.full is None else cfg.full
        if full or not cfg.output:
            raise ValueError(
                "--merge-on-save folds the LoRA adapter into the saved weights: it needs LoRA (--no-full"
                f"{'' if cfg.full is not None else '; the tiny model trains fully by default'}) and --output, "
                f"got full={full}, output={cfg.output}"
            )


def check_config(cfg: TrainConfig, model) -> None:
    """Every check of ``cfg`` that needs no data and no model (``model``: the in-memory model
    given to ``train``, or None), so that a bad value fails before anything is read or loaded.
    An ``output`` directory is checked now too: the save at the end would have to delete a
    user's files."""
    _check_ranges(cfg)
    if cfg.template is not None:
        get_template(cfg.template)  # an unknown name fails here, not after loading the model
    own_pooling = model.config.pooling if model is not None else "mean"  # the tiny model's
    if cfg.pooling is not None and (cfg.model is None or model is not None) and cfg.pooling != own_pooling:
        raise ArgumentError(
            "pooling",
            cfg.pooling,
            "{arg} is the pooling of a checkpoint loaded with --model; "
            "the tiny random model (no --model) and an in-memory model have their own",
        )
    if model is not None and cfg.causal is not None and bool(model.config.causal) != cfg.causal:
        raise ValueError(
            f"causal={cfg.causal}: the in-memory model was built with causal={model.config.causal}; "
            "build it as you want it trained"
        )
    _check_evaluation(cfg)
    _check_run_files(cfg, tiny=model is None and cfg.model is None)
    if cfg.output:
        check_replaceable(cfg.output, TRAIN_OUTPUT_ENTRIES + LIVE_OUTPUT_ENTRIES + OUTPUT_LEFTOVERS)
