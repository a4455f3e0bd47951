"""Data-parallel training: the process group (:class:`DistContext`, ``torchrun``'s env:// or
one process) and the model's wrapper (:func:`wrap_data_parallel`, DDP).

Every rank runs the same steps on its own slice of each global batch; the loss gathers the
other ranks' documents and DDP averages the gradients. Rank 0 alone logs, evaluates and saves.
"""

from __future__ import annotations

import datetime
import os

import torch
from torch import nn

__all__ = ["DistContext", "wrap_data_parallel"]


class DistContext:
    """This process's place in the run: ``on`` (more than one rank), ``rank``, ``world``.

    Made before anything else (the data plan depends on the rank): it starts the process group
    when ``WORLD_SIZE`` > 1 and none is running (nccl on CUDA, gloo on CPU), and :meth:`close`
    ends only a group it started.
    """

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
        """Rank 0's ``obj`` on every rank (picklable)."""
        if not self.on:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` (a detached tensor, reduced in place) over the ranks."""
        if self.on:
            self.dist.all_reduce(value)
            value /= self.world
        return value

    def barrier(self) -> None:
        """Wait for every rank (nothing with one process)."""
        if self.on:
            self.dist.barrier()

    def close(self) -> None:
        """End the process group if this context started it."""
        if self.owned:
            self.dist.destroy_process_group()


def wrap_data_parallel(
    model: nn.Module, device: torch.device, dist: DistContext, *, find_unused_parameters: bool
) -> nn.Module:
    """``model`` itself with one process, else ``model`` in DDP (the forward must go through
    the returned module for DDP to see it); ``find_unused_parameters``: some step may leave a
    trainable parameter unused."""
    if not dist.on:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )
