"""Peak memory per rank and step time of a full fine-tune step: FSDP2 (``train --fsdp``) against
DDP, with 2 and 4 gloo processes on CPU (a benchmark, not a test).

Each configuration runs the trainer itself (``train(TrainConfig(...), model)``) on ranks forked
from this process, one thread each, on a decoder big enough that its weights, gradients and
AdamW state (16 bytes a parameter in fp32) dominate a step's memory. Per rank it records every
step's peak resident set (the trainer's own ``StepMemory``: VmHWM reset before each step) and
the bytes of its local parameter shards; per step the wall time (rank 0's log). Prints a table
and writes JSON.

    python scripts/bench_fsdp_memory.py --worlds 2 4 --steps 4 --json fsdp_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(sizes: dict):
    import torch

    from latentembed.training.data import bundled_examples
    from latentembed.training.tiny import tiny_model, train_tokenizer, vocabulary_texts

    torch.manual_seed(0)  # the same initial weights on every rank
    rows = bundled_examples("retrieval")
    return tiny_model(train_tokenizer(vocabulary_texts(rows), vocab_size=4096), max_length=64, **sizes)


def _worker(rank: int, world: int, port: int, fsdp: bool, sizes: dict, steps: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from latentembed.training import logs
    from latentembed.training.trainer import TrainConfig, train

    peaks = []
    original = logs.StepMemory.peak_mib

    def record(self):
        value = original(self)
        peaks.append(value)
        return value

    logs.StepMemory.peak_mib = record
    model = _model(sizes)
    total = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        full=True,
        steps=steps,
        batch_size=4,
        hard_negatives=1,
        max_length=64,
        eval=False,
        fsdp=fsdp,
        stage2_data="none",
        log_every=1000,
        quiet=True,
        output=f"{out}/run",
    )
    result = train(cfg, model)
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in result["model"].parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peaks_mib": peaks, "local_params": local, "params": total}))


def run_config(world: int, fsdp: bool, sizes: dict, steps: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        mp.start_processes(
            _worker, args=(world, _free_port(), fsdp, sizes, steps, out), nprocs=world, join=True, start_method="fork"
        )
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        log = [json.loads(line) for line in Path(out, "run", "train_log.jsonl").read_text().splitlines()]
    step_s = [e["step_s"] for e in log if e.get("event") == "step"][1:]  # the first step warms up
    peaks = [max(r["peaks_mib"][1:]) for r in ranks]
    return {
        "world": world,
        "engine": "fsdp2" if fsdp else "ddp",
        "params": ranks[0]["params"],
        "local_params_per_rank": [r["local_params"] for r in ranks],
        "peak_rss_mib_per_rank": peaks,
        "peak_rss_mib_max": max(peaks),
        "step_s_median": statistics.median(step_s),
        "step_s": step_s,
        "wall_s": wall,
    }


def main() -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc keeps freed large blocks in its heap once its mmap threshold has grown, so the
        # resident set would still count the whole model each rank built before sharding it:
        # a fixed threshold returns every large tensor's memory on free, and RSS tracks what lives.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    sizes = dict(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64 // 4 or 1,
    )
    rows = []
    for world in args.worlds:
        for fsdp in (False, True):
            row = run_config(world, fsdp, sizes, args.steps)
            rows.append(row)
            print(
                f"world {world} {row['engine']:5s}: {row['params'] / 1e6:.1f} M params, local "
                f"{max(row['local_params_per_rank']) / 1e6:.1f} M/rank (16 B each: "
                f"{16 * max(row['local_params_per_rank']) / 2**20:,.0f} MiB of weights, gradients, AdamW), "
                "peak RSS per rank "
                f"{', '.join(f'{m:,.0f}' for m in row['peak_rss_mib_per_rank'])} MiB, "
                f"step {row['step_s_median']:.2f} s (median of {len(row['step_s'])})",
                flush=True,
            )
    if args.json:
        from latentembed.atomic_io import atomic_write_json

        atomic_write_json(args.json, {"sizes": sizes, "machine": os.uname().nodename, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
