"""The learning curve of the demo as a PNG (matplotlib is optional: without it, no plot)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..atomic_io import atomic_write_bytes

__all__ = ["plot_learning_curve"]


def plot_learning_curve(
    path: Path,
    steps: Sequence[int],
    ndcg: Sequence[float],
    *,
    baselines: dict,
    title: str,
    say: Callable[[str], None] = print,
) -> Optional[Path]:
    """nDCG@10 against the training step, with each ``baselines`` value (name -> nDCG@10) as a
    horizontal line, written atomically to ``path``; None (and one line said) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        say("  no plot: matplotlib is not installed (pip install matplotlib, or the [demo] extra)")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(list(steps), list(ndcg), marker="o", label="fine-tuned (LoRA)")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, linestyle="--", color=f"C{i + 1}", label=f"{name} {value:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("nDCG@10 on held-out articles")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
