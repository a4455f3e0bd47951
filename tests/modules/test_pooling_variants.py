"""Pooling variants (mean, last, first, weighted mean, latent attention) against a direct
per-sequence loop in float64; left vs right padding, padded vs packed, instruction exclusion."""

import pytest
import torch

from latentembed.modules.latent_attention import LatentAttentionPooling
from latentembed.modules.pooling import POOLING_MODES, Pooling, pool
from latentembed.modules.pooling_functions import pack_pool_rows, segment_of_row
from tests.tolerances import assert_within_budget

SIMPLE_MODES = ["mean", "last", "first", "weighted_mean"]
LENGTHS = [[1], [3, 0, 7, 1], [127, 5], [0]]


def loop_pool(tokens, mode):
    """The spec: one sequence's pooled token rows [n, D] -> [D] in float64, by a direct loop."""
    tokens = tokens.double()
    n, D = tokens.shape
    if n == 0:
        return torch.zeros(D, dtype=torch.float64)
    if mode == "mean":
        return sum(tokens[i] for i in range(n)) / n
    if mode == "last":
        return tokens[n - 1]
    if mode == "first":
        return tokens[0]
    return sum((i + 1) * tokens[i] for i in range(n)) / (n * (n + 1) / 2)


def sequences(lengths, D, dtype=torch.float32):
    return [torch.randn(n, D, dtype=dtype) for n in lengths]


def right_padded(seqs, L, D, dtype):
    hidden = torch.randn(len(seqs), L, D, dtype=dtype)  # padding holds garbage, never pooled
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for b, s in enumerate(seqs):
        hidden[b, : len(s)] = s
        mask[b, : len(s)] = True
    return hidden, mask


def left_padded(seqs, L, D, dtype):
    hidden = torch.randn(len(seqs), L, D, dtype=dtype)
    mask = torch.zeros(len(seqs), L, dtype=torch.int64)  # integer masks work like bool
    for b, s in enumerate(seqs):
        if len(s):
            hidden[b, L - len(s) :] = s
            mask[b, L - len(s) :] = 1
    return hidden, mask


