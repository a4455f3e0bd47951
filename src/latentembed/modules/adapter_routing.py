"""Routing of multi-LoRA layers: which adapter each row of a layer input uses.

One :class:`LoRARouting` object is shared by every ``MultiLoRALinear`` of a model. The caller
sets the tasks of a batch once (``with lora_routing(model, tasks): model(...)``); the first
wrapped layer that runs turns them into a per-row adapter index, groups the rows by adapter
(``group_by_adapter``, one host sync) and caches the grouping keyed on the number of rows, so
every later layer of the same forward reuses it.

Routing semantics:
- ``tasks`` names or ids one adapter per sample (``-1`` = base layer only). Padded layer inputs
  ``[B, L, in]`` broadcast sample b's adapter over its L positions; with ``cu_seqlens`` [B+1]
  (packed input ``[N, in]`` or ``[1, N, in]``) sample b's adapter covers its tokens; with
  ``attention_mask`` [B, L], layer inputs holding only the real tokens (a model that unpads
  internally) are routed too; ``per_token=True`` takes one adapter per row instead. The rows of
  a layer input are matched by their count N, so one routing serves both layouts.
- Models that pack or unpad internally tell the routing their row order with
  :func:`sequence_layout` (the project's ``DecoderModel`` does), so per-sample tasks alone are
  enough for them: ``with lora_routing(model, tasks): model(ids, mask)`` works whether or not
  the model unpads.
- Activation checkpointing re-runs layers during the backward, after the ``with`` block. A
  model that checkpoints with :func:`checkpoint_context_fn` (``DecoderModel`` does) re-runs
  each layer with the routing it had in the forward, so several forwards with different
  routings may share one backward (query and passage batches of a contrastive step). Other
  checkpointing code gets a fallback: a layer called inside a backward pass with no routing set
  reuses the latest routing, which is right only when one routing served the whole graph.
- The routing set by :func:`lora_routing` / :func:`sequence_layout` is per thread, so threads
  sharing a model may run routed forwards with different tasks at once (the rest of the
  module's state, e.g. train / eval mode, stays shared). The checkpoint fallback's "latest
  routing" is one per model: it is what makes an unaware recompute on autograd's own threads
  work, and it assumes one routed graph at a time. The routing is eager-mode Python state,
  not meant to be traced into torch.compile graphs.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import nn

from ..ops.multi_lora import LoRAGrouping, group_by_adapter

__all__ = [
    "LoRARouting",
    "RoutedRows",
    "Tasks",
    "checkpoint_context_fn",
    "lora_routing",
    "model_routings",
    "sequence_layout",
]

Tasks = Union[torch.Tensor, Sequence[Union[str, int]]]


class RoutedRows(NamedTuple):
    """The adapters of the N rows of one layer input, as a MultiLoRALinear runs them.

    Attributes:
        index: [N] int64 adapter id of each row (-1: base only), on the input's device; ``None``
            when the layer needs no per-row ids (a merged adapter).
        grouping: the rows grouped by adapter (``group_by_adapter``), or ``None`` when no row
            uses an adapter.
        present: the adapter ids the rows use (a merged layer checks it against its adapter);
            ``None`` where it was not needed and not computed (ids given to an unmerged layer).
    """

    index: Optional[torch.Tensor]
    grouping: Optional[LoRAGrouping]
    present: Optional[frozenset]


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward on this thread.

    PyTorch has no public API for this; ``torch._C._current_graph_task_id`` (-1 outside a
    backward) is private, so it is looked up defensively: if a release drops it, the
    checkpoint fallback is off and an unrouted recompute raises instead of guessing.
    """
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def match_rows(
    lead: torch.Size, sample: Optional[torch.Tensor], packed: Optional[torch.Tensor], what: str
) -> tuple[torch.Tensor, bool]:
    """Adapter id of each of the N = prod(lead) rows of a layer input, from per-sample ids
    ``sample`` [B] or per-row ids ``packed`` [N], and whether the mapping is the per-sample
    broadcast (it then depends on lead[0] being the batch)."""
    rows = math.prod(lead)
    if packed is not None and packed.shape[0] == rows:
        return packed, False
    if sample is not None and len(lead) > 0 and lead[0] == sample.shape[0]:
        b = sample.shape[0]
        return sample[:, None].expand(b, rows // b).reshape(rows), True
    expected = []
    if sample is not None:
        expected.append(f"leading dim B = {sample.shape[0]} (per-sample tasks, padded [B, ...])")
    if packed is not None:
        expected.append(f"N = {packed.shape[0]} rows (per-token / packed tokens)")
    raise ValueError(
        f"{what}: the layer input's leading shape {tuple(lead)} ({rows} rows) does not fit the "
        f"routing: expected {' or '.join(expected)}; for packed input pass cu_seqlens (or "
        "attention_mask when the model unpads) to lora_routing"
    )


def group_rows(index: torch.Tensor, num_adapters: int, what: str):
    """``group_by_adapter`` (its one host sync also range-checks the ids), with an out-of-range
    id reported as an IndexError naming the layer, like every other bad adapter id here."""
    try:
        return group_by_adapter(index, num_adapters)
    except ValueError as e:
        raise IndexError(f"{what}: {e}") from None


def _grouping_to(grouping, device: torch.device):
    """The LoRAGrouping (a NamedTuple) with its tensors on ``device``."""
    if grouping.sorted_rows.device == device:
        return grouping
    moved = {k: v.to(device, non_blocking=True) for k, v in grouping._asdict().items() if isinstance(v, torch.Tensor)}
    return grouping._replace(**moved)


class _ThreadRouting(threading.local):
    """The routing of the forward running on the current thread (each thread sees its own)."""

    def __init__(self) -> None:
        self.index: Optional[torch.Tensor] = None  # [B] per-sample adapter ids, int64
        self.packed: Optional[torch.Tensor] = None  # [N] per-token ids (per_token, cu_seqlens, mask, layout)
        self.present: frozenset = frozenset()  # adapter ids used by the current routing
        self.groupings: dict = {}  # (rows, device) -> (index [N], LoRAGrouping or None, per-sample?)
        self.pinned = False  # a checkpoint recompute restored its forward's state: no fallback


def _thread_attr(name: str) -> property:
    return property(lambda self: getattr(self._thread, name), lambda self, v: setattr(self._thread, name, v))


class LoRARouting:
    """The adapter routing shared by all multi-LoRA layers of a model (one per model).

    Args:
        adapter_names: the T adapter names, in stacking order (adapter id = position).
        default_adapter: what a layer runs when no routing is set and it has no merged adapter:
            ``None`` raises, ``-1`` (or ``"base"``) runs the base weight, a name or id runs
            that adapter for every row.

    Example:
        >>> routing = LoRARouting(["query", "passage"], default_adapter="base")
        >>> routing.resolve(["passage", "base", 0]).tolist()
        [1, -1, 0]
    """

    def __init__(self, adapter_names: Sequence[str], default_adapter: Union[None, int, str] = None):
        names = tuple(adapter_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"adapter_names must be unique non-empty strings, got {list(adapter_names)}")
        self.adapter_names = names
        self.default_adapter = default_adapter
        # Set per forward, so per thread: two threads routing one model cannot see each
        # other's tasks. The other attributes are shared.
        self._thread = _ThreadRouting()
        self._default_groupings: dict = {}  # (rows, device) -> grouping of default_adapter, kept across forwards
        self._last: Optional[tuple] = None  # the latest routing of any thread, for the checkpoint fallback

    _index = _thread_attr("index")
    _packed = _thread_attr("packed")
    _present = _thread_attr("present")
    _groupings = _thread_attr("groupings")
    _pinned = _thread_attr("pinned")

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) starts unrouted: a routing belongs to a forward in flight,
        # and the thread-local holder cannot be pickled anyway.
        state = dict(self.__dict__)
        state["_thread"], state["_last"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread = _ThreadRouting()

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_names)

    @property
    def default_adapter(self) -> Optional[int]:
        """Adapter id run when no routing is set (``None``: raise; ``-1``: base only)."""
        return self._default

    @default_adapter.setter
    def default_adapter(self, value: Union[None, int, str]) -> None:
        self._default = None if value is None else self.adapter_id(value, "default_adapter")

    def adapter_id(self, task: Union[str, int], what: str = "task") -> int:
        """Adapter id of a name or id; ``-1`` / ``"base"`` mean the base layer only."""
        if isinstance(task, str):
            if task == "base":
                return -1
            if task not in self.adapter_names:
                raise KeyError(f"{what}: unknown adapter name {task!r}; known: {list(self.adapter_names)} (or 'base')")
            return self.adapter_names.index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"{what} must be an adapter name or int id, got {type(task).__name__}")
        if not -1 <= task < self.num_adapters:
            raise IndexError(f"{what}: adapter id {task} out of range [-1, {self.num_adapters})")
        return task

    def resolve(self, tasks: Tasks, check_range: bool = True) -> torch.Tensor:
        """Task names / ids (or an integer tensor) -> int64 adapter ids.

        A tensor's range check reads its min and max (one host sync); ``check_range=False``
        leaves it to a later ``group_by_adapter``, which checks while it syncs anyway."""
        if isinstance(tasks, torch.Tensor):
            if tasks.dtype.is_floating_point or tasks.dtype.is_complex or tasks.dtype == torch.bool:
                raise TypeError(
                    f"tasks tensor must have an integer dtype, got {str(tasks.dtype).replace('torch.', '')}"
                )
            if tasks.ndim != 1:
                raise ValueError(f"tasks tensor must have shape [B] (or [N] with per_token), got {tuple(tasks.shape)}")
            index = tasks.long()
            if check_range and index.numel():
                low, high = (int(v) for v in torch.stack([index.min(), index.max()]).cpu())
                self.check_ids(low, high, "tasks")
            return index
        if isinstance(tasks, (str, int)):
            raise TypeError(
                "tasks must be a sequence with one entry per sample (e.g. ['query'] * B), got a single "
                f"{type(tasks).__name__}"
            )
        return torch.tensor([self.adapter_id(t, f"tasks[{i}]") for i, t in enumerate(tasks)], dtype=torch.int64)

    def check_ids(self, low: int, high: int, what: str) -> None:
        """Raise IndexError unless host ints ``low`` .. ``high`` lie in [-1, T)."""
        if low < -1 or high >= self.num_adapters:
            raise IndexError(f"{what}: adapter ids must be in [-1, {self.num_adapters}), got min {low}, max {high}")

    def set(
        self,
        tasks: Tasks,
        cu_seqlens: Optional[torch.Tensor] = None,
        per_token: bool = False,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Route the next forward(s); see :func:`lora_routing` for the arguments."""
        index = self.resolve(tasks)
        if index.numel() == 0:
            raise ValueError("tasks is empty: give one adapter per sample")
        if sum(v is not None and v is not False for v in (cu_seqlens, attention_mask, per_token)) > 1:
            raise ValueError("pass at most one of cu_seqlens, attention_mask and per_token=True")
        sample, packed = (None, index) if per_token else (index, None)
        if cu_seqlens is not None:
            packed = torch.repeat_interleave(index.cpu(), self._lengths(cu_seqlens, index.shape[0]))
        if attention_mask is not None:
            if (
                not isinstance(attention_mask, torch.Tensor)
                or attention_mask.ndim != 2
                or attention_mask.shape[0] != index.shape[0]
                or attention_mask.dtype.is_floating_point
            ):
                raise ValueError(
                    f"attention_mask must be a bool/int tensor [B, L] with B = {index.shape[0]} tasks, "
                    f"got {getattr(attention_mask, 'shape', attention_mask)!r}"
                )
            # Rows of an unpadded layer input are the real tokens in row-major mask order.
            packed = torch.repeat_interleave(index.cpu(), attention_mask.bool().sum(-1).cpu())
        self._index, self._packed = sample, packed
        self._present = frozenset(torch.unique(index).tolist())
        self._groupings = {}
        self._last = self._state()

    def follow_sequences(self, lengths: torch.Tensor, total: int) -> None:
        """Route layer inputs that hold B sequences back to back (``lengths`` [B] rows each,
        ``total`` rows in all): sample b's adapter covers its rows. Per-token routings and
        routings already given the same packing (cu_seqlens / attention_mask) are kept.
        Called through :func:`sequence_layout`."""
        if self._index is None or (self._packed is not None and self._packed.shape[0] == total):
            return
        if lengths.ndim != 1 or lengths.shape[0] != self._index.shape[0]:
            raise ValueError(
                f"lora_routing was given {self._index.shape[0]} per-sample tasks, but the model's "
                f"input holds {lengths.shape[0] if lengths.ndim == 1 else tuple(lengths.shape)} sequences"
            )
        # On the lengths' device with a known output size: no host sync here (the grouping
        # that follows makes the one documented sync).
        index = self._index.to(lengths.device, non_blocking=True)
        self._packed = torch.repeat_interleave(index, lengths, output_size=total)
        self._groupings = {}
        self._last = self._state()

    @staticmethod
    def _lengths(cu_seqlens: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype.is_floating_point:
            raise TypeError(f"cu_seqlens must be an integer tensor [B+1], got {cu_seqlens!r:.80}")
        if cu_seqlens.shape[0] != batch + 1:
            raise ValueError(
                f"cu_seqlens must have shape [B+1] = [{batch + 1}] for {batch} tasks, got {tuple(cu_seqlens.shape)}"
            )
        cu = cu_seqlens.long().cpu()
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
        return lengths

    def clear(self) -> None:
        self._index, self._packed, self._present, self._groupings = None, None, frozenset(), {}

    def _state(self) -> tuple:
        return self._index, self._packed, self._present, self._groupings

    def _restore(self, state: tuple) -> None:
        self._index, self._packed, self._present, self._groupings = state

    @property
    def active(self) -> bool:
        return self._index is not None or self._packed is not None

    def row_index(self, lead: torch.Size, what: str) -> tuple[torch.Tensor, bool]:
        """Adapter id of each of the N = prod(lead) rows of a layer input (see :func:`match_rows`)."""
        return match_rows(lead, self._index, self._packed, what)

    def grouping(self, lead: torch.Size, device: torch.device, what: str):
        """(index [N], grouping or None when no row has an adapter) of the current routing, cached
        per number of rows N (and device): every layer of a forward reuses one grouping."""
        key = (math.prod(lead), device)
        hit = self._groupings.get(key)
        if hit is None:
            index, per_sample = self.row_index(lead, what)
            grouping = None
            if self._present - {-1}:
                # Grouped where the ids live: tasks given as names are on the host, so the
                # grouping costs no device sync; its small tables are then copied asynchronously.
                grouping = _grouping_to(group_rows(index, self.num_adapters, what), device)
            hit = self._groupings[key] = (index.to(device, non_blocking=True), grouping, per_sample)
        elif hit[2] and (len(lead) == 0 or lead[0] != self._index.shape[0]):
            self.row_index(lead, what)  # same row count, other layout: raises if it does not fit
        return hit[0], hit[1]

    def routed_rows(self, lead: torch.Size, device: torch.device, what: str) -> Optional[RoutedRows]:
        """The adapters of a layer input's N = prod(lead) rows under the routing set for this
        forward or, for a layer re-run by unaware checkpointing code, under the latest routing
        (the fallback of the module docstring); ``None`` when no routing applies. ``what`` names
        the layer in errors."""
        if self.active:
            return RoutedRows(*self.grouping(lead, device, what), self._present)
        replay = self.recompute_state()
        if replay is None:
            return None
        saved = self._state()
        self._restore(replay)
        try:
            return RoutedRows(*self.grouping(lead, device, what), self._present)
        finally:
            self._restore(saved)

    def default_rows(self, lead: torch.Size, device: torch.device, what: str) -> RoutedRows:
        """Every row of a layer input on ``default_adapter`` (which must be set). A constant
        routing: grouped once per row count and device, and kept across forwards."""
        default = self.default_adapter
        if default is None:
            raise ValueError("default_rows needs a default_adapter")
        key = (default, math.prod(lead), device)
        hit = self._default_groupings.get(key)
        if hit is None:
            index = torch.full((key[1],), default, dtype=torch.int64, device=device)
            grouping = group_rows(index, self.num_adapters, what) if default >= 0 else None
            hit = self._default_groupings[key] = RoutedRows(index, grouping, frozenset({default}))
        return hit

    def recompute_state(self) -> Optional[tuple]:
        """The routing a layer re-run by unaware checkpointing code should use (the fallback
        described in the module docstring), or None outside such a re-run."""
        if self.active or self._pinned or self._last is None or not in_backward_pass():
            return None
        return self._last

    def __repr__(self) -> str:
        return f"LoRARouting(adapters={list(self.adapter_names)}, active={self.active}, default={self.default_adapter})"


def model_routings(model: nn.Module) -> list[LoRARouting]:
    """The distinct routings of the multi-LoRA layers in ``model`` (empty when it has none)."""
    found = {}
    for module in model.modules():
        routing = getattr(module, "routing", None)
        if isinstance(routing, LoRARouting):
            found.setdefault(id(routing), routing)
    return list(found.values())


@contextlib.contextmanager
def lora_routing(
    model: nn.Module,
    tasks: Tasks,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    per_token: bool = False,
) -> Iterator[LoRARouting]:
    """Route every MultiLoRALinear of ``model`` for the forward(s) inside the block.

    Args:
        model: a model holding MultiLoRALinear layers (or one such layer).
        tasks: one adapter per sample: names, int ids (-1 / ``"base"`` = base only) or an
            integer tensor [B]; with ``per_token=True`` one per row of the layer inputs [N].
        cu_seqlens: [B+1] offsets of packed input: sample b's adapter covers its tokens
            (layer inputs [N, in] or [1, N, in]). Not needed for models that report their
            layout through :func:`sequence_layout` (``DecoderModel``).
        attention_mask: [B, L] of padded input to a model that unpads internally without
            :func:`sequence_layout`: layer inputs [B, L, in] broadcast per sample, inputs with
            one row per real token (in row-major mask order) take their sample's adapter.

    Rows are grouped by adapter once per distinct row count and reused by every layer; the
    previous routing is restored on exit (blocks nest).

    Example:
        >>> with lora_routing(model, ["retrieval.query", "classification"]):  # doctest: +SKIP
        ...     hidden = model(input_ids, attention_mask=mask)
    """
    routings = model_routings(model)
    if not routings:
        raise ValueError(f"{type(model).__name__} has no MultiLoRALinear layers (see apply_multi_lora)")
    saved = [r._state() for r in routings]
    try:
        for r in routings:
            r.set(tasks, cu_seqlens=cu_seqlens, per_token=per_token, attention_mask=attention_mask)
        yield routings[0]
    finally:
        for r, state in zip(routings, saved):
            r._restore(state)


@contextlib.contextmanager
def sequence_layout(model: nn.Module, cu_seqlens: torch.Tensor, total: int) -> Iterator[None]:
    """Hook for models that run sequences packed: inside the block, their layer inputs hold B
    sequences back to back at the offsets ``cu_seqlens`` [B+1] (integer, any device), ``total``
    rows in all.

    Active per-sample routings of ``model`` then map sample b's adapter onto its rows, so the
    caller of the model needs no ``cu_seqlens`` / ``attention_mask`` in :func:`lora_routing`.
    Free (no kernel, no sync) when the model has no multi-LoRA layer or no routing is set.

    Example (inside a model's forward that unpads padded input)::

        with sequence_layout(self, cu_seqlens, packed.shape[0]):
            out = self.run_packed(packed, cu_seqlens)
    """
    routings = [r for r in model_routings(model) if r.active]
    saved = [r._state() for r in routings]
    try:
        if routings:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            for r in routings:
                r.follow_sequences(lengths, total)
        yield
    finally:
        for r, state in zip(routings, saved):
            r._restore(state)


@contextlib.contextmanager
def _pinned(routings: list[LoRARouting], states: list[tuple]) -> Iterator[None]:
    saved = [(r._state(), r._pinned) for r in routings]
    try:
        for r, state in zip(routings, states):
            r._restore(state)
            r._pinned = True
        yield
    finally:
        for r, (state, pinned) in zip(routings, saved):
            r._restore(state)
            r._pinned = pinned


def checkpoint_context_fn(model: nn.Module) -> Callable[[], tuple]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:
    each checkpointed call records the routing of ``model`` when it runs, and its recompute in
    the backward runs under that routing, whatever routing is set by then.

    Example:
        >>> out = checkpoint(layer, hidden, use_reentrant=False,  # doctest: +SKIP
        ...                  context_fn=checkpoint_context_fn(model))
    """
    routings = model_routings(model)
    if not routings:
        return torch.utils.checkpoint.noop_context_fn

    def context_fn():
        return contextlib.nullcontext(), _pinned(routings, [r._state() for r in routings])

    return context_fn
