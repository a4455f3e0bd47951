"""infonce_lse: the reference as spec (gradcheck, definition), bad input, torch.compile, opcheck."""

import pytest
import torch
import torch.nn.functional as F

from latentembed.ops import BackendUnavailableError
from latentembed.ops.contrastive import infonce_lse, infonce_lse_ref
from tests.ops.infonce_helpers import DEVICE, HAS_GPU, make_options, quantized


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
        lse, _ = infonce_lse_ref(q, d, scale, **opts)
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


def _args(B=3, N=5, D=4, dtype=torch.float32):
    return torch.randn(B, D, dtype=dtype), torch.randn(N, D, dtype=dtype), torch.tensor(2.0)


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("d-mismatch", ValueError, "same D"),
        ("dtype-mismatch", TypeError, "dtype of q"),
        ("device-mismatch", ValueError, "same device"),
        ("int-q", TypeError, "q must have dtype"),
        ("q-1d", ValueError, "q must have 2 dims"),
        ("pos-range", ValueError, r"pos_index values must be in \[0, N\) = \[0, 5\), got 5"),
        ("pos-negative", ValueError, "got -1"),
        ("pos-dtype", TypeError, "pos_index must have dtype int64"),
        ("pos-length", ValueError, r"pos_index must have shape \[B\]"),
        ("scale-zero", ValueError, "scale .* must be positive"),
        ("scale-negative", ValueError, "must be positive and finite, got -0.5"),
        ("scale-shape", ValueError, "scale must be a 0-dim"),
        ("margin-no-score", ValueError, "margin needs pos_score"),
        ("score-length", ValueError, r"pos_score must be a floating tensor of shape \[B\]"),
        ("owner-length", ValueError, r"doc_owner must have shape \[N\] = \(5,\)"),
        ("key-length", ValueError, r"doc_key must have shape \[N\] = \(5,\)"),
        ("key-no-pos", ValueError, "doc_key .* needs pos_index .* or pos_key"),
        ("pos-key-no-key", ValueError, "pos_key .* needs doc_key"),
        ("pos-key-dtype", TypeError, "pos_key must have dtype int64, got int32"),
        ("pos-key-length", ValueError, r"pos_key must have shape \[B\] = \(3,\), got \(5,\)"),
        ("subtract-no-pos", ValueError, "subtract_positive needs pos_index"),
        ("empty", ValueError, "non-empty"),
        ("backend-name", ValueError, "argument backend must be one of"),
    ],
)
def test_bad_input_raises_clearly(case, error, message):
    q, d, scale = _args()
    kw = {}
    if case == "d-mismatch":
        d = torch.randn(5, 7)
    elif case == "dtype-mismatch":
        d = d.half()
    elif case == "device-mismatch":
        d = d.to("meta")
    elif case == "int-q":
        q = q.long()
    elif case == "q-1d":
        q = q[0]
    elif case == "pos-range":
        kw["pos_index"] = torch.tensor([0, 5, 1])
    elif case == "pos-negative":
        kw["pos_index"] = torch.tensor([0, -1, 1])
    elif case == "pos-dtype":
        kw["pos_index"] = torch.tensor([0, 1, 1], dtype=torch.int32)
    elif case == "pos-length":
        kw["pos_index"] = torch.tensor([0, 1])
    elif case == "scale-zero":
        scale = torch.tensor(0.0)
    elif case == "scale-negative":
        scale = torch.tensor(-0.5)
    elif case == "scale-shape":
        scale = torch.tensor([2.0])
    elif case == "margin-no-score":
        kw["margin"] = 0.9
    elif case == "score-length":
        kw.update(margin=0.9, pos_score=torch.randn(4))
    elif case == "owner-length":
        kw["doc_owner"] = torch.zeros(4, dtype=torch.int64)
    elif case == "key-length":
        kw.update(pos_index=torch.tensor([0, 1, 2]), doc_key=torch.zeros(6, dtype=torch.int64))
    elif case == "key-no-pos":
        kw["doc_key"] = torch.zeros(5, dtype=torch.int64)
    elif case == "pos-key-no-key":
        kw["pos_key"] = torch.zeros(3, dtype=torch.int64)
    elif case == "pos-key-dtype":
        kw.update(doc_key=torch.zeros(5, dtype=torch.int64), pos_key=torch.zeros(3, dtype=torch.int32))
    elif case == "pos-key-length":
        kw.update(doc_key=torch.zeros(5, dtype=torch.int64), pos_key=torch.zeros(5, dtype=torch.int64))
    elif case == "subtract-no-pos":
        kw["subtract_positive"] = True
    elif case == "empty":
        d = d[:0]
    elif case == "backend-name":
        kw["backend"] = "fast"
    with pytest.raises(error, match=message):
        infonce_lse(q, d, scale, **kw)


