"""Chunked exact search against torch.topk of the full product and a brute-force tie-breaking spec."""

import pytest
import torch

from latentembed.evaluation.search import exact_search, exact_search_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _dyadic(*shape, dtype=torch.float32, device="cpu", steps=8):
    """Multiples of 1/steps in [-1, 1] (steps a power of two): dot products over D <= 16 dims
    with steps <= 1024 (or any D <= 2**18 with steps = 8) are exact in float32, so any chunking
    gives bit-identical scores. steps=8: ties are frequent (the chunk top-k falls back to a stable
    sort); steps=1024: ties are rare (the torch.topk path)."""
    return (torch.randint(-steps, steps + 1, shape) / steps).to(dtype=dtype, device=device)


def _brute_force_order(scores_row, k):
    return sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))[:k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("duplicates", [False, True])
def test_rare_ties_topk_path_matches_brute_force(device, duplicates):
    Q, N, D, k = 9, 403, 16, 11
    q, d = _dyadic(Q, D, device=device, steps=1024), _dyadic(N, D, device=device, steps=1024)
    if duplicates:  # exact ties between documents in different chunks and inside one chunk
        d[[5, 17, 18, 300]] = d[[250, 250, 120, 120]]
        q[0] = d[250]
    full_l = (q @ d.T).cpu().tolist()
    expected = [_brute_force_order(row, k) for row in full_l]
    for chunk_size in (1, 7, 64, 1000):
        scores, idx = exact_search(q, d, k, chunk_size=chunk_size, query_chunk_size=4)
        assert idx.cpu().tolist() == expected, chunk_size
        assert scores.cpu().tolist() == [[row[j] for j in order] for row, order in zip(full_l, expected)]
    if duplicates:
        assert expected[0][:3] == [5, 17, 250]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "Q,N,D,k",
    [
        pytest.param(*s, id="Q{}-N{}-D{}-k{}".format(*s))
        for s in [(1, 1, 1, 1), (3, 127, 5, 10), (17, 50, 33, 50), (5, 9, 60, 100), (2, 300, 3, 7)]
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000], ids=lambda c: f"chunk{c}")
def test_matches_topk_and_breaks_ties_by_lower_index(device, Q, N, D, k, chunk_size):
    q, d = _dyadic(Q, D, device=device), _dyadic(N, D, device=device)
    scores, idx = exact_search(q, d, k, chunk_size=chunk_size, query_chunk_size=3)
    keep = min(k, N)
    assert scores.shape == idx.shape == (Q, keep)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert scores.device == idx.device == q.device
    full = q @ d.T
    torch.testing.assert_close(scores, torch.topk(full, keep, dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(scores, torch.gather(full, 1, idx), rtol=0, atol=0)
    full_l = full.cpu().tolist()
    assert idx.cpu().tolist() == [_brute_force_order(row, keep) for row in full_l]
    ref_scores, ref_idx = exact_search_reference(q, d, k)
    assert torch.equal(ref_idx, idx) and torch.equal(ref_scores, scores)


@pytest.mark.parametrize("Q,N,D", [(7, 1001, 24), (130, 77, 9)])
def test_random_floats_match_topk(Q, N, D):
    q, d = torch.randn(Q, D), torch.randn(N, D)
    scores, idx = exact_search(q, d, 13, chunk_size=64, query_chunk_size=50)
    full = q @ d.T
    top = torch.topk(full, 13, dim=1)
    # Chunked and full products may round differently in the last bit; compare values, and check
    # the returned indices score what they claim.
    torch.testing.assert_close(scores, top.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.gather(full, 1, idx), scores, rtol=1e-5, atol=1e-5)
    assert (idx.sort(dim=1).values == top.indices.sort(dim=1).values).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs_accumulate_in_float32(dtype):
    q, d = _dyadic(4, 96, dtype=dtype), _dyadic(31, 96, dtype=dtype)
    scores, idx = exact_search(q, d, 5, chunk_size=8)
    assert scores.dtype == torch.float32
    ref_scores, ref_idx = exact_search_reference(q.float(), d.float(), 5)
    assert torch.equal(scores, ref_scores) and torch.equal(idx, ref_idx)
    # mixed dtypes are fine: both sides are cast to float32
    s2, i2 = exact_search(q.float(), d, 5)
    assert torch.equal(s2, ref_scores) and torch.equal(i2, ref_idx)


def test_empty_inputs():
    s, i = exact_search(torch.randn(0, 4), torch.randn(6, 4), 3)
    assert s.shape == i.shape == (0, 3)
    s, i = exact_search(torch.randn(2, 4), torch.randn(0, 4), 3)
    assert s.shape == i.shape == (2, 0)


def test_errors_name_the_argument():
    q, d = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="k: expected a positive int, got 0"):
        exact_search(q, d, 0)
    with pytest.raises(ValueError, match="k:"):
        exact_search(q, d, True)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int, got 0"):
        exact_search(q, d, 3, chunk_size=0)
    with pytest.raises(ValueError, match="query_chunk_size"):
        exact_search(q, d, 3, query_chunk_size=-1)
    with pytest.raises(ValueError, match=r"query_embeddings: expected shape \[n, D\], got \(8,\)"):
        exact_search(q[0], d, 3)
    with pytest.raises(ValueError, match="doc_embeddings: expected shape"):
        exact_search(q, d[None], 3)
    with pytest.raises(TypeError, match="doc_embeddings: expected a floating-point dtype, got torch.int64"):
        exact_search(q, d.long(), 3)
    with pytest.raises(TypeError, match="query_embeddings: expected a torch.Tensor"):
        exact_search(q.numpy(), d, 3)
    with pytest.raises(ValueError, match="doc_embeddings: expected dimension D=8"):
        exact_search(q, torch.randn(10, 7), 3)
    with pytest.raises(ValueError, match="doc_embeddings: expected device cpu"):
        exact_search(q, d.to("meta"), 3)
    bad = d.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match="doc_embeddings: contains NaN"):
        exact_search(q, bad, 3)
    bad = q.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="query_embeddings: contains NaN or infinite"):
        exact_search(bad, d, 3)
