"""Gathered InfoNCE on 2 CPU processes (gloo) equals the single-process loss on the whole batch.

One spawn runs every case (process start-up dominates). Each rank holds B queries and its own
documents; the single-process reference sees the concatenated batch with explicit positive
indices and owners. With reduction="sum" the ranks' losses add up to the reference loss and
each rank's embedding gradients are the reference's rows; with "mean" each rank's loss is the
mean over its queries, so the ranks' mean is the reference loss and the embedding gradients are
W times the reference's (DDP's gradient averaging divides the parameter gradients by W).
"""

import datetime
import inspect
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentembed.modules.contrastive import infonce_loss
from latentembed.modules.distributed import all_gather_with_grad
from latentembed.ops.infonce import infonce_lse

NEEDS_POS_KEY = pytest.mark.xfail(
    "pos_key" not in inspect.signature(infonce_lse).parameters, reason="needs infonce_lse(pos_key=)", strict=False
)

WORLD = 2
B, K, D = 3, 2, 8
CASES = {
    "plain-sum": dict(reduction="sum"),
    "mean": dict(reduction="mean"),
    "no-in-batch": dict(reduction="sum", in_batch_negatives=False),
    "everything": dict(
        reduction="sum", symmetric=True, query_query=True, doc_doc=True, mask_duplicates=True, margin=0.95
    ),
    "dot-threshold": dict(reduction="none", similarity="dot", threshold=4.0, symmetric=True),
    # equal sizes on both ranks (rank 1's extra documents dropped), stated by the caller
    "same-sizes": dict(reduction="sum", symmetric=True, same_sizes=True),
}
EQUAL = ("same-sizes",)


def make_rank_data():
    """Per rank: queries [B, D], documents [B*(1+K) (+2 extra on rank 1), D] (positives first,
    sentence-transformers' block order), with a duplicate of rank 0's positive on rank 1."""
    data = []
    for r in range(WORLD):
        q = torch.randn(B, D, dtype=torch.float64)
        docs = torch.cat(
            [
                q + 0.7 * torch.randn(B, D, dtype=torch.float64),
                q.repeat(K, 1) + torch.randn(B * K, D, dtype=torch.float64),
            ]
        )
        if r == 1:  # unequal sizes exercise the padded gather; extra docs belong to no query
            docs = torch.cat([docs, torch.randn(2, D, dtype=torch.float64)])
        data.append([q, docs])
    data[1][1][B] = data[0][1][0]  # rank 1's first hard negative duplicates rank 0's first positive
    return data


def layout(rank_docs):
    """pos_index [B] and doc_owner [N] of one rank's positives-first block layout."""
    n = rank_docs.shape[0]
    owner = torch.full((n,), -1)
    owner[: B * (1 + K)] = torch.arange(B).repeat(1 + K)
    return torch.arange(B), owner


def single_process(data, options):
    """Reference on the concatenated batch; returns loss, grad per rank of (queries, docs)."""
    options = {k: v for k, v in options.items() if k != "same_sizes"}
    qs = [q.clone().requires_grad_(True) for q, _ in data]
    ds = [d.clone().requires_grad_(True) for _, d in data]
    pos, owner, offset = [], [], 0
    for r, d in enumerate(ds):
        p, o = layout(d)
        pos.append(p + offset)
        owner.append(torch.where(o >= 0, o + r * B, o))
        offset += d.shape[0]
    loss = infonce_loss(
        torch.cat(qs),
        torch.cat(ds),
        torch.cat(pos),
        temperature=0.1,
        backend="reference",
        doc_owner=None if options.get("in_batch_negatives", True) else torch.cat(owner),
        **options,
    )
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype) if loss.ndim else torch.ones((), dtype=loss.dtype)
    loss.backward(up.reshape(loss.shape))
    return loss.detach(), [(q.grad, d.grad) for q, d in zip(qs, ds)]


