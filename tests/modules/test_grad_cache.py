"""GradCache gives the loss and parameter gradients of the plain large batch, dropout included.

"Plain" = one autograd graph over the whole batch. The encoder of the plain step runs over the
same chunks in the same order, so dropout draws the same masks (CPU dropout streams do not in
general split along the batch: [n, L, D] masks of one call differ from two half calls); with
chunk_size >= the batch it is literally one forward."""

import pytest
import torch
from torch import nn

from latentembed.modules.contrastive import InfoNCELoss
from latentembed.modules.grad_cache import grad_cache_step, split_inputs


class TinyEncoder(nn.Module):
    """Token embeddings -> dropout -> masked mean -> linear: dropout after the inputs and inside."""

    def __init__(self, vocab=50, dim=12, p=0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(p)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        h = self.drop(self.embed(input_ids))
        m = attention_mask[..., None].to(h.dtype)
        return self.drop(self.proj((h * m).sum(1) / m.sum(1)))


def tokens(n, length=7, vocab=50):
    mask = (torch.arange(length)[None, :] < torch.randint(1, length + 1, (n, 1))).long()
    return {"input_ids": torch.randint(0, vocab, (n, length)), "attention_mask": mask}


def plain_step(q_enc, d_enc, q_in, d_in, loss_fn, chunk_size):
    q = torch.cat([q_enc(**c) for c in split_inputs(q_in, chunk_size)])
    d = torch.cat([d_enc(**c) for c in split_inputs(d_in, chunk_size)])
    loss = loss_fn(q, d)
    loss.backward()
    return loss.detach()


def grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("chunk_size", [1, 3, 16], ids=["chunk1", "chunk3", "chunk16"])
@pytest.mark.parametrize("two_towers", [False, True], ids=["shared", "two-towers"])
def test_matches_plain_batch_with_dropout(chunk_size, two_towers):
    q_enc = TinyEncoder().double()
    d_enc = TinyEncoder().double() if two_towers else q_enc
    q_in, d_in = tokens(5), tokens(10)  # 5 queries, 5 positives + 5 hard negatives
    loss_fn = InfoNCELoss(0.05, learnable_temperature=False, symmetric=True)

    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    expected = plain_step(q_enc, d_enc, q_in, d_in, loss_fn, chunk_size)
    expected_grads = grads(q_enc, d_enc) if two_towers else grads(q_enc)
    state_after_plain = torch.get_rng_state()
    for m in (q_enc, d_enc):
        m.zero_grad(set_to_none=True)

    torch.manual_seed(seed)
    loss = grad_cache_step(q_enc, q_in, d_in, loss_fn, chunk_size, doc_encoder=d_enc if two_towers else None)
    got_grads = grads(q_enc, d_enc) if two_towers else grads(q_enc)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert len(got_grads) == len(expected_grads) > 0
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # The random stream continues as after one plain forward.
    assert torch.equal(torch.get_rng_state(), state_after_plain)

    # Dropout is live: another seed gives another loss, so mismatched masks would be caught.
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        other = loss_fn(q_enc(**q_in), d_enc(**d_in))
    assert abs(float(other) - float(expected)) > 1e-6


def test_matches_one_unsplit_forward_without_dropout():
    # Without dropout, chunking must not matter at all: compare with ONE forward of the batch.
    enc = TinyEncoder(p=0.0).double()
    q_in, d_in = tokens(7), tokens(14)
    loss_fn = InfoNCELoss(0.05, in_batch_negatives=True)
    expected = loss_fn(enc(**q_in), enc(**d_in))
    expected.backward()
    want = grads(enc)
    enc.zero_grad(set_to_none=True)
    loss = grad_cache_step(enc, q_in, d_in, loss_fn, 2)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for g, e in zip(grads(enc), want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_tensor_inputs_and_learnable_temperature():
    enc = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 8)).double()
    loss_fn = InfoNCELoss(0.1, learnable_temperature=True)
    q, d = torch.randn(4, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    torch.manual_seed(3)
    expected = loss_fn(torch.cat([enc(q[:3]), enc(q[3:])]), torch.cat([enc(d[:3]), enc(d[3:6]), enc(d[6:])]))
    expected.backward()
    want = [p.grad.clone() for p in (*enc.parameters(), loss_fn.log_scale)]
    for p in (*enc.parameters(), loss_fn.log_scale):
        p.grad = None
    torch.manual_seed(3)
    loss = grad_cache_step(enc, q, d, loss_fn, 3)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for g, e in zip([p.grad for p in (*enc.parameters(), loss_fn.log_scale)], want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    enc = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        grad_cache_step(enc, torch.randn(2, 4), torch.randn(2, 4), InfoNCELoss(), 0)
    with pytest.raises(ValueError, match="share their first dim"):
        split_inputs({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, 2)
    with pytest.raises(TypeError, match="embeddings"):
        grad_cache_step(lambda x: x[:, None], torch.randn(2, 4), torch.randn(2, 4), InfoNCELoss(), 1)
