"""Autotuning policy shared by the Triton kernels: how many configurations to try, and the
size classes that autotune keys use.

``LATENTEMBED_AUTOTUNE`` (read when a kernel module is first imported, and by the kernels' pruning
functions at their first launch): ``all`` (the default) tunes over every configuration that
survives a kernel's own pruning; ``first`` keeps only the first one (no tuning, one compile per
specialisation); an integer N keeps the first N. ``scripts/gpu_check.sh`` runs its tests with
``first`` (the tests check results, not speed) and its quick benchmarks with ``2``: each Triton
compile costs seconds of the one call's minutes. Each kernel lists its best-guess configuration
first, and every listed configuration compiles without register spills for the H100
(``tests/ops/compile_*_sm90.py``).

Autotune keys name what changes the best configuration. Sizes enter as :func:`size_class`
(the next power of two), so a new batch size retunes only when it changes class.
"""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "autotune_limit", "select_configs", "size_class"]

ENV_VAR = "LATENTEMBED_AUTOTUNE"


def autotune_limit() -> int:
    """How many configurations a kernel keeps: ``LATENTEMBED_AUTOTUNE`` = ``all`` (unset; 0: no
    limit), ``first`` (1) or a positive integer."""
    mode = os.environ.get(ENV_VAR, "all").strip().lower() or "all"
    if mode == "all":
        return 0
    if mode == "first":
        return 1
    if mode.isdigit() and int(mode) > 0:
        return int(mode)
    raise ValueError(f"{ENV_VAR} must be 'all', 'first' or a positive integer, got {mode!r}")


def select_configs(configs: list) -> list:
    """``configs`` (a kernel's GPU list, best guess first) under the current limit.

    Example:
        >>> select_configs(["a", "b", "c"]) if autotune_limit() == 0 else ["a", "b", "c"]
        ['a', 'b', 'c']
    """
    limit = autotune_limit()
    return list(configs[:limit]) if limit else list(configs)


def size_class(n: int) -> int:
    """The autotune size class of ``n``: the next power of two (1 for n <= 1).

    Example:
        >>> [size_class(n) for n in (1, 3, 4096, 4100)]
        [1, 4, 4096, 8192]
    """
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
