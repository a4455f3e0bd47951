"""Where a training step's activation memory goes: the tensors autograd saves, by operation.

    python scripts/step_memory_breakdown.py --model DIR [--causal] [--impl latentembed|st-peft]
        [--variant default|padded|stored-dropout|no-dropout]

Runs the forward of the ``train_step`` benchmark's step (:mod:`latentembed.bench.train_step_sides`:
8 queries + 8 positives + 8 hard negatives, max length 128, LoRA r=16 on every linear layer, mean
pooling, the InfoNCE loss) on the model directory, then walks the autograd graph from the loss
and adds up the bytes of every tensor a node saved for the backward, each storage counted once
(views of one storage, e.g. the normed input every q/k/v projection saves, count once), grouped
by the node's type. No backward runs: this is the activation memory the backward will need,
exactly, without the allocator's or the process's overhead (the benchmark's RSS has those).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from latentembed.bench.train_step_sides import VARIANTS, latentembed_side, st_peft_side


def saved_bytes_by_node(root: torch.Tensor) -> tuple[dict, int]:
    """({node type: bytes}, total) of the tensors saved by the graph behind ``root``; a storage
    shared by several nodes is counted once, for the first node that reaches it."""
    seen_nodes, seen_storages = set(), set()
    by_type: dict = defaultdict(int)
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        saved = []
        if hasattr(node, "saved_tensors"):  # custom autograd Functions
            try:
                saved += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
            except RuntimeError:
                pass
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except RuntimeError:
                    continue
                values = value if isinstance(value, (tuple, list)) else (value,)
                saved += [t for t in values if isinstance(t, torch.Tensor)]
        for t in saved:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in seen_storages or storage.nbytes() == 0:
                continue
            seen_storages.add(key)
            by_type[type(node).__name__] += storage.nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return dict(by_type), sum(by_type.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (e.g. SmolLM2 dequantised)")
    parser.add_argument("--variant", default="default", choices=sorted(VARIANTS), help="latentembed's variant")
    parser.add_argument("--impl", default="latentembed", choices=("latentembed", "st-peft"))
    parser.add_argument("--causal", action="store_true", help="causal attention (default bidirectional)")
    parser.add_argument("--top", type=int, default=12, help="node types to list")
    args = parser.parse_args(argv)
    spec = dict(
        model=args.model,
        device="cpu",
        causal=args.causal,
        checkpointing=False,
        batch=8,
        max_length=128,
        dropout=0.1,
        variant=args.variant,
    )
    torch.manual_seed(0)
    side = latentembed_side if args.impl == "latentembed" else st_peft_side
    _, _, loss_of_step = side(spec, with_loss=True)
    loss, real_tokens, positions = loss_of_step()
    by_type, total = saved_bytes_by_node(loss)
    about = f", variant {args.variant}: {VARIANTS[args.variant]}" if args.impl == "latentembed" else ""
    print(args.impl + about)
    print(f"real tokens {real_tokens}, positions computed {positions}; saved for the backward: {total / 2**20:.1f} MiB")
    for name, nbytes in sorted(by_type.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:<36} {nbytes / 2**20:>9.1f} MiB  {100 * nbytes / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
