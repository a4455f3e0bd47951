"""infonce_lse kernels against the float64 reference: every option, forward, rank and all gradients.

Option sets that compare scores with a bound (threshold, margin) use quantized inputs: every
score is then a multiple of 1/4, exact in every dtype, and the bounds sit between multiples
(threshold k + 1/8; margin 0.9 * (k + 0.1) is at least 0.01 from any multiple of 1/4), so the
kernel and the reference drop exactly the same candidates and the rank must match exactly.
"""

import pytest
import torch

from latentembed.ops.infonce import (
    CandidateRule,
    InfoNCELSEFunction,
    infonce_lse,
    infonce_lse_ref,
    infonce_per_query_loss,
)
from tests.ops._common import BF16_ON_GPU, KERNEL_BACKENDS, dtype_params
from tests.ops.infonce_helpers import (
    DEVICE,
    HAS_GPU,
    VALUE_BASED,
    VALUE_FREE,
    check_against_reference,
    make_options,
    quantized,
)

# The interpreter's bf16 tl.dot is garbage (triton#11584): bf16 runs on the GPU only.
DTYPES = dtype_params(bf16_marks=BF16_ON_GPU)


@pytest.fixture(autouse=True, params=["auto-plan", "chunked"])
def small_groups(monkeypatch, request):
    # Several document groups per row block and several dd blocks / backward chunks even at test
    # sizes, so the merge of partial results and the block loops are exercised; every test runs
    # with the automatic memory plan (one pass where B <= D) and with the chunked plan forced.
    from latentembed.ops.infonce import triton as tri

    if not HAS_GPU:
        monkeypatch.setattr(tri, "GROUP_DOCS", 16)
        monkeypatch.setattr(tri, "CHUNK_DOCS", 32)
    if request.param == "chunked":
        monkeypatch.setattr(tri, "ONE_PASS", False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", VALUE_FREE)
def test_options_match_reference(backend, dtype, option):
    B, N, D = 23, 41, 67  # no multiple of any block
    q = torch.randn(B, D, dtype=dtype, device=DEVICE)
    d = torch.randn(N, D, dtype=dtype, device=DEVICE)
    if option in ("diag", "owner-diag"):  # a query-query term: the same rows on both sides
        d = q.clone()
    scale = torch.tensor(0.2, device=DEVICE)
    check_against_reference(backend, q, d, scale, make_options(option, q, d))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", VALUE_BASED)
def test_score_bounds_match_reference(backend, dtype, option):
    B, N, D = 29, 45, 40
    q = quantized(B, D, dtype=dtype)
    d = quantized(N, D, dtype=dtype)
    opts = make_options(option, q, d)
    check_against_reference(backend, q, d, torch.tensor(0.7, device=DEVICE), opts, exact_rank_required=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", ["pos", "all"])
def test_per_query_loss_matches_reference(backend, dtype, option):
    # The per-query InfoNCE loss lse - scale * s_pos, with the positive's gradient in the kernel.
    B, N, D = 19, 37, 33
    q = quantized(B, D, dtype=dtype)
    d = quantized(N, D, dtype=dtype)
    opts = make_options(option, q, d)
    opts.setdefault("pos_index", torch.randint(0, N, (B,), device=DEVICE))
    loss, _, _ = check_against_reference(
        backend, q, d, torch.tensor(0.6, device=DEVICE), opts, exact_rank_required=True, per_query_loss=True
    )
    assert (loss >= -1e-4).all()  # lse >= the positive's own logit


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (1, 7, 3), (6, 1, 127), (3, 17, 1), (18, 33, 64)], ids=lambda s: "B{}-N{}-D{}".format(*s)
)
def test_odd_shapes(backend, shape):
    B, N, D = shape
    q = quantized(B, D, dtype=torch.float32)
    d = quantized(N, D, dtype=torch.float32)
    opts = {"pos_index": torch.randint(0, N, (B,), device=DEVICE)}
    check_against_reference(backend, q, d, torch.tensor(1.3, device=DEVICE), opts, exact_rank_required=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["unit-scale100", "scores100"])
