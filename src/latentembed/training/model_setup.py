"""The model to train and what trains in it: loaded (``--model``), given in memory, or the tiny
random model built from the data; its prompt template; the rows' prompts checked against it;
LoRA adapters or every weight.

Example (``data``: :func:`~.plan.load_run_data`'s rows)::

    >>> cfg, template = choose_template(TrainConfig(), model=None)          # doctest: +SKIP
    >>> model = build_tiny_model(cfg, data, template, DistContext("cpu"))   # doctest: +SKIP
    >>> set_trainable(model, cfg, full=True, template=template, data=data)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..models.embedding import EmbeddingModel
from ..prompts import PromptTemplate, get_template, resolve_prompt
from ..tokenization import TextTokenizer
from .config import TrainConfig
from .distributed import DistContext
from .plan import RunData, check_prompts
from .tiny import tiny_model, train_tokenizer, vocabulary_texts

__all__ = ["load_model", "choose_template", "check_run_prompts", "build_tiny_model", "adapter_names", "set_trainable"]


def load_model(cfg: TrainConfig, model: Optional[EmbeddingModel]) -> Optional[EmbeddingModel]:
    """The model to train: ``model`` (in memory; it needs a tokenizer), else the directory
    ``cfg.model`` loaded, else None (the tiny random model, built once the prompts are checked)."""
    if model is not None:
        if model.tokenizer is None:
            raise ValueError("the model to train has no tokenizer")
        return model
    if cfg.model is None:
        return None
    path = Path(cfg.model)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {cfg.model!r}: expected a model directory with config.json "
            "(latentembed, NV-Embed-style or plain HF decoder checkpoint)"
        )
    overrides = {} if cfg.causal is None else {"causal": cfg.causal}
    model = EmbeddingModel.from_pretrained(path, pooling=cfg.pooling, **overrides)
    if model.tokenizer is None:
        raise FileNotFoundError(f"--model {cfg.model!r} has no tokenizer.json")
    return model


def choose_template(cfg: TrainConfig, model: Optional[EmbeddingModel]) -> tuple[TrainConfig, PromptTemplate]:
    """The run's prompt template, set on ``model``: ``cfg.template``, else the model's own, else
    e5 (plain decoders, the tiny model). Returns it with ``cfg``, whose ``default_task`` is
    dropped (None) when the template lacks that task."""
    if model is not None:
        want = cfg.template or (model.config.prompt_template if model.template.name != "none" else "e5")
        if get_template(want) != model.template:
            model.config = dataclasses.replace(model.config, prompt_template=want)
            model.template = get_template(want)
    template = model.template if model is not None else get_template(cfg.template or "e5")
    if cfg.default_task is not None and cfg.default_task not in template.tasks:
        cfg = dataclasses.replace(cfg, default_task=None)
    return cfg, template


def check_run_prompts(
    cfg: TrainConfig, model: Optional[EmbeddingModel], template: PromptTemplate, data: RunData
) -> None:
    """Resolve ``cfg.doc_task`` and every row's prompt with the model (or, before the tiny
    model exists, the template), so that an unknown task fails before any training."""
    resolve = model.resolve if model is not None else (lambda t, i: resolve_prompt(template, task=t, instruction=i))
    if cfg.doc_task is not None:
        try:
            resolve(cfg.doc_task, None)
        except ValueError as e:
            raise ValueError(f"doc_task: {e}") from None
    if cfg.instruction is not None:
        try:
            resolve(None, cfg.instruction)
        except ValueError as e:
            raise ValueError(f"--instruction: {e}") from None
    check_prompts(data.stage1, data.source1, resolve, cfg.default_task, cfg.instruction)
    check_prompts(data.stage2, data.source2, resolve, cfg.default_task, cfg.instruction)


def build_tiny_model(cfg: TrainConfig, data: RunData, template: PromptTemplate, dist: DistContext) -> EmbeddingModel:
    """The tiny random model with a tokenizer built from the training rows and the template's
    prompts; rank 0 builds the tokenizer and sends it to the others (one vocabulary)."""
    texts = vocabulary_texts(data.train1 + data.stage2, template)
    tok_json = dist.broadcast(train_tokenizer(texts).tokenizer.to_str() if dist.rank == 0 else None)
    from tokenizers import Tokenizer

    tokenizer = TextTokenizer(Tokenizer.from_str(tok_json), bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]")
    return tiny_model(tokenizer, template=cfg.template or "e5", max_length=cfg.max_length, causal=bool(cfg.causal))


def adapter_names(template: PromptTemplate, tasks: set) -> list[str]:
    """The template's adapters for the tasks in use (jina-v3 style), else one named "default"."""
    mapped = sorted({resolve_prompt(template, task=t).adapter for t in tasks if t is not None} - {None})
    return mapped or ["default"]


def set_trainable(
    model: EmbeddingModel, cfg: TrainConfig, *, full: bool, template: PromptTemplate, data: RunData
) -> None:
    """Choose what trains. ``full``: every weight (the token embeddings only with
    ``cfg.train_embeddings``). Else LoRA: adapters for the tasks in use are added (unless the
    model has some) and train with the pooling head; the base stays frozen."""
    if not full:
        tasks = {ex.task for ex in data.stage1 + data.stage2} | {cfg.default_task, cfg.doc_task}
        if model.config.lora is None:
            model.add_adapters(
                adapter_names(template, tasks),
                rank=cfg.lora_rank,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
            )
        # The base stays frozen; the adapters train, and so does a pooling head with weights
        # (NV-Embed trains its latent-attention block fully alongside the LoRA backbone).
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or name.startswith("pooling."))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(cfg.train_embeddings or not name.startswith("backbone.embed_tokens."))
