"""The decoder backbone of LLM embedding models: Mistral / Llama / Qwen2, bidirectional by default.

Module names match Hugging Face checkpoints without the ``model.`` prefix (``embed_tokens``,
``layers.N.self_attn.q_proj``, ``layers.N.mlp.gate_proj``, ``norm``), so state dicts load as is
(see :mod:`latentembed.models.checkpoint`). There is no LM head: an embedding model needs the
hidden states only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..modules.adapter_routing import checkpoint_context_fn, sequence_layout
from ..modules.attention import (
    PACKED_ONLY,
    AttentionInputs,
    GroupedQueryAttention,
    dense_packed_mask,
    dense_padding_mask,
    host_seqlens,
    packed_runs_lean,
    select_attention_backend,
)
from ..modules.mlp import SwiGLUMLP
from ..modules.norms import RMSNorm
from ..modules.rotary import RotaryEmbedding, packed_positions, padded_positions
from ..ops import checks
from .decoder_config import DecoderConfig


@dataclass
class DecoderOutput:
    """``last_hidden_state``: final-norm output, [B, L, D] (padding rows are 0) or [T, D].
    ``hidden_states``: with ``output_hidden_states=True``, the embeddings and every layer's
    output before the final norm (``num_hidden_layers + 1`` tensors, same layout)."""

    last_hidden_state: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``.

    Shapes: ``hidden`` [B, L, D] or [T, D]; ``cos``/``sin`` [B, L, d] or [T, d].
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = GroupedQueryAttention(
            c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.qkv_bias, c.o_bias
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLUMLP(c.hidden_size, c.intermediate_size, c.mlp_bias)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inputs: AttentionInputs
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, inputs)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderModel(nn.Module):
    """Token embeddings, ``num_hidden_layers`` decoder layers and the final RMSNorm.

    Args:
        config: the :class:`DecoderConfig`.
        causal: default attention mode; ``False`` (bidirectional, padding-only mask) suits
            embedding models, ``True`` is the original LLM's full causal attention. Sliding-window
            attention is not implemented (``config.sliding_window`` is ignored), so a model
            trained with one (Mistral-7B-v0.1: 4096) differs from it on sequences longer than
            the window.
        attn_backend: default attention backend, ``"auto"`` or one of flash, varlen, sdpa, math.

    Attributes:
        gradient_checkpointing: recompute each layer in the backward (saves activations).

    Multi-LoRA (:mod:`latentembed.modules.lora`): when the model packs its input (``cu_seqlens``,
    or padded input unpadded internally) it reports the row order through
    :func:`~latentembed.modules.adapter_routing.sequence_layout`, so ``with lora_routing(model,
    tasks): model(ids, mask)`` routes per sample whatever the layout; checkpointed layers are
    recomputed under the routing they ran with.

    Example:
        >>> cfg = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
        ...                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = DecoderModel(cfg)
        >>> ids = torch.randint(0, 128, (2, 7))
        >>> mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        >>> model(ids, mask).last_hidden_state.shape
        torch.Size([2, 7, 64])
        >>> cu = torch.tensor([0, 7, 11], dtype=torch.int32)   # the same tokens, packed
        >>> model(ids[mask.bool()], cu_seqlens=cu).last_hidden_state.shape
        torch.Size([11, 64])
    """

    def __init__(self, config: DecoderConfig, causal: bool = False, attn_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.attn_backend = attn_backend
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def compile_layers(self, **kwargs) -> None:
        """``torch.compile`` every decoder layer in place (``nn.Module.compile``: parameter
        names, checkpoints and adapter targets are unchanged). The layer has no graph break;
        compiling fuses its norms, rotary and SwiGLU elementwise work. With the varlen/flash
        backends ``max_seqlen`` is a Python int, so a new longest length may recompile; pass
        ``dynamic=True`` for training on varied batches (not measured on a GPU yet)."""
        for layer in self.layers:
            layer.compile(**kwargs)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        causal: Optional[bool] = None,
        attn_backend: Optional[str] = None,
        unpad: Union[bool, str] = "auto",
        output_hidden_states: bool = False,
        validate: bool = True,
    ) -> DecoderOutput:
        """Run the backbone on padded or packed tokens.

        Args:
            input_ids: [B, L] (padded) or [T] (packed, with ``cu_seqlens``).
            attention_mask: [B, L], 1/True = real token (left or right padding); padded only.
            cu_seqlens: int32 [B+1] sequence offsets of packed input.
            max_seqlen: longest packed sequence (read from ``cu_seqlens`` when needed and None).
            inputs_embeds: [B, L, D] or [T, D] instead of ``input_ids``.
            position_ids: integer [B, L] or [T]; default counts real tokens from 0 in every
                sequence.
            causal / attn_backend: override the model's defaults for this call.
            unpad: padded input only: ``True`` packs the real tokens, runs packed and re-pads
                (no compute or memory on padding); ``"auto"`` does so unless the attention
                backend is ``math`` (flash, varlen and sdpa run packed input without padding;
                see :mod:`latentembed.modules.attention`); ``False`` never.
            output_hidden_states: also return every layer's output.
            validate: check the values of ``cu_seqlens`` and that the token ids are in
                ``[0, vocab_size)`` (one host sync each; skipped under torch.compile).

        Every tensor argument must be on the model's device. Padding positions (``attention_mask``
        0) never influence real tokens, whatever they hold: their ``input_ids`` are not looked
        up (a pad id of -1 or -100 is fine), their ``inputs_embeds`` are replaced by zeros (NaN
        or inf there cannot leak through the attention's ``0 * v``), their ``position_ids`` are
        unused, and they receive zero gradient.

        Returns:
            :class:`DecoderOutput` in the input's layout.
        """
        causal = self.causal if causal is None else causal
        backend = attn_backend or self.attn_backend
        packed = cu_seqlens is not None
        if packed and attention_mask is not None:
            raise ValueError("pass either attention_mask (padded input) or cu_seqlens (packed input), not both")
        source = self._check_token_input(input_ids, inputs_embeds, packed)
        source_name = "input_ids" if input_ids is not None else "inputs_embeds"
        lead = tuple(source.shape[: 1 if packed else 2])  # (T,) or (B, L)
        mask = None
        if packed:
            self._check_device("cu_seqlens", cu_seqlens)
            checks.check_cu_seqlens(cu_seqlens, lead[0], source_name, values=validate)
        elif attention_mask is not None:
            self._check_mask(attention_mask, lead, source_name)
            mask = attention_mask.bool()
        if position_ids is not None:
            self._check_position_ids(position_ids, lead, source_name)
        hidden = self._embed(input_ids, inputs_embeds, mask, validate)
        compute_dtype = self._compute_dtype(hidden)
        if packed:
            positions = packed_positions(cu_seqlens, hidden.shape[0]) if position_ids is None else position_ids
            name = select_attention_backend(backend, hidden.device, compute_dtype, packed=True)
            return self._run_packed(hidden, positions, cu_seqlens, max_seqlen, causal, name, output_hidden_states)

        B, L, _ = hidden.shape
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
        if unpad == "auto":
            unpad = packed_runs_lean(backend, hidden.device, compute_dtype)
        if unpad or backend in PACKED_ONLY:
            return self._run_unpadded(hidden, mask, position_ids, causal, backend, compute_dtype, output_hidden_states)
        name = select_attention_backend(backend, hidden.device, compute_dtype, packed=False)
        positions = padded_positions(mask) if position_ids is None else position_ids
        inputs = AttentionInputs(name, causal, dense_mask=dense_padding_mask(mask, causal))
        last, states = self._run_layers(hidden, positions, inputs, output_hidden_states)
        # Padding rows carry finite values that no real token saw; return zeros there so the
        # padded result equals the unpadded one.
        keep = mask.unsqueeze(-1)
        last = torch.where(keep, last, 0.0)
        if states is not None:
            states = tuple(torch.where(keep, s, 0.0) for s in states)
        return DecoderOutput(last, states)

    # -- argument checks -------------------------------------------------------------------

    def _check_device(self, name: str, tensor: torch.Tensor) -> None:
        # A tensor elsewhere (meta, another GPU) would be read as garbage by some kernels
        # (an embedding lookup of meta ids returns uninitialised memory) instead of failing.
        checks.check_same_device(name, tensor, "the model's parameters", self.embed_tokens.weight)

    def _check_token_input(self, input_ids, inputs_embeds, packed: bool) -> torch.Tensor:
        """The given one of ``input_ids`` / ``inputs_embeds``, checked (type, shape, dtype, device)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            checks.check_tensor("input_ids", input_ids)
            want = 1 if packed else 2
            if input_ids.ndim != want:
                layout = "[T] with cu_seqlens" if packed else "[B, L] (or [T] with cu_seqlens)"
                raise ValueError(f"input_ids must have {want} dims {layout}, got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must be an integer tensor, got {checks.dtype_name(input_ids.dtype)}")
            self._check_device("input_ids", input_ids)
            return input_ids
        checks.check_tensor("inputs_embeds", inputs_embeds)
        want = 2 if packed else 3
        if inputs_embeds.ndim != want or inputs_embeds.shape[-1] != self.config.hidden_size:
            layout = "[T, D]" if packed else "[B, L, D]"
            raise ValueError(
                f"inputs_embeds must have shape {layout} with D = {self.config.hidden_size}, "
                f"got {tuple(inputs_embeds.shape)}"
            )
        self._check_device("inputs_embeds", inputs_embeds)
        return inputs_embeds

    def _check_mask(self, mask: torch.Tensor, lead: tuple, source_name: str) -> None:
        checks.check_tensor("attention_mask", mask)
        if tuple(mask.shape) != lead:
            raise ValueError(
                f"attention_mask must have shape [B, L] = {lead} (from {source_name}), got {tuple(mask.shape)}"
            )
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"attention_mask must be bool or integer (1 = real), got {checks.dtype_name(mask.dtype)}")
        self._check_device("attention_mask", mask)

    def _check_position_ids(self, position_ids: torch.Tensor, lead: tuple, source_name: str) -> None:
        checks.check_tensor("position_ids", position_ids)
        if tuple(position_ids.shape) != lead:
            raise ValueError(
                f"position_ids must have the shape of {source_name} {lead}, got {tuple(position_ids.shape)}"
            )
        dtype = position_ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {checks.dtype_name(dtype)}")
        self._check_device("position_ids", position_ids)

    def _check_token_range(self, ids: torch.Tensor) -> None:
        """Token ids in [0, vocab_size), else a ValueError naming the first bad one (the embedding
        itself says only "index out of range in self", or fails a device-side assert on a GPU)."""
        vocab = self.embed_tokens.num_embeddings
        if ids.numel() == 0 or ids.device.type == "meta":
            return
        lo, hi = torch.stack((ids.min(), ids.max())).tolist()  # one host read for both bounds
        if lo >= 0 and hi < vocab:
            return
        bad = lo if lo < 0 else hi
        where = tuple((ids == bad).nonzero()[0].tolist())
        raise ValueError(
            f"input_ids must be token ids in [0, {vocab}) (vocab_size {vocab}), got {bad} at position "
            f"{where}; is the tokenizer the model's?"
        )

    # -- internals -------------------------------------------------------------------------

    def _embed(self, input_ids, inputs_embeds, mask: Optional[torch.Tensor], validate: bool) -> torch.Tensor:
        """Embeddings [B, L, D] or [T, D]; rows where ``mask`` [B, L] is False are zeros."""
        if input_ids is not None:
            if mask is not None:
                # Padding ids are never looked up: pads of -1 or -100 are common conventions.
                input_ids = torch.where(mask, input_ids, 0)
            if validate and not torch.compiler.is_compiling():
                self._check_token_range(input_ids)
            hidden = self.embed_tokens(input_ids)
        else:
            hidden = inputs_embeds
        if mask is not None:
            # Real queries give padding keys probability 0, but 0 * NaN (or inf) in P @ V is NaN:
            # only zeroing the padding rows keeps them out of the real tokens (and their grads).
            hidden = torch.where(mask.unsqueeze(-1), hidden, 0.0)
        return hidden

    @staticmethod
    def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
        """dtype the attention sees: the autocast dtype when autocast is on."""
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return hidden.dtype

    def _run_layers(self, hidden, positions, inputs: AttentionInputs, output_hidden_states: bool):
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        states = [hidden] if output_hidden_states else None
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        # The recompute runs in the backward, possibly under another LoRA routing (several
        # forwards, one backward): record this forward's routing for it.
        context_fn = checkpoint_context_fn(self) if recompute else None
        for layer in self.layers:
            if recompute:
                hidden = checkpoint(layer, hidden, cos, sin, inputs, use_reentrant=False, context_fn=context_fn)
            else:
                hidden = layer(hidden, cos, sin, inputs)
            if states is not None:
                states.append(hidden)
        return self.norm(hidden), (tuple(states) if states is not None else None)

    def _run_packed(self, hidden, positions, cu_seqlens, max_seqlen, causal, name, output_hidden_states):
        inputs = AttentionInputs(name, causal, cu_seqlens=cu_seqlens)
        if name in PACKED_ONLY:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            inputs.max_seqlen = max_seqlen
        elif name == "sdpa":
            # One attention call per sequence (the lengths are read once here, not per layer).
            inputs.seqlens = host_seqlens(cu_seqlens)
        else:
            inputs.dense_mask = dense_packed_mask(cu_seqlens, hidden.shape[0], causal)
        # Per-sample LoRA routing (if any) must know which rows belong to which sequence.
        with sequence_layout(self, cu_seqlens, hidden.shape[0]):
            last, states = self._run_layers(hidden, positions, inputs, output_hidden_states)
        return DecoderOutput(last, states)

    def _run_unpadded(self, hidden, mask, position_ids, causal, backend, compute_dtype, output_hidden_states):
        B, L, D = hidden.shape
        # One host sync for the number of real tokens: the packed shapes depend on it.
        index = mask.reshape(-1).nonzero().squeeze(1)
        lengths = mask.sum(-1)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=hidden.device)
        cu[1:] = lengths.cumsum(0)
        packed = hidden.reshape(B * L, D).index_select(0, index)
        if position_ids is not None:
            positions = position_ids.reshape(-1).index_select(0, index)
        else:
            positions = packed_positions(cu, packed.shape[0])
        name = select_attention_backend(backend, hidden.device, compute_dtype, packed=True)
        max_seqlen = int(lengths.max()) if name in PACKED_ONLY else None
        out = self._run_packed(packed, positions, cu, max_seqlen, causal, name, output_hidden_states)

        def repad(x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(B * L, x.shape[-1]).index_copy(0, index, x).view(B, L, x.shape[-1])

        states = tuple(repad(s) for s in out.hidden_states) if out.hidden_states is not None else None
        return DecoderOutput(repad(out.last_hidden_state), states)

    def reset_buffers(self, device: Optional[torch.device] = None) -> None:
        """Recompute non-persistent buffers (rotary frequencies), e.g. after meta-device loading."""
        self.rotary_emb.reset_parameters(device)