def test_extreme_logits_do_not_overflow(backend, case):
    # Entries +-1/4 over D = 16 are exact unit vectors; +-5/2 gives norm 10 and scores up to
    # +-100. Every score and logit is then exact in fp32, so the comparison measures the
    # logsumexp's own numerics at logits of 100 and 3000 (random score rounding at |z| = 3000
    # is ~1e-4 and would make "2x PyTorch's error" a coin toss on near-tied rows).
    B, N, D = 33, 40, 16
    entry, scale = (0.25, 100.0) if case == "unit-scale100" else (2.5, 30.0)
    q = entry * (2 * torch.randint(0, 2, (B, D), device=DEVICE) - 1).float()
    d = entry * (2 * torch.randint(0, 2, (N, D), device=DEVICE) - 1).float()
    opts = {"pos_index": torch.randint(0, N, (B,), device=DEVICE)}
    lse, _, grads = check_against_reference(backend, q, d, torch.tensor(scale, device=DEVICE), opts)
    assert torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_candidate_sets_give_minus_inf_and_zero_gradient(backend):
    B, N, D = 5, 12, 20
    q = torch.randn(B, D, device=DEVICE)
    d = torch.randn(N, D, device=DEVICE)
    owner = torch.randint(0, 3, (N,), device=DEVICE)  # queries 3 and 4 own nothing
    lse, _, (grad_q, _, grad_scale) = check_against_reference(
        backend, q, d, torch.tensor(2.0, device=DEVICE), {"doc_owner": owner}
    )
    assert (lse[3:] == float("-inf")).all()
    assert torch.equal(grad_q[3:], torch.zeros_like(grad_q[3:]))
    assert torch.isfinite(grad_scale)


def test_every_candidate_dropped_but_the_positive():
    # threshold below every score: only the positive survives, lse = scale * s_pos, rank 0.
    q = torch.randn(6, 16, device=DEVICE)
    d = torch.randn(10, 16, device=DEVICE)
    pos = torch.randint(0, 10, (6,), device=DEVICE)
    scale = torch.tensor(3.0, device=DEVICE)
    lse, n_above = infonce_lse(q, d, scale, pos_index=pos, threshold=-1e6, backend="triton")
    expected = 3.0 * (q * d[pos]).sum(1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)
    assert (n_above == 0).all()


def test_function_can_be_applied_directly():
    q = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    d = torch.randn(9, 8, device=DEVICE)
    scale = torch.tensor(1.5, device=DEVICE)
    lse, n_above = InfoNCELSEFunction.apply(q, d, scale, CandidateRule(), False, "triton")
    ref, _ = infonce_lse_ref(q, d, scale)
    torch.testing.assert_close(lse, ref, rtol=1e-5, atol=1e-5)
    assert not n_above.requires_grad


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4100, 4099, 4096), (2000, 8195, 4096)], ids=["chunked", "one-pass"])
def test_large_shapes_on_gpu(backend, dtype, shape):
    # Several groups and the autotuned block sizes at realistic sizes. B = 4100 > D: the Triton
    # backend's chunked plan (1024-document chunks: 4 full ones and a 3-document tail, dq
    # accumulated in fp32 through cuBLAS with an fp32 output); B = 2000 <= D: the one-pass plan
    # (dq one GEMM over all documents, dd in blocks, the last one partial). The CUDA backend
    # chunks both.
    B, N, D = shape
    q = torch.nn.functional.normalize(torch.randn(B, D, device=DEVICE), dim=1).to(dtype)
    d = torch.nn.functional.normalize(torch.randn(N, D, device=DEVICE), dim=1).to(dtype)
    opts = make_options("pos-owner-key-diag", q, d)
    opts.pop("doc_owner")  # in-batch negatives on: every query sees every document
    check_against_reference(backend, q, d, torch.tensor(50.0, device=DEVICE), opts)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_default_pos_key_is_the_positives_key(backend):
    # pos_key = doc_key[pos_index] when omitted: both calls must agree bit for bit.
    B, N, D = 9, 26, 12
    q, d = torch.randn(B, D, device=DEVICE), torch.randn(N, D, device=DEVICE)
    pos = torch.randint(0, N, (B,), device=DEVICE)
    key = torch.randint(0, 5, (N,), device=DEVICE)
    scale = torch.tensor(2.0, device=DEVICE)
    implicit = infonce_lse(q, d, scale, pos_index=pos, doc_key=key, backend=backend)
    explicit = infonce_lse(q, d, scale, pos_index=pos, doc_key=key, pos_key=key[pos], backend=backend)
    assert torch.equal(implicit[0], explicit[0]) and torch.equal(implicit[1], explicit[1])