def _worker(rank, port, data, out_dir):
    os.environ.pop("LATENTEMBED_BACKEND", None)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        calls = {"all_gather": 0}
        all_gather = dist.all_gather

        def counting_all_gather(*args, **kwargs):  # collectives per loss call
            calls["all_gather"] += 1
            return all_gather(*args, **kwargs)

        dist.all_gather = counting_all_gather
        for name, options in CASES.items():
            calls["all_gather"] = 0
            q = data[rank][0].clone().requires_grad_(True)
            d = data[rank][1][: B * (1 + K)] if name in EQUAL else data[rank][1]
            d = d.clone().requires_grad_(True)
            try:
                # Layout by N = B*(1+K) on rank 0; explicit pos_index/doc_owner where the rank has extras.
                if d.shape[0] == B * (1 + K):
                    loss = infonce_loss(q, d, temperature=0.1, backend="reference", **options)
                else:
                    pos, owner = layout(d)
                    loss = infonce_loss(
                        q,
                        d,
                        pos,
                        temperature=0.1,
                        backend="reference",
                        doc_owner=None if options.get("in_batch_negatives", True) else owner,
                        **options,
                    )
                forward_gathers = calls["all_gather"]
                n = loss.numel()
                up = (
                    torch.linspace(0.5, 1.5, n * WORLD, dtype=loss.dtype)[rank * n : (rank + 1) * n]
                    if n > 1
                    else torch.ones(())
                )
                loss.backward(up.reshape(loss.shape).to(loss.dtype))
                results[name] = (loss.detach(), q.grad, d.grad, forward_gathers)
            except Exception as exc:  # noqa: BLE001 - reported by the test of this case
                results[name] = exc
        dist.all_gather = all_gather
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)  # unequal rows
        gathered = all_gather_with_grad(x)
        (gathered * torch.arange(1.0, 4.0)[:, None]).sum().backward()
        results["gather"] = (gathered.detach(), x.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results():
    torch.manual_seed(1234)
    data = make_rank_data()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_worker, args=(free_port(), data, out_dir), nprocs=WORLD, join=False)
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("distributed workers did not finish within 120 s")
        yield data, [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("case", [pytest.param(c, marks=[NEEDS_POS_KEY] if c == "everything" else []) for c in CASES])
def test_gathered_loss_equals_single_process(rank_results, case):
    data, results = rank_results
    for r in range(WORLD):
        if isinstance(results[r][case], Exception):
            raise results[r][case]
    if case in EQUAL:
        data = [(q, d[: B * (1 + K)]) for q, d in data]
    options = CASES[case]
    loss, grads = single_process(data, options)
    losses = [results[r][case][0] for r in range(WORLD)]
    reduction = options["reduction"]
    factor = WORLD if reduction == "mean" else 1
    if reduction == "none":
        torch.testing.assert_close(torch.cat(losses), loss, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(sum(losses) / factor, loss, rtol=1e-10, atol=1e-12)
    for r in range(WORLD):
        _, q_grad, d_grad, _ = results[r][case]
        torch.testing.assert_close(q_grad, factor * grads[r][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d_grad, factor * grads[r][1], rtol=1e-10, atol=1e-12)


def test_collectives_per_call(rank_results):
    """Unequal sizes: one size exchange for all gathers, then the gathers themselves; stated equal
    sizes: no exchange; stage 2 (no in-batch negatives): nothing gathered at all."""
    _, results = rank_results
    for r in range(WORLD):
        assert results[r]["plain-sum"][3] == 2  # sizes + documents
        assert results[r]["same-sizes"][3] == 2  # documents + queries (symmetric), no sizes
        assert results[r]["dot-threshold"][3] == 3  # sizes + documents + queries
        assert results[r]["no-in-batch"][3] == 0


def test_all_gather_with_grad_unequal_rows(rank_results):
    _, results = rank_results
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for r in range(WORLD):
        gathered, grad = results[r]["gather"]
        torch.testing.assert_close(gathered, expected)
        # every rank's loss weights row j by (j + 1): the owner gets the sum over ranks
        own = torch.arange(1.0, 4.0)[:1] if r == 0 else torch.arange(1.0, 4.0)[1:]
        torch.testing.assert_close(grad, WORLD * own[:, None].expand(-1, 2))


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
