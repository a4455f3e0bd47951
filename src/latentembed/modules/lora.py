"""Multi-LoRA linear layers: T task adapters on one frozen base weight, chosen per sample or token.

:class:`MultiLoRALinear` wraps an nn.Linear; :func:`apply_multi_lora` injects it into a model by
module name. All wrapped layers of a model share one :class:`LoRARouting` (see
:mod:`latentembed.modules.adapter_routing`, re-exported here): the caller sets the tasks of a batch
once (``with lora_routing(model, tasks): model(...)``) and every layer of the forward reuses one
grouping of the rows by adapter. The per-layer work is one call of the fused op
``multi_lora_linear_add`` (no Python loop over adapters, no merged weight).

With no routing set, a layer runs its merged adapter (see :meth:`MultiLoRALinear.merge`) or the
``default_adapter`` of the routing object; when that is ``None`` (the default) it raises,
because silently running the base weight where adapters were expected is the worse failure.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.multi_lora import multi_lora_linear_add
from .adapter_routing import LoRARouting, RoutedRows, group_rows, lora_routing, match_rows
from .lora_dropout import draw_seed, multi_lora_add_with_dropout

__all__ = ["LoRARouting", "MultiLoRALinear", "apply_multi_lora", "lora_routing", "multi_lora_layers"]

PerAdapter = Union[int, float, Sequence, dict]


def _per_adapter(name: str, value: PerAdapter, adapters: Sequence[str]) -> list:
    """Expand a scalar, a sequence of len T or a {adapter name: value} dict to a list of len T."""
    if isinstance(value, dict):
        unknown = set(value) - set(adapters)
        missing = [a for a in adapters if a not in value]
        if unknown or missing:
            raise ValueError(
                f"{name} dict must have one entry per adapter {list(adapters)}; "
                f"unknown {sorted(unknown)}, missing {missing}"
            )
        return [value[a] for a in adapters]
    if isinstance(value, (list, tuple)):
        if len(value) != len(adapters):
            raise ValueError(f"{name} must have one value per adapter ({len(adapters)}), got {len(value)}")
        return list(value)
    return [value] * len(adapters)


def _kaiming_uniform_rows(a: torch.Tensor) -> None:
    # The init nn.Linear and PEFT give a weight of this fan-in: kaiming_uniform(a=sqrt(5)).
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class MultiLoRALinear(nn.Module):
    """An nn.Linear plus T stacked LoRA adapters; each row of the input uses one (or none).

    ``y_n = x_n W^T + bias + scaling[t] * (dropout(x_n) A_t^T) B_t^T`` with ``t`` the adapter of
    row n (``-1``: the adapter term is skipped). ``A`` is ``lora_a`` [T, r_max, in] and ``B`` is
    ``lora_b`` [T, out, r_max]; adapter t uses its first ``ranks[t]`` rows of A / columns of B
    (the rest stay zero and get zero gradient), ``scaling[t] = alpha_t / ranks[t]``
    (``alpha_t / sqrt(ranks[t])`` with ``use_rslora``). The base ``weight`` / ``bias`` are the
    wrapped layer's own Parameters (same state-dict keys as the nn.Linear), frozen by default.

    Args:
        base: the nn.Linear to wrap.
        adapters: adapter names, or a count T (names ``"0"``, ``"1"``, ...).
        rank: int, one per adapter (sequence or {name: rank}); 0 disables an adapter here.
        alpha: same forms; ``None`` means alpha = rank (scaling 1).
        r_max: stacked rank (default: the largest rank). dropout: probability on the adapter
            input in training mode (:mod:`latentembed.modules.lora_dropout`: the mask is
            regenerated from a seed in the backward instead of stored).
        routing: the shared :class:`LoRARouting` (a private one is made if ``None``).
        backend: backend of the fused op (``"auto"``, ``"reference"``, ``"triton"``, ...).

    Input ``[..., in]`` -> output ``[..., out]``, like nn.Linear. The adapter of each row comes
    from ``forward(x, adapter_index=...)`` ([N] per row or [x.shape[0]] per sample) or else from
    the shared routing (:func:`lora_routing`).

    Example:
        >>> layer = MultiLoRALinear(nn.Linear(16, 8), ["query", "passage"], rank=4, alpha=8)
        >>> with lora_routing(layer, ["query", "passage", "base"]):
        ...     y = layer(torch.randn(3, 5, 16))
        >>> y.shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        base: nn.Linear,
        adapters: Union[int, Sequence[str]],
        rank: PerAdapter,
        alpha: PerAdapter = None,
        *,
        r_max: Optional[int] = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        freeze_base: bool = True,
        routing: Optional[LoRARouting] = None,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        names = [str(i) for i in range(adapters)] if isinstance(adapters, int) else list(adapters)
        self.routing = routing if routing is not None else LoRARouting(names)
        if list(self.routing.adapter_names) != names:
            raise ValueError(f"adapters {names} differ from the routing's {list(self.routing.adapter_names)}")
        ranks = [int(r) for r in _per_adapter("rank", rank, names)]
        alphas = _per_adapter("alpha", rank if alpha is None else alpha, names)
        r_max = max(ranks) if r_max is None else int(r_max)
        if r_max < 1 or any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be >= 0 with r_max >= 1, got ranks {ranks}, r_max {r_max}")
        for t, r in enumerate(ranks):
            if r > r_max:
                raise ValueError(f"rank of adapter {names[t]!r} is {r} > r_max = {r_max}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.zeros(len(names), r_max, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(len(names), self.out_features, r_max, **factory))
        self.ranks = [0] * len(names)
        self.scalings = [0.0] * len(names)
        self.use_rslora = use_rslora
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout_p = float(dropout)
        self.backend = backend
        self.merged_adapter: Optional[int] = None
        self.layer_name = ""  # set by apply_multi_lora, for error messages
        self._scaling_cache: dict = {}
        for t in range(len(names)):
            self.reset_adapter(t, ranks[t], alphas[t])

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @property
    def r_max(self) -> int:
        return self.lora_a.shape[1]

    def _what(self) -> str:
        return f"MultiLoRALinear {self.layer_name!r}" if self.layer_name else "MultiLoRALinear"

    def _set_scaling(self, t: int, rank: int, scaling: float) -> None:
        self.ranks[t], self.scalings[t] = rank, float(scaling) if rank else 0.0
        self._scaling_cache = {}

    def reset_adapter(self, adapter: Union[int, str], rank: int, alpha: float) -> None:
        """(Re)initialise one adapter like PEFT: A kaiming-uniform, B zero (the layer starts as the base)."""
        t = self.routing.adapter_id(adapter, "adapter")
        self._check_rank(t, rank)
        with torch.no_grad():
            self.lora_a[t].zero_()
            self.lora_b[t].zero_()
            if rank:
                _kaiming_uniform_rows(self.lora_a[t, :rank])
        self._set_scaling(t, rank, alpha / (math.sqrt(rank) if self.use_rslora else rank) if rank else 0.0)

    def _check_rank(self, t: int, rank: int) -> None:
        if t < 0:
            raise IndexError("adapter -1 is the base layer and has no weights")
        if not 0 <= rank <= self.r_max:
            raise ValueError(
                f"{self._what()}: rank {rank} of adapter {self.routing.adapter_names[t]!r} must be in "
                f"[0, r_max = {self.r_max}]"
            )

    def set_adapter_weights(self, adapter: Union[int, str], a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Replace adapter ``adapter`` with ``a`` [rank, in], ``b`` [out, rank] and ``scaling``."""
        t = self.routing.adapter_id(adapter, "adapter")
        rank = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or a.shape[1] != self.in_features or b.ndim != 2 or tuple(b.shape) != (self.out_features, rank):
            raise ValueError(
                f"{self._what()}: expected a [rank, {self.in_features}] and b [{self.out_features}, rank], "
                f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
            )
        self._check_rank(t, rank)
        with torch.no_grad():
            self.lora_a[t].zero_()
            self.lora_b[t].zero_()
            self.lora_a[t, :rank].copy_(a)
            self.lora_b[t, :, :rank].copy_(b)
        self._set_scaling(t, rank, scaling)

    def adapter_weights(self, adapter: Union[int, str]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [rank, in], B [out, rank], scaling) of one adapter (views of the stacked weights)."""
        t = self.routing.adapter_id(adapter, "adapter")
        self._check_rank(t, 0)
        rank = self.ranks[t]
        return self.lora_a[t, :rank], self.lora_b[t, :, :rank], self.scalings[t]

    def scaling_tensor(self, device: torch.device) -> torch.Tensor:
        """scaling [T] float32 on ``device`` (kept out of the state dict's float buffers so that
        ``model.to(bfloat16)`` cannot round it)."""
        cached = self._scaling_cache.get(device)
        if cached is None:
            cached = self._scaling_cache[device] = torch.tensor(self.scalings, dtype=torch.float32, device=device)
        return cached

    def get_extra_state(self) -> dict:
        return {
            "adapters": list(self.routing.adapter_names),
            "ranks": list(self.ranks),
            "scalings": list(self.scalings),
            "merged_adapter": self.merged_adapter,
        }

    def set_extra_state(self, state: dict) -> None:
        if state["adapters"] != list(self.routing.adapter_names):
            raise ValueError(
                f"{self._what()}: checkpoint adapters {state['adapters']} != {list(self.routing.adapter_names)}"
            )
        if state.get("merged_adapter") != self.merged_adapter:
            raise ValueError(
                f"{self._what()}: checkpoint has merged adapter {state.get('merged_adapter')}, this "
                f"layer {self.merged_adapter}; merge or unmerge before loading"
            )
        for t, (rank, scaling) in enumerate(zip(state["ranks"], state["scalings"])):
            self._check_rank(t, rank)
            self._set_scaling(t, rank, scaling)

    def delta_weight(self, adapter: Union[int, str]) -> torch.Tensor:
        """scaling_t * B_t A_t [out, in], computed in float32 (float64 for float64 weights)."""
        a, b, scaling = self.adapter_weights(adapter)
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return scaling * (b.detach().to(acc) @ a.detach().to(acc))

    @torch.no_grad()
    def merge(self, adapter: Union[int, str]) -> None:
        """Add adapter ``adapter`` into ``weight`` for single-task serving (no per-call LoRA work).

        While merged, only rows routed to that adapter (or unrouted calls) may run; routing any
        other adapter or -1 raises (unmerge first). The adapter gets no gradient while merged.
        """
        t = self.routing.adapter_id(adapter, "adapter")
        if t < 0:
            raise ValueError("cannot merge adapter -1 (the base layer)")
        if self.merged_adapter is not None:
            raise RuntimeError(
                f"{self._what()}: adapter {self.routing.adapter_names[self.merged_adapter]!r} is "
                "already merged; call unmerge() first"
            )
        delta = self.delta_weight(t)
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged_adapter = t

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again: the weight comes back within one rounding of its
        dtype (bit-exact where ``w + d - d`` rounds back), not bit-exact in general."""
        if self.merged_adapter is None:
            raise RuntimeError(f"{self._what()}: no adapter is merged")
        delta = self.delta_weight(self.merged_adapter)
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged_adapter = None

    def _routed(self, x: torch.Tensor, adapter_index: Optional[torch.Tensor]) -> RoutedRows:
        """The adapters of this call's rows: from ``adapter_index``, else the shared routing, else
        the merged adapter, else the routing's default. ``present`` is only computed (and only
        needed) while an adapter is merged."""
        lead = x.shape[:-1]
        what = self._what()
        routing = self.routing
        if adapter_index is not None:
            # [N] gives one adapter per row, [x.shape[0]] one per sample (identical when 2-D).
            ids = routing.resolve(adapter_index, check_range=False)
            index = match_rows(lead, ids, ids, what)[0].to(x.device)
            if self.merged_adapter is not None:  # no grouping needed, only the ids present
                present = frozenset(torch.unique(index).tolist())  # the one host sync
                if present:
                    routing.check_ids(min(present), max(present), "adapter_index")
                return RoutedRows(None, None, present)
            # The one host sync: group_by_adapter reads the counts and checks the id range.
            grouping = group_rows(index, self.num_adapters, what)
            return RoutedRows(index, grouping if grouping.num_active else None, None)
        routed = routing.routed_rows(lead, x.device, what)
        if routed is not None:
            return routed
        if self.merged_adapter is not None:
            return RoutedRows(None, None, frozenset({self.merged_adapter}))
        if routing.default_adapter is None:
            raise RuntimeError(
                f"{what}: no adapter routing is set. Call the model inside "
                "`with lora_routing(model, tasks):`, pass adapter_index=, or give the routing a "
                "default_adapter (-1 = base only)"
            )
        return routing.default_rows(lead, x.device, what)

    def forward(self, x: torch.Tensor, adapter_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self._what()}: input must have shape [..., {self.in_features}], got {got}")
        index, grouping, present = self._routed(x, adapter_index)
        if self.merged_adapter is not None:
            if present != {self.merged_adapter}:
                names = sorted(self.routing.adapter_names[t] if t >= 0 else "base" for t in present)
                raise RuntimeError(
                    f"{self._what()}: adapter {self.routing.adapter_names[self.merged_adapter]!r} is "
                    f"merged into the weight, but the batch routes {names}; unmerge() first"
                )
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = F.linear(x2, self.weight, self.bias)
        if grouping is not None:
            # The adapter path runs in the base output's dtype (bf16 under autocast, whatever the
            # input and the LoRA weights are stored in); the casts are differentiable and free
            # when dtypes already agree.
            dt = out.dtype
            args = (out, x2.to(dt), self.lora_a.to(dt), self.lora_b.to(dt), self.scaling_tensor(x.device), grouping)
            if self.training and self.dropout_p > 0:
                # The mask is regenerated from the seed in the backward: no mask and no dropped
                # copy of x are kept (see modules/lora_dropout.py).
                out = multi_lora_add_with_dropout(*args, p=self.dropout_p, seed=draw_seed(), backend=self.backend)
            else:
                out = multi_lora_linear_add(*args, backend=self.backend, validate=False)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={list(self.routing.adapter_names)}, ranks={self.ranks}, r_max={self.r_max}, "
            f"dropout={self.dropout_p}, merged={self.merged_adapter}"
        )


def multi_lora_layers(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    """(name, layer) of every MultiLoRALinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            yield name, module


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_multi_lora(
    model: nn.Module,
    target_modules: Sequence[str],
    adapters: Union[int, Sequence[str]],
    rank: PerAdapter,
    alpha: PerAdapter = None,
    *,
    r_max: Optional[int] = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    freeze_base: bool = True,
    default_adapter: Union[None, int, str] = None,
    backend: str = "auto",
) -> LoRARouting:
    """Replace every nn.Linear of ``model`` whose name ends with a target by a MultiLoRALinear.

    ``target_modules`` are name suffixes (``"q_proj"`` matches ``layers.0.self_attn.q_proj``)
    or full module names. All wrapped layers share one :class:`LoRARouting`, which is returned
    (and used by :func:`lora_routing`). ``freeze_base`` freezes the wrapped layers' weight and
    bias only; freeze the rest of the model yourself. Other arguments as in MultiLoRALinear.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> routing = apply_multi_lora(model, ["0", "2"], ["query", "passage"], rank=2, alpha=4)
        >>> with lora_routing(model, ["passage", "query"]):
        ...     model(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    names = [str(i) for i in range(adapters)] if isinstance(adapters, int) else list(adapters)
    if any(True for _ in multi_lora_layers(model)):
        raise ValueError("model already has MultiLoRALinear layers; apply_multi_lora once with every adapter")
    routing = LoRARouting(names, default_adapter)
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    bad = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
    if bad:
        raise TypeError(f"target_modules {list(target_modules)} match modules that are not nn.Linear: {bad[:5]}")
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules {list(target_modules)} match no module; nn.Linear names: {linears[:8]}")
    for name, linear in found:
        layer = MultiLoRALinear(
            linear,
            names,
            rank,
            alpha,
            r_max=r_max,
            dropout=dropout,
            use_rslora=use_rslora,
            freeze_base=freeze_base,
            routing=routing,
            backend=backend,
        )
        layer.layer_name = name
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return routing