def test_launches_keep_the_grid_within_cuda_limits(monkeypatch):
    # B = 1 asks for few, huge document groups; at N >= 2^24 an uncapped group count would exceed
    # the 65535 blocks of the grid's y dimension. Same cap in csrc/infonce/bindings.cpp.
    from latentembed.ops.infonce import triton as tri
    from latentembed.ops.infonce.plan import backward_plan

    monkeypatch.setattr(tri, "GROUP_DOCS", None)
    for B, N in [(1, 1 << 24), (1, (1 << 26) + 5), (3, 1 << 30), (4096, 16384), (8192, 1 << 20)]:
        group = tri._group_docs(B, N, torch.device("cpu"))
        assert -(-N // group) <= 65535, (B, N, group)
        plan = backward_plan(B, N, 4096, torch.bfloat16)
        assert -(-plan.chunk // tri._group_docs(B, plan.chunk, torch.device("cpu"))) <= 65535


def test_in_place_narrowing_of_dq_is_exact():
    # The fp32 dq accumulator is cast into its own storage row block by row block.
    from latentembed.ops.infonce.triton import _narrow_in_place

    acc = torch.randn(37, 13)
    for dtype in (torch.float16, torch.bfloat16):
        for scratch_rows in (0, 1, 4, 37, 64):  # 0: less than a row of scratch space
            scratch = torch.empty(scratch_rows * 13 + 5, dtype=dtype)
            out = _narrow_in_place(acc.clone(), dtype, scratch)
            assert out.is_contiguous() and out.shape == acc.shape
            assert torch.equal(out, acc.to(dtype)), (dtype, scratch_rows)


@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
def test_validation_reads_the_device_once_and_never_without_validate(monkeypatch, scale_kind):
    # Every host read of a tensor value goes through one of these; count them.
    reads = []
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    q, d = torch.randn(5, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE)
    scale = torch.tensor(3.0, device=DEVICE) if scale_kind == "tensor" else 3.0
    pos = torch.randint(0, 11, (5,), device=DEVICE)
    key = torch.randint(0, 3, (11,), device=DEVICE)
    kw = dict(pos_index=pos, doc_key=key, backend="reference")
    infonce_lse(q, d, scale, validate=False, **kw)
    assert reads == []
    infonce_lse(q, d, scale, **kw)
    assert reads == ["tolist"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_validate_false_never_syncs_on_gpu(backend):
    # Forward and backward with validate=False, after a warm-up call (autotuning benchmarks sync).
    B, N, D = 300, 1100, 96
    q = torch.randn(B, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    d = torch.randn(N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    kw = dict(
        pos_index=torch.randint(0, N, (B,), device=DEVICE),
        doc_key=torch.randint(0, 50, (N,), device=DEVICE),
        backend=backend,
        validate=False,
    )

    def step():
        lse, _ = infonce_per_query_loss(q, d, scale, **kw)
        return torch.autograd.grad(lse.sum(), (q, d, scale))

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --- the candidate rule: one structure, passed by keyword ---------------------------------------


def test_candidate_rule_reaches_the_ops_unchanged(monkeypatch):
    # The rule given to infonce_per_query_loss arrives at both custom-op calls field by field,
    # by keyword (pos_key resolved to doc_key[pos_index]), with nothing reordered or lost.
    import latentembed.ops.infonce as infonce

    B, N, D = 5, 13, 8
    q = torch.randn(B, D, device=DEVICE, requires_grad=True)
    d = torch.randn(N, D, device=DEVICE)
    rule = dict(
        pos_index=torch.randint(0, N, (B,), device=DEVICE),
        pos_score=torch.randn(B, device=DEVICE),
        doc_owner=torch.randint(-1, B, (N,), device=DEVICE),
        doc_key=torch.randint(0, 4, (N,), device=DEVICE),
        threshold=0.75,
        margin=0.5,
        exclude_diagonal=True,
    )
    seen = {}
    forward_op, backward_op = infonce._kernel_ops("triton")

    def record(name, op):
        def call(*args, **kwargs):
            seen[name] = (len(args), kwargs)
            return op(*args, **kwargs)

        return call

    monkeypatch.setattr(infonce, "_kernel_ops", lambda backend: (record("fwd", forward_op), record("bwd", backward_op)))
    loss, _ = infonce_per_query_loss(q, d, 2.0, backend="triton", **rule)
    loss.sum().backward()
    expected = {**rule, "pos_key": rule["doc_key"][rule["pos_index"]]}
    for name, positional in (("fwd", 3), ("bwd", 5)):
        n_args, kwargs = seen[name]
        assert n_args == positional, f"{name}: the rule must come by keyword"
        assert set(kwargs) - {"subtract_positive"} == set(CandidateRule._fields)
        for field, value in expected.items():
            got = kwargs[field]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (name, field)
    assert seen["bwd"][1]["subtract_positive"] is True


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", id="triton")])
def test_swapping_doc_key_and_pos_key_changes_the_result_correctly(backend):
    # With B == N both are int64 [B] vectors: passed by position a swap would go unnoticed.
    # By keyword each call follows its own definition: drop j != pos[i] with doc_key[j] == pos_key[i].
    B = N = 12
    q, d = torch.randn(B, 16, device=DEVICE), torch.randn(N, 16, device=DEVICE)
    pos = torch.randperm(N, device=DEVICE)[:B]
    keys_a = torch.arange(N, device=DEVICE) % 3  # many duplicates
    keys_b = torch.arange(N, device=DEVICE) % 5
    scale = torch.tensor(1.5, device=DEVICE)
    s = (q.double() @ d.double().T) * 1.5
    cols = torch.arange(N, device=DEVICE)

    def expected(doc_key, pos_key):
        keep = (doc_key[None, :] != pos_key[:, None]) | (cols[None, :] == pos[:, None])
        return torch.logsumexp(torch.where(keep, s, float("-inf")), dim=1).float()

    one, _ = infonce_lse(q, d, scale, pos_index=pos, doc_key=keys_a, pos_key=keys_b, backend=backend)
    other, _ = infonce_lse(q, d, scale, pos_index=pos, doc_key=keys_b, pos_key=keys_a, backend=backend)
    torch.testing.assert_close(one, expected(keys_a, keys_b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, expected(keys_b, keys_a), rtol=1e-5, atol=1e-5)
    assert (one - other).abs().max() > 1e-2, "the two rules must differ on this data"


def test_candidate_rule_helpers_round_trip():
    rule = CandidateRule(pos_index=torch.arange(3), doc_key=torch.tensor([4, 5, 4, 6]), threshold=1, margin=None)
    assert list(rule.keywords()) == list(CandidateRule._fields)
    assert all(a is b for a, b in zip(rule.with_tensors(rule.tensors()), rule))
    canonical = rule.canonical()
    assert isinstance(canonical.threshold, float) and canonical.pos_score is None
    assert torch.equal(canonical.pos_key, torch.tensor([4, 5, 4]))  # doc_key[pos_index]
    assert canonical.canonical().pos_key is canonical.pos_key  # resolved once