def packed(seqs, D, dtype):
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    return torch.cat(seqs).to(dtype) if seqs else torch.zeros(0, D, dtype=dtype), cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", SIMPLE_MODES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "lens" + "-".join(map(str, x)))
def test_modes_match_a_per_sequence_loop_with_gradients(mode, lengths, dtype):
    D = 37
    seqs = sequences(lengths, D, dtype)
    exact = torch.stack([loop_pool(s, mode) for s in seqs])
    hidden, mask = right_padded(seqs, max(max(lengths), 1) + 2, D, dtype)
    hidden.requires_grad_()
    out = pool(hidden, mask, mode=mode)
    # PyTorch's own low-precision result: the loop in hidden's dtype.
    lowp = torch.stack(
        [
            loop_pool(s.to(dtype), mode).to(dtype)
            if mode in ("last", "first")
            else loop_pool(s, mode).float().to(dtype)
            for s in seqs
        ]
    )
    assert_within_budget(mode, out, lowp, exact)

    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, hidden, grad_out)
    # d out_b / d h_{b, i} = w_{b, i} (the mode's weight of position i) times the identity
    expected = torch.zeros_like(hidden, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for i in range(n):
            w = {
                "mean": 1 / n,
                "last": float(i == n - 1),
                "first": float(i == 0),
                "weighted_mean": (i + 1) / (n * (n + 1) / 2),
            }[mode]
            expected[b, i] = w * grad_out[b].double()
    assert_within_budget(f"grad {mode}", grad, (expected.to(dtype)), expected)


@pytest.mark.parametrize("mode", SIMPLE_MODES + ["latent_attention"])
def test_left_and_right_padding_and_packed_agree(mode):
    D, lengths = 24, [4, 0, 9, 1, 6]
    seqs = sequences(lengths, D)
    latent = LatentAttentionPooling(
        hidden_size=D, num_latents=5, num_heads=2, dim_head=8, ff_mult=2, backend="reference"
    )
    kw = dict(mode=mode, latent_attention=latent)
    right = pool(*right_padded(seqs, 11, D, torch.float32), **kw)
    left = pool(*left_padded(seqs, 11, D, torch.float32), **kw)
    rows, cu = packed(seqs, D, torch.float32)
    torch.testing.assert_close(left, right, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pool(rows, cu_seqlens=cu, **kw), right, rtol=1e-6, atol=1e-7)
    assert torch.equal(right[1], torch.zeros(D))  # nothing to pool -> zeros


@pytest.mark.parametrize("mode", SIMPLE_MODES + ["latent_attention"])
def test_instruction_tokens_are_excluded_from_pooling_only(mode):
    """Pooling text tokens after an instruction prefix equals pooling the text alone; the
    instruction positions get zero gradient. Padded and packed (with a packed pool mask)."""
    D = 16
    instr, text = [3, 0, 5], [4, 6, 0]
    seqs = sequences([i + t for i, t in zip(instr, text)], D)
    latent = LatentAttentionPooling(
        hidden_size=D, num_latents=3, num_heads=1, dim_head=8, ff_mult=1, backend="reference"
    )
    kw = dict(mode=mode, latent_attention=latent)
    text_only = pool(*right_padded([s[i:] for s, i in zip(seqs, instr)], 8, D, torch.float32), **kw)

    hidden, attention_mask = right_padded(seqs, 10, D, torch.float32)
    pool_mask = attention_mask.clone()
    for b, i in enumerate(instr):
        pool_mask[b, :i] = False
    hidden.requires_grad_()
    out = pool(hidden, pool_mask, **kw)
    torch.testing.assert_close(out, text_only, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(out, hidden, torch.randn_like(out))
    assert torch.equal(grad[~pool_mask], torch.zeros_like(grad[~pool_mask]))

    rows, cu = packed(seqs, D, torch.float32)
    packed_mask = pool_mask[attention_mask]
    torch.testing.assert_close(pool(rows, packed_mask, cu_seqlens=cu, **kw), text_only, rtol=1e-6, atol=1e-7)


def test_pooling_module_modes_normalize_and_state_dict():
    h = torch.randn(3, 5, 32)
    mask = torch.rand(3, 5) < 0.7
    mask[:, 0] = True
    for mode in SIMPLE_MODES:
        out = Pooling(mode, normalize=True)(h, mask)
        torch.testing.assert_close(out, torch.nn.functional.normalize(pool(h, mask, mode=mode), dim=-1))
        assert Pooling(mode).state_dict() == {}
    module = Pooling("latent_attention", hidden_size=32, num_latents=4, num_heads=2, dim_head=8)
    module.latent_attention.backend = "reference"
    assert module.normalize
    assert set(module.state_dict()) == {f"latent_attention.{k}" for k in module.latent_attention.state_dict()}
    torch.testing.assert_close(module(h, mask), module.latent_attention(h, mask))
    assert (
        Pooling(
            "latent_attention", normalize=False, hidden_size=32, num_latents=4, num_heads=2, dim_head=8
        ).latent_attention.normalize
        is False
    )
    assert set(POOLING_MODES) == set(SIMPLE_MODES) | {"latent_attention"}


def test_pooling_rejects_bad_input_with_clear_errors():
    h, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode must be one of"):
        pool(h, mask, mode="max")
    with pytest.raises(ValueError, match="mode must be one of"):
        Pooling("cls")
    with pytest.raises(TypeError, match="takes no extra arguments"):
        Pooling("mean", hidden_size=8)
    with pytest.raises(TypeError, match="needs latent_attention=<LatentAttentionPooling module>"):
        pool(h, mask, mode="latent_attention")
    with pytest.raises(ValueError, match=r"pool_mask shape \(2, 3\) does not match hidden's \[B, L\] = \(2, 4\)"):
        pool(h, mask[:, :3], mode="last")
    with pytest.raises(TypeError, match="pool_mask must be bool or an integer dtype"):
        pool(h, mask.float(), mode="first")
    with pytest.raises(ValueError, match=r"pool_mask shape \(4,\) does not match hidden's \[T\] = \(5,\)"):
        pool(
            h[0, :, :].repeat(2, 1)[:5],
            mask[0],
            mode="weighted_mean",
            cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of rows of hidden"):
        pool(h[0], mode="mean", cu_seqlens=torch.tensor([0, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="hidden must have 3 dims"):
        pool(h[0], mask[0], mode="last")
    with pytest.raises(ValueError, match=r"pool_mask must have 2 dims \[B, L\], got shape \(2, 4, 1\)"):
        pool(h, mask[..., None], mode="mean")


def test_every_mode_and_the_reference_block_check_the_pool_mask_alike():
    """One pool-mask check (pooling_functions.check_pool_mask) behind every entry point: same messages."""
    from latentembed.modules.latent_attention_unfolded import UnfoldedLatentAttentionPooling

    cfg = dict(hidden_size=8, num_latents=2, num_heads=2, dim_head=4)
    latent = LatentAttentionPooling(**cfg, backend="reference")
    entry_points = [
        lambda h, m: pool(h, m, mode="mean"),
        lambda h, m: pool(h, m, mode="latent_attention", latent_attention=latent),
        UnfoldedLatentAttentionPooling(**cfg),
    ]
    h, mask = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    for call in entry_points:
        with pytest.raises(ValueError, match=r"pool_mask shape \(2, 3\) does not match hidden's \[B, L\] = \(2, 4\)"):
            call(h, mask[:, :3])
        with pytest.raises(TypeError, match=r"pool_mask must be bool or an integer dtype \(1 = pool\), got float32"):
            call(h, mask.float())
        with pytest.raises(TypeError, match="pool_mask must be a torch.Tensor, got list"):
            call(h, [[1, 1, 1, 1]] * 2)


def test_segment_of_row_and_pack_pool_rows_with_empty_sequences():
    cu = torch.tensor([0, 0, 3, 3, 4, 4], dtype=torch.int32)
    assert segment_of_row(cu, 4).tolist() == [1, 1, 1, 3]
    rows = torch.randn(4, 5)
    keep = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    packed_rows, packed_cu = pack_pool_rows(rows, keep, cu)
    assert packed_cu.tolist() == [0, 0, 2, 2, 3, 3] and packed_cu.dtype == torch.int32
    assert torch.equal(packed_rows, rows[[0, 2, 3]]) and packed_rows.dtype == rows.dtype
