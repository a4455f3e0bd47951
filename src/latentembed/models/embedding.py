"""The embedding model: bidirectional backbone + pooling + optional multi-LoRA + normalisation.

:class:`EmbeddingModel` is a plain ``nn.Module``: its forward takes token ids (padded or packed)
and returns one embedding per sequence, so it drops into any training loop; ``encode`` turns
texts into embeddings with the model's tokenizer, prompts and instruction pool masks.
Checkpoint reading and writing live in :mod:`latentembed.models.embedding_io`, below this module:
:meth:`EmbeddingModel.from_pretrained` hands it the class to build, so it never imports this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..modules.adapter_routing import LoRARouting, lora_routing
from ..modules.attention import packed_runs_lean
from ..modules.lora import apply_multi_lora, multi_lora_layers
from ..modules.matryoshka import embedding_prefix
from ..modules.pooling import Pooling
from ..modules.pooling_functions import check_pool_mask, l2_normalize
from ..modules.quantization import PRECISIONS, quantize_embeddings
from ..ops import checks
from ..prompts import get_template, resolve_prompt
from ..tokenization import (
    PackedBatch,
    TextTokenizer,
    TokenizedTexts,
    as_tokenizer,
    check_tokenizer_fits,
    pack_sequences,
    tokenize_with_prompts,
)
from . import embedding_io
from .decoder import DecoderModel
from .decoder_config import DecoderConfig
from .embedding_config import EmbeddingConfig, LoRAConfig

__all__ = ["EmbeddingModel"]

Tasks = Union[None, str, Sequence[Union[str, int]], torch.Tensor]


class EmbeddingModel(nn.Module):
    """A decoder LLM turned text-embedding model.

    Args:
        decoder_config: the backbone's :class:`DecoderConfig`.
        config: the :class:`EmbeddingConfig` (pooling, normalisation, prompts, adapters).
        tokenizer: a directory with ``tokenizer.json``, a
            :class:`~latentembed.tokenization.TextTokenizer` or anything ``TextTokenizer.wrap``
            accepts; needed by :meth:`encode` and :meth:`tokenize` only.
        attn_backend: the backbone's attention backend (``"auto"``, flash, varlen, sdpa, math).

    Attributes: ``backbone`` (:class:`DecoderModel`), ``pooling`` (:class:`Pooling`; its latent
    block, if any, at ``pooling.latent_attention``), ``routing`` (the shared
    :class:`LoRARouting` or ``None``).

    Forward: ``(input_ids, attention_mask=None, *, pool_mask=None, cu_seqlens=None,
    max_seqlen=None, tasks=None)`` -> [B, D]; see :meth:`forward`.

    Example:
        >>> cfg = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
        ...                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = EmbeddingModel(cfg, EmbeddingConfig(pooling="mean"))
        >>> ids, mask = torch.randint(0, 128, (3, 9)), torch.ones(3, 9, dtype=torch.bool)
        >>> model(ids, mask).shape
        torch.Size([3, 64])
    """

    def __init__(
        self,
        decoder_config: DecoderConfig,
        config: Optional[EmbeddingConfig] = None,
        tokenizer=None,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        config = EmbeddingConfig() if config is None else config
        self.config = config
        self.template = get_template(config.prompt_template)
        self.backbone = DecoderModel(decoder_config, causal=config.causal, attn_backend=attn_backend)
        self.pooling = self.make_pooling()
        self.tokenizer = tokenizer  # checked against the embedding table by the setter
        self.routing: Optional[LoRARouting] = None
        if config.lora is not None:
            self._apply_lora(config.lora)

    def make_pooling(self) -> Pooling:
        """A new pooling module as the config describes it (random init for a latent head)."""
        latent = dict(self.config.latent_attention or {})
        if self.config.pooling == "latent_attention":
            latent.setdefault("hidden_size", self.backbone.config.hidden_size)
        # The model normalises after pooling (one place for every mode); the latent block's own
        # normalisation would do the same arithmetic.
        return Pooling(self.config.pooling, normalize=False, **latent)

    @property
    def tokenizer(self) -> Optional[TextTokenizer]:
        """The :class:`TextTokenizer` of :meth:`encode` (``None``: none attached). Setting it
        accepts what the constructor's ``tokenizer=`` does and refuses a tokenizer with ids the
        embedding table lacks (it would fail with an IndexError at the first such token)."""
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        tokenizer = as_tokenizer(tokenizer)
        if tokenizer is not None:
            check_tokenizer_fits(
                tokenizer,
                self.backbone.config.vocab_size,
                source="tokenizer",
                table="the backbone's embedding table (DecoderConfig.vocab_size)",
            )
        self.__dict__["_tokenizer"] = tokenizer

    # -- adapters ---------------------------------------------------------------------------
    def _apply_lora(self, lora: LoRAConfig) -> None:
        # Unrouted calls: a one-adapter model (a fine-tune) always runs its adapter; a
        # multi-adapter model runs the base weights unless told which adapter.
        default = lora.adapters[0] if len(lora.adapters) == 1 else "base"
        self.routing = apply_multi_lora(
            self.backbone,
            lora.target_modules,
            lora.adapters,
            rank=lora.rank,
            alpha=lora.alpha,
            r_max=lora.r_max,
            dropout=lora.dropout,
            use_rslora=lora.use_rslora,
            default_adapter=default,
        )

    def add_adapters(
        self,
        names: Sequence[str],
        *,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] = LoRAConfig().target_modules,
        r_max: Optional[int] = None,
        use_rslora: bool = False,
    ) -> LoRARouting:
        """Add LoRA adapters ``names`` (fresh: B = 0, so the model is unchanged until trained) to
        every backbone linear named in ``target_modules``; freezes the wrapped base weights.
        Once per model. Returns the routing shared by the adapter layers.

        Example:
            >>> model.add_adapters(["retrieval.query", "retrieval.passage"], rank=8)  # doctest: +SKIP
        """
        if self.config.lora is not None:
            raise ValueError(f"the model already has adapters {self.config.lora.adapters}; add them all at once")
        lora = LoRAConfig(
            adapters=list(names),
            rank=rank,
            alpha=alpha,
            r_max=r_max,
            dropout=dropout,
            use_rslora=use_rslora,
            target_modules=list(target_modules),
        )
        self.config = dataclasses.replace(self.config, lora=lora)  # validates the names
        self._apply_lora(lora)
        return self.routing

    @property
    def adapter_names(self) -> tuple:
        return tuple(self.config.lora.adapters) if self.config.lora is not None else ()

    def merge_adapters(self) -> None:
        """Fold the model's single LoRA adapter into the base weights (``W += scaling B A`` in
        float32, every adapter layer) for inference: the forward then runs plain linears, no
        adapter work per call, and equals the unmerged model within float32 rounding.
        :meth:`save_pretrained` writes a merged model as a plain one (no adapters). A model with
        several adapters is refused: one merged weight cannot serve them all (keep routing).
        Undo with :meth:`unmerge_adapters` (the weights come back within one rounding).

        Example:
            >>> model.merge_adapters()  # doctest: +SKIP
            >>> model.encode(["a query"], task="retrieval")  # doctest: +SKIP
        """
        names = self.adapter_names
        if len(names) != 1:
            raise ValueError(
                f"merge_adapters() folds one adapter into the weights; the model has {len(names)} "
                f"({list(names)}): "
                + (
                    "nothing to merge"
                    if not names
                    else "one merged weight cannot serve them all, so keep the routing (encode with task=...)"
                )
            )
        layers = [layer for _, layer in multi_lora_layers(self.backbone) if layer.merged_adapter is None]
        for layer in layers:
            layer.merge(names[0])

    def unmerge_adapters(self) -> None:
        """Undo :meth:`merge_adapters`: subtract the adapter from the weights again."""
        layers = [layer for _, layer in multi_lora_layers(self.backbone) if layer.merged_adapter is not None]
        if not layers:
            raise ValueError("unmerge_adapters(): no adapter is merged")
        for layer in layers:
            layer.unmerge()

    @property
    def merged(self) -> bool:
        """Whether an adapter is folded into the weights (:meth:`merge_adapters`)."""
        return any(layer.merged_adapter is not None for _, layer in multi_lora_layers(self.backbone))

    def resolve(self, task: Optional[str] = None, instruction=None) -> tuple[str, Optional[str]]:
        """(prefix, adapter) for texts of ``task`` / ``instruction``.

        The prefix comes from the prompt template (an instruction, or the task's prompt). The
        adapter: the template's mapping (jina-v3), else an adapter named like the task (such a
        task needs no template entry: it gets no prompt), else the only adapter of a
        one-adapter model, else the base weights (``None``)."""
        names = self.adapter_names
        if task is not None and task in names and task not in self.template.tasks:
            return resolve_prompt(self.template, instruction=instruction).prefix, task
        resolved = resolve_prompt(self.template, task=task, instruction=instruction)
        if not names:
            return resolved.prefix, None
        if resolved.adapter is not None:
            if resolved.adapter not in names:
                raise ValueError(
                    f"task {task!r} maps to adapter {resolved.adapter!r}, which the model lacks; "
                    f"adapters: {list(names)}"
                )
            return resolved.prefix, resolved.adapter
        if task in names:
            return resolved.prefix, task
        return resolved.prefix, names[0] if len(names) == 1 else None

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        pool_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        tasks: Tasks = None,
        normalize: Optional[bool] = None,
    ) -> torch.Tensor:
        """Embed token sequences.

        Args:
            input_ids: [B, L] padded (with ``attention_mask`` [B, L], 1 = real token) or [T]
                packed (with int32 ``cu_seqlens`` [B+1]).
            pool_mask: [B, L] or [T], bool or integer, nonzero = pool this position (e.g. the
                attention mask with the instruction tokens zeroed); default: every real token.
                Checked by pool()'s rule (:func:`~latentembed.modules.pooling_functions.check_pool_mask`)
                before the backbone runs.
            max_seqlen: the longest packed sequence (read from cu_seqlens when None).
            tasks: the adapter of each sample (names, ids, ``"base"``; a single name for all),
                for a model with adapters. ``None``: a one-adapter model uses its adapter,
                otherwise the base weights run.
            normalize: L2-normalise the result; ``None``: ``config.normalize``.

        Returns:
            [B, D] in the backbone's compute dtype.
        """
        if cu_seqlens is not None:
            checks.check_tensor("cu_seqlens", cu_seqlens)
        if isinstance(tasks, str):
            tasks = [tasks] * (cu_seqlens.shape[0] - 1 if cu_seqlens is not None else input_ids.shape[0])
        if tasks is not None and self.routing is None:
            raise ValueError("tasks were given but the model has no adapters (see add_adapters)")
        if pool_mask is not None and isinstance(input_ids, torch.Tensor):
            # pool()'s own check, made before the backbone runs: a zero-stride view stands in for
            # the hidden states [B, L, D] / [T, D] it will produce, so the message is pool()'s.
            hidden_like = input_ids[..., None].expand(*input_ids.shape, self.backbone.config.hidden_size)
            check_pool_mask(pool_mask, hidden_like, packed=cu_seqlens is not None)
        routed = lora_routing(self.backbone, tasks) if tasks is not None else contextlib.nullcontext()
        with routed:
            hidden = self.backbone(
                input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
            ).last_hidden_state
        keep = pool_mask
        if cu_seqlens is None and attention_mask is not None:
            keep = attention_mask.bool() if pool_mask is None else attention_mask.bool() & (pool_mask != 0)
        embeddings = self.pooling(hidden, keep, cu_seqlens=cu_seqlens)
        if self.config.normalize if normalize is None else normalize:
            # zero for a text with nothing to pool, with zero gradient (F.normalize sends g / eps)
            embeddings = l2_normalize(embeddings)
        return embeddings

    # -- texts ------------------------------------------------------------------------------
    def _require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "the model has no tokenizer: pass tokenizer= to from_pretrained (a directory "
                "with tokenizer.json) or set model.tokenizer = TextTokenizer.from_pretrained(path)"
            )
        return self.tokenizer

    def tokenize_texts(
        self, texts: Sequence[str], *, task: Optional[str] = None, instruction=None, max_length: Optional[int] = None
    ) -> TokenizedTexts:
        """Token ids and pool masks of ``texts`` with the prompt of ``task`` / ``instruction``."""
        tokenizer = self._require_tokenizer()
        prefix, _ = self.resolve(task, instruction)
        return tokenize_with_prompts(
            tokenizer,
            texts,
            prefix,
            max_length=self.config.max_length if max_length is None else max_length,
            add_eos=self.config.add_eos,
            mask_instruction=self.config.mask_instruction,
        )

    def tokenize(
        self, texts: Sequence[str], *, task: Optional[str] = None, instruction=None, max_length: Optional[int] = None
    ) -> tuple[PackedBatch, Optional[str], TokenizedTexts]:
        """One packed batch of ``texts``: (batch, adapter name or None, the tokenization)."""
        tokenized = self.tokenize_texts(texts, task=task, instruction=instruction, max_length=max_length)
        return pack_sequences(tokenized.input_ids, tokenized.pool_mask), self.resolve(task)[1], tokenized

    def batch_inputs(self, batch: PackedBatch, *, packed: Optional[bool] = None) -> tuple[tuple, dict]:
        """(args, kwargs) of the forward for one :class:`PackedBatch` (on the model's device).

        ``packed=None`` runs it packed (no compute or memory on padding) unless the backbone's
        attention backend for the device and compute dtype (autocast's, if on) is ``math``,
        whose packed mask is quadratic in the batch's tokens; flash, varlen and sdpa (one call
        per sequence, on CPU too) run packed input directly."""
        if packed is None:
            param = next(self.backbone.parameters())
            dtype = (
                torch.get_autocast_dtype(param.device.type)
                if torch.is_autocast_enabled(param.device.type)
                else param.dtype
            )
            packed = packed_runs_lean(self.backbone.attn_backend, param.device, dtype)
        if packed:
            return (batch.input_ids,), dict(
                pool_mask=batch.pool_mask, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen
            )
        pad = (
            self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        )
        ids, mask, pool_mask = batch.padded(pad)
        return (ids, mask), dict(pool_mask=pool_mask)

    def embed_batch(
        self,
        batch: PackedBatch,
        adapter: Optional[str] = None,
        *,
        packed: Optional[bool] = None,
        normalize: Optional[bool] = None,
    ) -> torch.Tensor:
        """Forward one :class:`PackedBatch` (on the model's device), every text with ``adapter``
        (``None``: the model's default); ``packed`` as in :meth:`batch_inputs`."""
        args, kwargs = self.batch_inputs(batch, packed=packed)
        tasks = None if adapter is None else [adapter] * batch.batch_size
        return self(*args, **kwargs, tasks=tasks, normalize=normalize)

    @torch.no_grad()  # not inference_mode: the result may serve as a target in a later backward
    def encode(
        self,
        texts: Union[str, Sequence[str]],
        *,
        task: Optional[str] = None,
        instruction=None,
        batch_size: int = 32,
        max_length: Optional[int] = None,
        normalize: Optional[bool] = None,
        show_progress: Optional[bool] = None,
        convert_to: str = "torch",
        dim: Optional[int] = None,
        devices: Optional[Sequence[str]] = None,
        precision: str = "float32",
        ranges: Optional[torch.Tensor] = None,
        calibration: Optional[torch.Tensor] = None,
    ):
        """Embed ``texts``, returned in input order.

        Args:
            texts: a list of strings ([N, D] result) or one string ([D]).
            task: a task of the model's prompt template, or an adapter name (see
                :meth:`resolve`). Documents usually take no task (query-side prompts).
            instruction: an explicit instruction, formatted by the template (overrides the
                task's instruction; the task still picks the adapter).
            batch_size: texts per forward; texts are sorted by length first, so a batch holds
                texts of similar length.
            max_length: truncation in tokens (default ``config.max_length``); truncated texts
                are reported in one warning.
            normalize: L2-normalise; ``None``: ``config.normalize``.
            show_progress: a progress line on stderr; ``None``: when there are more than
                ``8 * batch_size`` texts and stderr is a terminal.
            convert_to: ``"torch"`` (on the model's device; on the CPU with ``devices``) or
                ``"numpy"``.
            dim: keep the first ``dim`` dimensions ([N, dim]), renormalised when normalising (a
                model trained with ``--matryoshka`` including ``dim``); ``None``: all.
            devices: encode with one worker process per device (e.g. ``["cuda:0", "cuda:1"]``,
                ``["cpu", "cpu"]``; started for this call: keep an
                :class:`~latentembed.models.encode_pool.EncodePool` open to reuse them); the
                result is on the CPU, in input order, equal to one process's.
            precision: ``"float32"``, or quantised codes as sentence-transformers' ``encode``
                gives them: ``"int8"`` / ``"uint8"`` [N, D] (per-dimension buckets from
                ``ranges`` [2, D] or from ``calibration`` embeddings [M, D]; without either,
                from these texts' embeddings, with a warning), ``"binary"`` / ``"ubinary"``
                (sign bits packed, [N, ceil(D / 8)] int8 / uint8). See
                :mod:`latentembed.modules.quantization`.

        Threads: concurrent calls on one model are correct and run one at a time; each runs
        the module in eval mode and puts back the mode it found. Plain forwards (``model(...,
        tasks=...)``) from several threads route their own tasks, but share the module's mode:
        do not train a model in one thread while another encodes with it.
        """
        if convert_to not in ("torch", "numpy"):
            raise ValueError(f"convert_to must be 'torch' or 'numpy', got {convert_to!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        width = self.backbone.config.hidden_size
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= width):
            raise ValueError(f"dim must be an int in [1, {width}] (the embedding dimension), got {dim!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if (ranges is not None or calibration is not None) and precision not in ("int8", "uint8"):
            raise ValueError(f"ranges= / calibration= set the int8 / uint8 buckets; precision is {precision!r}")
        single = isinstance(texts, str)
        if single and ranges is None and calibration is None and precision in ("int8", "uint8"):
            raise ValueError(f"precision={precision!r} for one text needs ranges= or calibration= (its buckets)")
        texts = [texts] if single else list(texts)
        if devices is not None:
            from .encode_pool import EncodePool

            kwargs = dict(task=task, instruction=instruction, batch_size=batch_size, max_length=max_length)
            with EncodePool(self, devices) as pool:  # the workers take the prefix (dim) themselves
                out = pool.encode(texts, normalize=normalize, dim=dim, show_progress=False, **kwargs)
        else:
            # encode switches the module to eval mode and back: shared state, so concurrent calls
            # on one model take turns (the LoRA routing is per thread already, see adapter_routing).
            with _encode_lock(self):
                out = self._encode(
                    texts,
                    task=task,
                    instruction=instruction,
                    batch_size=batch_size,
                    max_length=max_length,
                    normalize=normalize,
                    show_progress=show_progress,
                )
            if dim is not None and dim < width:
                normalized = self.config.normalize if normalize is None else normalize
                out = embedding_prefix(out, dim, normalize=normalized)
        if precision != "float32":
            out = quantize_embeddings(out, precision, ranges=ranges, calibration=calibration)
        if single:
            out = out[0]
        return out.cpu().numpy() if convert_to == "numpy" else out

    def _encode(
        self,
        texts: list,
        *,
        task,
        instruction,
        batch_size: int,
        max_length: Optional[int],
        normalize: Optional[bool],
        show_progress: Optional[bool],
    ) -> torch.Tensor:
        """encode's work for a list of texts -> [N, D] float32 on the model's device."""
        tokenized = self.tokenize_texts(texts, task=task, instruction=instruction, max_length=max_length)
        adapter = self.resolve(task)[1]
        if any(tokenized.truncated):
            n = sum(tokenized.truncated)
            warnings.warn(
                f"{n} of {len(texts)} texts were longer than max_length="
                f"{self.config.max_length if max_length is None else max_length} tokens and were truncated",
                stacklevel=4,
            )
        param = next(self.backbone.parameters())
        order = sorted(range(len(texts)), key=lambda i: -len(tokenized.input_ids[i]))
        out = torch.empty(len(texts), self.backbone.config.hidden_size, dtype=torch.float32, device=param.device)
        if show_progress is None:
            show_progress = len(texts) > 8 * batch_size and sys.stderr.isatty()
        progress = _Progress(len(texts), enabled=show_progress)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = pack_sequences(
                    [tokenized.input_ids[i] for i in index], [tokenized.pool_mask[i] for i in index]
                ).to(param.device)
                embeddings = self.embed_batch(batch, adapter, normalize=normalize).float()
                out[torch.tensor(index, device=param.device)] = embeddings
                progress.update(len(index))
        finally:
            self.train(was_training)
            progress.close()
        return out

    # -- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **kwargs) -> EmbeddingModel:
        """Load a local directory as an instance of ``cls``; arguments and formats:
        :func:`latentembed.models.embedding_io.load_embedding_model`."""
        return embedding_io.load_embedding_model(cls, path, **kwargs)

    def save_pretrained(self, path: Union[str, Path], **kwargs) -> Path:
        """Write the model; see :func:`latentembed.models.embedding_io.save_embedding_model`."""
        return embedding_io.save_embedding_model(self, path, **kwargs)

    def save_adapters(self, path: Union[str, Path]) -> list:
        """Write every adapter as a PEFT LoRA directory ``path/<adapter>``; returns the paths."""
        return embedding_io.save_adapters(self, path)


# One lock per model for encode, kept outside the module: a lock attribute would stop the model
# from being deepcopied or pickled. Weak keys: a model's lock goes with the model.
_ENCODE_LOCKS: weakref.WeakKeyDictionary[EmbeddingModel, threading.RLock] = weakref.WeakKeyDictionary()
_ENCODE_LOCKS_GUARD = threading.Lock()


def _encode_lock(model: EmbeddingModel) -> threading.RLock:
    with _ENCODE_LOCKS_GUARD:
        lock = _ENCODE_LOCKS.get(model)
        if lock is None:
            lock = _ENCODE_LOCKS[model] = threading.RLock()
        return lock


class _Progress:
    """A one-line progress report on stderr (texts done, texts/s); a no-op when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            sys.stderr.write(f"\rencode: {self.done}/{self.total} texts ({rate:.0f}/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