def test_float64_needs_the_reference_and_auto_picks_it():
    q, d, scale = _args(dtype=torch.float64)
    # (on a GPU machine the CPU tensors are refused first: "runs on ['cuda']")
    with pytest.raises(BackendUnavailableError, match="triton: (supports dtypes|runs on)"):
        infonce_lse(q, d, scale, backend="triton")
    lse, _ = infonce_lse(q, d, 2.0)  # a float scale is accepted too
    assert lse.dtype == torch.float64
    if not HAS_GPU:  # auto never picks the interpreter on CPU
        lse32, _ = infonce_lse(q.float(), d.float(), scale)
        assert lse32.dtype == torch.float32


def test_compiles_without_graph_break():
    # fullgraph=True fails on any graph break, including the value checks, which must be skipped
    # while compiling. aot_eager on CPU traces dynamo and AOT autograd; inductor on the GPU.
    compile_backend = "inductor" if HAS_GPU else "aot_eager"
    q = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    d = torch.randn(20, 24, device=DEVICE, requires_grad=True)
    scale = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    pos = torch.randint(0, 20, (6,), device=DEVICE)

    def loss_fn(q, d, scale, backend):
        lse, _ = infonce_lse(q, d, scale, pos_index=pos, backend=backend)
        fused, _ = infonce_lse(q, d, scale, pos_index=pos, backend=backend, subtract_positive=True)
        return (lse - scale * (q * d[pos]).sum(1)).mean() + fused.square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    loss = compiled(q, d, scale, "triton")
    grads = torch.autograd.grad(loss, (q, d, scale))
    # The same kernels run eagerly: compiling must not change the result.
    eager = loss_fn(q, d, scale, "triton")
    eager_grads = torch.autograd.grad(eager, (q, d, scale))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, eager_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    ref = loss_fn(q, d, scale, "reference")
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


def _op_args(device):
    B, N, D = 5, 9, 20
    q, d = torch.randn(B, D, device=device), torch.randn(N, D, device=device)
    scale = torch.tensor(1.5, device=device)
    pos = torch.randint(0, N, (B,), device=device)
    owner = torch.randint(0, B, (N,), device=device)
    key = torch.randint(0, 4, (N,), device=device)
    pos_key = torch.randint(0, 4, (B,), device=device)
    score = torch.randn(B, device=device)
    return q, d, scale, pos, score, owner, key, pos_key


def test_triton_ops_pass_opcheck():
    from latentembed.ops.contrastive.triton import infonce_lse_bwd_triton, infonce_lse_fwd_triton

    q, d, scale, pos, score, owner, key, pos_key = _op_args(DEVICE)
    for opts, sub in [((None, None, None, None, None, None, None, False), False),
                      ((pos, score, owner, key, None, 0.5, 0.9, True), True),
                      ((None, None, None, key, pos_key, None, None, True), False)]:
        torch.library.opcheck(infonce_lse_fwd_triton, (q, d, scale, *opts))
        lse, _, _ = infonce_lse_fwd_triton(q, d, scale, *opts)
        g = torch.randn_like(lse)
        torch.library.opcheck(infonce_lse_bwd_triton, (g, q, d, scale, lse, *opts, sub))


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_ops_pass_opcheck():
    from latentembed._extension import load_extension
    from latentembed.ops.contrastive import cuda  # noqa: F401  (defines the schemas)

    load_extension()
    q, d, scale, pos, score, owner, key, pos_key = _op_args("cuda")
    for opts, sub in [((None, None, None, None, None, None, None, False), False),
                      ((pos, score, owner, key, None, 0.5, 0.9, True), True),
                      ((None, None, None, key, pos_key, None, None, True), False)]:
        torch.library.opcheck(torch.ops.latentembed.infonce_lse_fwd_cuda.default, (q, d, scale, *opts))
        lse, _, _ = torch.ops.latentembed.infonce_lse_fwd_cuda(q, d, scale, *opts)
        g = torch.randn_like(lse)
        torch.library.opcheck(torch.ops.latentembed.infonce_lse_bwd_cuda.default, (g, q, d, scale, lse, *opts, sub))
