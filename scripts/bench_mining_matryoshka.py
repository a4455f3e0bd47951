"""Mined vs same-article hard negatives, and nDCG@10 per Matryoshka dimension, on the real
Wikipedia retrieval set with a real model (a measurement, not a test).

    python scripts/wiki_retrieval_set.py DUMP.xml.bz2 wiki --eval-articles 0.3
    python scripts/bench_mining_matryoshka.py --model SMOLLM2_DIR --set wiki --out runs --steps 15

Two LoRA runs from the same base with the same recipe (``--matryoshka`` over four prefixes):
one on ``wiki/train.jsonl`` as built (negatives: other sections of the same article), one on
the same rows with negatives mined by the base model (``latentembed mine``'s function:
top-30, NV-Retriever's 0.95 ratio rule). Each model (and the base) is evaluated on the held-out
articles once at full width; every Matryoshka dimension reuses those embeddings (truncated and
renormalised, exactly what ``encode(..., dim=k)`` returns). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


class _Cached:
    """An encoder for evaluate_retrieval over precomputed full-width embeddings, cut to ``dim``."""

    def __init__(self, table: dict, dim: int) -> None:
        self.table, self.dim = table, dim

    def encode(self, texts, batch_size=32, **kwargs):
        from latentembed.modules.matryoshka import embedding_prefix

        return embedding_prefix(torch.stack([self.table[t] for t in texts]), self.dim)


def _per_dim(model, eval_set, dims, max_length: int) -> dict:
    from latentembed.evaluation import evaluate_retrieval

    queries = list(eval_set.queries.values())
    docs = list(eval_set.corpus.values())
    table = dict(zip(docs, model.encode(docs, batch_size=16, max_length=max_length)))
    table.update(zip(queries, model.encode(queries, task="retrieval", batch_size=16, max_length=max_length)))
    out = {}
    for dim in dims:
        encoder = _Cached(table, dim)
        scores = evaluate_retrieval(encoder, eval_set.corpus, eval_set.queries, eval_set.qrels, k_values=(10,))
        out[dim] = round(scores["ndcg@10"], 4)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--set", required=True, help="wiki_retrieval_set.py's output directory (with --eval-articles)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--dims", default="64,144,288,576")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    from latentembed.models.embedding import EmbeddingModel
    from latentembed.training.data import load_eval_set, read_examples
    from latentembed.training.mining import mine_hard_negatives, write_examples
    from latentembed.training.trainer import TrainConfig, train

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dims = [int(d) for d in args.dims.split(",")]
    eval_set = load_eval_set(Path(args.set) / "heldout")
    rows = read_examples(Path(args.set) / "train.jsonl")
    report = {"rows": len(rows), "heldout_queries": len(eval_set.queries), "dims": dims, "steps": args.steps}

    base = EmbeddingModel.from_pretrained(args.model, pooling="mean", prompt_template="e5")  # as train uses it
    t0 = time.perf_counter()
    report["base"] = _per_dim(base, eval_set, dims, args.max_length)
    report["eval_s"] = time.perf_counter() - t0
    print("base", report["base"], flush=True)
    t0 = time.perf_counter()
    mined, stats = mine_hard_negatives(base, rows, num_negatives=1, candidates=30, max_length=args.max_length)
    report["mining"] = {**stats.__dict__, "seconds": time.perf_counter() - t0}
    write_examples(out / "mined.jsonl", mined)
    print("mining", report["mining"], flush=True)
    del base

    recipe = dict(
        model=args.model,
        pooling="mean",
        stage2_data="none",
        steps=args.steps,
        batch_size=8,
        hard_negatives=1,
        max_length=args.max_length,
        lr=1e-4,
        eval=False,
        matryoshka=tuple(dims),
        quiet=True,
        log_every=1,
    )
    for arm, data in (("same_article", Path(args.set) / "train.jsonl"), ("mined", out / "mined.jsonl")):
        t0 = time.perf_counter()
        result = train(TrainConfig(**recipe, data=str(data), output=str(out / arm)))
        report[arm] = _per_dim(result["model"], eval_set, dims, args.max_length)
        report[arm + "_train_s"] = time.perf_counter() - t0
        report[arm + "_losses"] = [round(e["loss"], 4) for e in result["loss_history"]]
        print(arm, report[arm], flush=True)
    if args.json:
        from latentembed.atomic_io import atomic_write_json

        atomic_write_json(args.json, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
