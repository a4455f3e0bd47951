"""The infonce reference as spec: float64 gradchecks and the definitions it must follow
(cross-entropy, each mask of the candidate rule)."""

import pytest
import torch
import torch.nn.functional as F

from latentembed.ops.infonce import CandidateRule, infonce_lse, infonce_lse_ref, infonce_per_query_loss_ref
from tests.ops.infonce_helpers import DEVICE, make_options, quantized


@pytest.mark.parametrize("option", ["none", "pos-owner-key-diag", "all", "key-poskey-diag"])
def test_reference_gradcheck_float64(option):
    # Quantized values keep every score a quarter-integer away from the thresholds, so gradcheck's
    # perturbations never flip a mask decision.
    q = quantized(5, 6, dtype=torch.float64) + 0.01 * torch.rand(5, 6, dtype=torch.float64, device=DEVICE)
    d = quantized(8, 6, dtype=torch.float64) + 0.01 * torch.rand(8, 6, dtype=torch.float64, device=DEVICE)
    opts = make_options(option, q, d)
    if "threshold" in opts:
        opts["threshold"] = float(torch.quantile((q @ d.T).flatten(), 0.7))
    q.requires_grad_()
    d.requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def finite_lse(q, d, scale):
        lse, _ = infonce_lse_ref(q, d, scale, CandidateRule(**opts))
        return torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(finite_lse, (q, d, scale))


def test_reference_matches_cross_entropy_definition():
    # InfoNCE with in-batch negatives: lse - scale * s_pos is F.cross_entropy of the scaled scores.
    B, N, D = 7, 19, 11
    q, d = torch.randn(B, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    pos = torch.randint(0, N, (B,))
    scale = torch.tensor(1 / 0.05, dtype=torch.float64)
    lse, n_above = infonce_lse(q, d, scale, pos_index=pos, backend="reference")
    logits = scale * (q @ d.T)
    loss = lse - logits.gather(1, pos[:, None])[:, 0]
    torch.testing.assert_close(loss, F.cross_entropy(logits, pos, reduction="none"))
    rank = (logits > logits.gather(1, pos[:, None])).sum(1)
    assert torch.equal(n_above, rank)
    # The per-query loss reference is that difference.
    per_query, n_above_pq = infonce_per_query_loss_ref(q, d, scale, CandidateRule(pos_index=pos))
    torch.testing.assert_close(per_query, F.cross_entropy(logits, pos, reduction="none"))
    assert torch.equal(n_above_pq, rank)


def test_masks_follow_their_definitions():
    B, N = 4, 6
    q, d = torch.randn(B, 3, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64)
    s = q @ d.T
    pos = torch.tensor([0, 1, 2, 3])
    owner = torch.tensor([0, 1, 2, 3, 0, -1])
    key = torch.tensor([10, 11, 12, 13, 10, 11])  # doc 4 duplicates doc 0, doc 5 duplicates doc 1
    one = torch.tensor(1.0, dtype=torch.float64)
    lse, _ = infonce_lse(q, d, one, pos_index=pos, doc_owner=owner, backend="reference")
    # Query 0 sees its positive and its hard negative 4; query 1..3 only their positives.
    torch.testing.assert_close(lse[0], torch.logsumexp(s[0, [0, 4]], 0))
    torch.testing.assert_close(lse[1:], s[[1, 2, 3], [1, 2, 3]])
    lse, _ = infonce_lse(q, d, one, pos_index=pos, doc_key=key, backend="reference")
    torch.testing.assert_close(lse[0], torch.logsumexp(s[0, [0, 1, 2, 3, 5]], 0))
    torch.testing.assert_close(lse[1], torch.logsumexp(s[1, [0, 1, 2, 3, 4]], 0))
    # pos_key: row i drops every j != pos_index[i] with doc_key[j] == pos_key[i] ...
    pk = torch.tensor([11, 10, 12, 99])
    lse, _ = infonce_lse(q, d, one, pos_index=pos, doc_key=key, pos_key=pk, backend="reference")
    torch.testing.assert_close(lse[0], torch.logsumexp(s[0, [0, 2, 3, 4]], 0))  # 1, 5 dropped
    torch.testing.assert_close(lse[1], torch.logsumexp(s[1, [1, 2, 3, 5]], 0))  # 0, 4 dropped
    torch.testing.assert_close(lse[3], torch.logsumexp(s[3], 0))  # no document has key 99
    # ... and, without pos_index (GTE's document-document term), any j with that key.
    lse, _ = infonce_lse(q, d, one, doc_key=key, pos_key=pk, exclude_diagonal=True, backend="reference")
    torch.testing.assert_close(lse[0], torch.logsumexp(s[0, [2, 3, 4]], 0))
    torch.testing.assert_close(lse[1], torch.logsumexp(s[1, [2, 3, 5]], 0))
    lse, _ = infonce_lse(q, d, one, exclude_diagonal=True, backend="reference")
    torch.testing.assert_close(lse[2], torch.logsumexp(s[2, [0, 1, 3, 4, 5]], 0))
    t = float(s[0].median())
    lse, _ = infonce_lse(q, d, one, pos_index=pos, threshold=t, backend="reference")
    kept = (s[0] <= t) | (torch.arange(N) == 0)
    torch.testing.assert_close(lse[0], torch.logsumexp(s[0][kept], 0))
