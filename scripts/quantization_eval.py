"""How much nDCG@10 each embedding precision keeps on a real retrieval set, and the bytes per vector.

    python scripts/quantization_eval.py --model DIR --data BEIR_DIR [--pooling mean] [--template e5]
        [--query-task retrieval] [--max-length 128] [--cache EMB.pt] [--json OUT.json]

Encodes the corpus and the queries once (float32; ``--cache`` keeps them for reruns), then
:func:`latentembed.evaluation.quantized.evaluate_precisions`: float32 exact search, int8 / uint8
(buckets calibrated on the corpus), binary / ubinary Hamming search, and Hamming top-40 with
float rescoring. Prints the table with encode time and peak resident memory.

The data: ``scripts/wiki_retrieval_set.py DUMP OUT --eval-articles F`` writes ``OUT/heldout/``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a directory EmbeddingModel.from_pretrained reads")
    p.add_argument(
        "--sentence-transformers",
        action="store_true",
        help="encode with sentence_transformers.SentenceTransformer(--model) instead (a reference model)",
    )
    p.add_argument("--data", required=True, help="a BEIR-style directory: corpus.jsonl, queries.jsonl, qrels.jsonl")
    p.add_argument("--pooling", default="mean")
    p.add_argument("--template", default="e5")
    p.add_argument("--query-task", default="retrieval")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", help="a .pt file holding (or to hold) the float embeddings")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentembed import EmbeddingModel
    from latentembed.atomic_io import atomic_write_json
    from latentembed.evaluation.data import load_retrieval_dataset
    from latentembed.evaluation.quantized import evaluate_precisions

    data = Path(args.data)
    corpus, queries, qrels = load_retrieval_dataset(data / "corpus.jsonl", data / "queries.jsonl", data / "qrels.jsonl")
    query_ids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    info = {"queries": len(query_ids), "docs": len(doc_ids)}
    if args.cache and Path(args.cache).is_file():
        saved = torch.load(args.cache)
        q_emb, d_emb = saved["queries"], saved["docs"]
        info["encode_s"] = saved.get("encode_s")
    elif args.sentence_transformers:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.model, device="cpu")
        t0 = time.perf_counter()
        d_emb = model.encode([corpus[d] for d in doc_ids], batch_size=args.batch_size, convert_to_tensor=True)
        q_emb = model.encode([queries[q] for q in query_ids], batch_size=args.batch_size, convert_to_tensor=True)
        info["encode_s"] = time.perf_counter() - t0
    else:
        model = EmbeddingModel.from_pretrained(
            args.model, pooling=args.pooling, prompt_template=args.template, max_length=args.max_length
        ).eval()
        t0 = time.perf_counter()
        d_emb = model.encode([corpus[d] for d in doc_ids], batch_size=args.batch_size)
        q_emb = model.encode([queries[q] for q in query_ids], task=args.query_task, batch_size=args.batch_size)
        info["encode_s"] = time.perf_counter() - t0
        if args.cache:
            torch.save({"queries": q_emb, "docs": d_emb, "encode_s": info["encode_s"]}, args.cache)
    t0 = time.perf_counter()
    rows = evaluate_precisions(q_emb, d_emb, query_ids=query_ids, doc_ids=doc_ids, qrels=qrels)
    info["evaluate_s"] = time.perf_counter() - t0
    info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(info))
    print("| precision | search | nDCG@10 | kept | recall@10 | bytes / vector |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['search']} | {r['ndcg@10']:.4f} | {100 * r['kept']:.1f} % | "
            f"{r['recall@10']:.4f} | {r['bytes_per_vector']} |"
        )
    if args.json:
        atomic_write_json(args.json, {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
