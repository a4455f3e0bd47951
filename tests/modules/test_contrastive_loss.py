"""InfoNCELoss / infonce_loss against a full-score-matrix + F.cross_entropy reference.

The reference below is written independently of the module: it builds every score matrix, masks
with -inf and calls F.cross_entropy. In float64 it is exact; for another dtype it runs the eager
numerics users run (normalisation and matmul in the input dtype, float32 logits and
cross-entropy), whose error against float64 sets the budget of tests/tolerances.py.
"""

import importlib
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from latentembed.modules.contrastive import InfoNCELoss, cosine_normalize, duplicate_keys, infonce_loss
from latentembed.modules.contrastive import terms as contrastive_terms
from latentembed.ops.infonce import infonce_lse
from tests.tolerances import ATOL, max_error

try:
    importlib.import_module("latentembed.ops.infonce.triton")

    TRITON_REASON = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
    TRITON_REASON = f"contrastive Triton backend unavailable: {type(exc).__name__}: {exc}"

# Duplicate masking in the query_query / doc_doc terms needs the op's pos_key (no pos_index there).
HAS_POS_KEY = "pos_key" in inspect.signature(infonce_lse).parameters
NEEDS_POS_KEY = pytest.mark.xfail(not HAS_POS_KEY, reason="needs infonce_lse(pos_key=)", strict=False)


def needs_pos_key(options: dict) -> bool:
    dup = options.get("mask_duplicates") or options.get("doc_ids") is not None
    return bool(dup and (options.get("query_query") or options.get("doc_doc")))


def reference_loss(
    q,
    d,
    pos,
    scale,
    *,
    similarity="cos",
    owner=None,
    symmetric=False,
    query_query=False,
    doc_doc=False,
    threshold=None,
    margin=None,
    keys=None,
    reduction="mean",
):
    """q [B, D], d [N, D], pos [B], owner [N] (in-batch negatives off), keys [N] (duplicates).

    Scores are matmuls in the input dtype, then float32 (float64 for float64) logits."""
    acc = torch.promote_types(q.dtype, torch.float32)
    if similarity == "cos":
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    B = q.shape[0]
    rows = torch.arange(B)
    eye = torch.eye(B, dtype=torch.bool)
    S = (q @ d.T).to(acc)
    P = d[pos]
    s_pos = S[rows, pos].detach()
    pos_keys = None if keys is None else keys[pos]

    def false_negatives(raw):
        drop = torch.zeros_like(raw, dtype=torch.bool)
        if threshold is not None:
            drop |= raw > threshold
        if margin is not None:
            drop |= raw > margin * s_pos[:, None]
        return drop

    drop = false_negatives(S.detach())
    if owner is not None:
        drop |= owner[None, :] != rows[:, None]
    if keys is not None:
        drop |= keys[None, :] == pos_keys[:, None]
    drop[rows, pos] = False
    logits = [torch.where(drop, -math.inf, scale * S)]
    if query_query:
        Sqq = (q @ q.T).to(acc)
        drop_qq = false_negatives(Sqq.detach()) | eye
        if keys is not None:  # queries whose positive duplicates d+_i
            drop_qq |= pos_keys[None, :] == pos_keys[:, None]
        logits.append(torch.where(drop_qq, -math.inf, scale * Sqq))
    if doc_doc:
        Sdd = (P @ d.T).to(acc)
        drop_dd = false_negatives(Sdd.detach())
        drop_dd[rows, pos] = True
        if keys is not None:  # duplicates of d+_i
            drop_dd |= keys[None, :] == pos_keys[:, None]
        logits.append(torch.where(drop_dd, -math.inf, scale * Sdd))
    loss = F.cross_entropy(torch.cat(logits, dim=1), pos, reduction="none")
    if symmetric:
        Sdq = (P @ q.T).to(acc)
        drop = false_negatives(Sdq.detach())
        if owner is not None:
            drop |= ~eye
        if keys is not None:
            drop |= pos_keys[None, :] == pos_keys[:, None]
        drop[rows, rows] = False
        loss = 0.5 * (loss + F.cross_entropy(torch.where(drop, -math.inf, scale * Sdq), rows, reduction="none"))
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def make_case(B, k, D, layout, dup=False, dot_scale=1.0):
    """Queries, hard-negative-rich documents, and the ways to pass them.

    Returns (q, docs, pos, owner, call): docs/pos/owner in the concatenated order the reference
    sees; ``call(q, docs)`` maps tensors to infonce_loss's (documents, pos_index, kwargs)."""
    q = torch.randn(B, D) * dot_scale
    positives = q + 0.8 * torch.randn(B, D) * dot_scale  # correlated: realistic positive scores
    negatives = q[:, None] + 1.0 * torch.randn(B, k, D) * dot_scale
    if dup and k > 0:  # exact duplicates of positives among the negatives
        negatives[0, 0] = positives[0]
        negatives[B - 1, k - 1] = positives[B - 1]
    ar = torch.arange(B)
    if layout == "blocks":
        docs = torch.cat([positives, negatives.transpose(0, 1).reshape(B * k, D)])
        owner = torch.cat([ar, ar.repeat(k)])
        return q, docs, ar, owner, lambda docs: (docs, None, {"negatives_order": "blocks"})
    if layout == "per_query":
        docs = torch.cat([positives, negatives.reshape(B * k, D)])
        owner = torch.cat([ar, ar.repeat_interleave(k)])
        return q, docs, ar, owner, lambda docs: (docs, None, {"negatives_order": "per_query"})
    if layout == "3d":
        docs = torch.cat([positives, negatives.reshape(B * k, D)])
        owner = torch.cat([ar, ar.repeat_interleave(k)])
        return q, docs, ar, owner, lambda docs: (docs[:B], None, {"hard_negatives": docs[B:].reshape(B, k, D)})
    assert layout == "index"  # shuffled documents plus unowned extras
    extra = torch.randn(3, D) * dot_scale
    base = torch.cat([positives, negatives.reshape(B * k, D), extra])
    base_owner = torch.cat([ar, ar.repeat_interleave(k), torch.full((3,), -1)])
    perm = torch.randperm(base.shape[0])
    docs, owner = base[perm], base_owner[perm]
    pos = torch.argsort(perm)[:B]
    return q, docs, pos, owner, lambda docs: (docs, pos, {"doc_owner": owner})


def run_module(q, docs, call, temperature, backend="reference", **options):
    """Loss and gradients (queries, concatenated documents, temperature) under random upstream."""
    q = q.clone().requires_grad_(True)
    docs = docs.clone().requires_grad_(True)
    temp = torch.tensor(temperature, dtype=q.dtype, requires_grad=True)
    documents, pos_index, layout_kwargs = call(docs)
    if options.get("in_batch_negatives", True):
        layout_kwargs.pop("doc_owner", None)
    loss = infonce_loss(q, documents, pos_index, temperature=temp, backend=backend, **layout_kwargs, **options)
    return loss, q, docs, temp


def check_against_reference(
    q, docs, pos, owner, call, temperature, backend="reference", dtype=torch.float32, **options
):
    ref_options = {
        k: v
        for k, v in options.items()
        if k not in ("in_batch_negatives", "mask_duplicates", "doc_ids", "negatives_order")
    }
    if not options.get("in_batch_negatives", True):
        ref_options["owner"] = owner
    if options.get("doc_ids") is not None:
        ref_options["keys"] = options["doc_ids"]
    elif options.get("mask_duplicates"):  # rows equal after normalisation for "cos" (documented)
        cos = options.get("similarity", "cos") == "cos"
        ref_options["keys"] = duplicate_keys(F.normalize(docs.to(dtype), dim=-1) if cos else docs)
    q, docs = q.to(dtype), docs.to(dtype)
    loss, qv, dv, tv = run_module(q, docs, call, temperature, backend=backend, **options)
    upstream = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad(loss, (qv, dv, tv), upstream)

    results = {}
    for ref_dtype in (torch.float64, dtype):
        qr = q.to(ref_dtype).requires_grad_(True)
        dr = docs.to(ref_dtype).requires_grad_(True)
        # the temperature the module got, rounded to the inputs' dtype, then exact
        tr = torch.tensor(temperature, dtype=dtype).to(ref_dtype).requires_grad_(True)
        ref = reference_loss(qr, dr, pos, 1.0 / tr, **ref_options)
        results[ref_dtype] = (ref, *torch.autograd.grad(ref, (qr, dr, tr), upstream.to(ref.dtype)))
    names = ("loss", "grad queries", "grad documents", "grad temperature")
    terms = term_sizes(q, docs, pos, temperature, upstream, options)
    lowp_errors = [max_error(lowp, exact) for lowp, exact in zip(results[dtype], results[torch.float64])]
    reduction = options.get("reduction", "mean")
    if dtype != torch.float64:
        # Scalars (a reduced loss, the temperature's gradient) are sums whose error can cancel by
        # luck: bound the eager loss's error by its per-query errors weighted as in the sum
        # (triangle inequality), so that the budget is not a coin flip.
        weights = upstream.double().abs().expand(q.shape[0]) / (q.shape[0] if reduction == "mean" else 1)
        per_query = []
        for dt in (dtype, torch.float64):
            t = torch.tensor(temperature, dtype=dtype).to(dt).requires_grad_(True)
            losses = reference_loss(q.to(dt), docs.to(dt), pos, 1.0 / t, **{**ref_options, "reduction": "none"})
            g_t = [torch.autograd.grad(li, t, retain_graph=True)[0].double() for li in losses]
            per_query.append((losses.detach().double(), torch.stack(g_t)))
        for slot, (lowp_i, exact_i) in (
            (0, (per_query[0][0], per_query[1][0])),
            (3, (per_query[0][1], per_query[1][1])),
        ):
            if slot == 0 and reduction == "none":
                continue
            lowp_errors[slot] = max(lowp_errors[slot], (weights * (lowp_i - exact_i).abs()).sum().item())
    for name, out, exact, lowp, term, lowp_err in zip(
        names, (loss, *grads), results[torch.float64], results[dtype], terms, lowp_errors
    ):
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        if dtype == torch.float64:
            torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-11, msg=name)
        else:
            assert_within_budget_f32(name, out, lowp, exact, term, lowp_err)
    return loss


def term_sizes(q, docs, pos, temperature, upstream, options):
    """Size of the largest float32 term each result is a difference of (one value per result).

    F.cross_entropy cancels per element (p - 1 at the positive) before summing; the op sums
    float32 terms first (lse ~ logit size, E_p[scale * d], E_p[s] * scale^2 for the temperature)
    and cancels after, so float32 rounding of those terms survives: its size is the positive
    logit's contribution alone (its gradient for the gradients), times the logsumexp terms."""
    n_terms = 1 + options.get("query_query", False) + options.get("doc_doc", False) + options.get("symmetric", False)
    qd, dd = q.double(), docs.double()
    cos = options.get("similarity", "cos") == "cos"
    if cos:  # gradients in normalised space, then through normalisation (at most 1 / |x|)
        qd, dd = F.normalize(qd, dim=-1), F.normalize(dd, dim=-1)
    qd.requires_grad_(True)
    dd.requires_grad_(True)
    s = qd @ dd.T
    weights = upstream.double().abs().expand(q.shape[0]) / (
        q.shape[0] if options.get("reduction", "mean") == "mean" else 1
    )
    logits = (s[torch.arange(q.shape[0]), pos] / temperature).abs()
    g_q, g_d = (g.abs().max().item() for g in torch.autograd.grad((weights * logits).sum(), (qd, dd)))
    if cos:
        g_q /= q.double().norm(dim=-1).min().item()
        g_d /= docs.double().norm(dim=-1).min().item()
    g_t = (weights.sum() * s.detach().abs().max() / temperature**2).item()
    # exp(logit - lse) with float32 logits of size L carries a relative error ~eps * L
    logit_size = 1 + s.detach().abs().max().item() / temperature
    return tuple(n_terms * logit_size * size for size in (1.0, g_q, g_d, g_t))


def assert_within_budget_f32(name, out, lowp, exact, term_size, lowp_err):
    """tests/tolerances.py's rule (2x the eager loss's own error ``lowp_err`` + ATOL of the
    result's dtype) plus 4 float32 roundings of the largest term the op cancels (see term_sizes):
    the op accumulates in float32 whatever the input dtype, so this part does not grow with
    fp16/bf16."""
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == lowp.dtype, f"{name}: dtype {out.dtype} != {lowp.dtype}"
    err = max_error(out, exact)
    # a half result also carries its own final rounding, which the eager one may dodge by luck
    own = torch.finfo(out.dtype).eps / 2 if out.dtype in (torch.float16, torch.bfloat16) else 0.0
    budget = (
        2 * lowp_err
        + (ATOL[out.dtype] + own) * max(1.0, exact.abs().max().item())
        + 4 * torch.finfo(torch.float32).eps * term_size
    )
    assert err <= budget, f"{name}: max error {err:.3e} exceeds budget {budget:.3e}"


OPTION_SETS = {
    "plain": {},
    "dot": {"similarity": "dot"},
    "no_in_batch": {"in_batch_negatives": False},
    "symmetric": {"symmetric": True},
    "symmetric_no_in_batch": {"symmetric": True, "in_batch_negatives": False},
    "gte_qq_dd": {"query_query": True, "doc_doc": True},
    "threshold": {"threshold": 0.5},
    "margin": {"margin": 0.95},
    "duplicates": {"mask_duplicates": True},
    "gte_duplicates": {"query_query": True, "doc_doc": True, "symmetric": True, "mask_duplicates": True},
    "all_but_duplicates": {"symmetric": True, "query_query": True, "doc_doc": True, "margin": 0.95, "threshold": 0.9},
    "everything": {
        "symmetric": True,
        "query_query": True,
        "doc_doc": True,
        "margin": 0.95,
        "threshold": 0.9,
        "mask_duplicates": True,
    },
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


# float32 on every layout; float64 (exact to rounding) on the two layouts that differ most.
def case(*values, options, id):
    marks = [NEEDS_POS_KEY] if needs_pos_key(OPTION_SETS[options]) else []
    return pytest.param(*values, marks=marks, id=id)


REFERENCE_CASES = [
    case(layout, options, dtype, options=options, id=f"{name}-{options}-{layout}")
    for dtype, name, layouts in (
        (torch.float32, "fp32", ("blocks", "per_query", "3d", "index")),
        (torch.float64, "fp64", ("3d", "index")),
    )
    for options in OPTION_SETS
    for layout in layouts
]


@pytest.mark.parametrize("layout,options,dtype", REFERENCE_CASES)
def test_matches_reference(layout, options, dtype):
    B, k, D = 5, 2, 16
    q, docs, pos, owner, call = make_case(B, k, D, layout, dup=True)
    check_against_reference(q, docs, pos, owner, call, 0.07, dtype=dtype, **OPTION_SETS[options])


@pytest.mark.parametrize("options", ["threshold", "margin", "duplicates", "no_in_batch", "gte_qq_dd", "symmetric"])
def test_options_change_the_loss(options):
    """Each option must matter on data where it applies (else the comparison above proves nothing)."""
    q, docs, pos, owner, call = make_case(6, 3, 16, "blocks", dup=True)
    with torch.no_grad():
        plain = infonce_loss(q, docs, temperature=0.2, reduction="none")
        changed = infonce_loss(q, docs, temperature=0.2, reduction="none", **OPTION_SETS[options])
    assert (plain - changed).abs().max() > 1e-3


def test_doc_ids_match_row_keys():
    q, docs, pos, owner, call = make_case(4, 2, 8, "index", dup=True)
    ids = duplicate_keys(docs)
    check_against_reference(q, docs, pos, owner, call, 0.05, doc_ids=ids, symmetric=True)
    a = infonce_loss(q, docs, pos, doc_ids=ids)
    b = infonce_loss(q, docs, pos, mask_duplicates=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "B,k,D",
    [(1, 0, 3), (1, 2, 3), (3, 0, 127), (2, 1, 1), (7, 3, 33)],
    ids=["B1-N1-D3", "B1-N3-D3", "B3-N3-D127", "B2-N4-D1", "B7-N28-D33"],
)
@pytest.mark.parametrize(
    "options", ["plain", case("everything", options="everything", id="everything"), "all_but_duplicates", "no_in_batch"]
)
def test_odd_sizes(B, k, D, options):
    q, docs, pos, owner, call = make_case(B, k, D, "blocks")
    loss = check_against_reference(q, docs, pos, owner, call, 0.1, **OPTION_SETS[options])
    if B == 1 and k == 0:
        assert abs(loss.item()) < 1e-6  # a single candidate: the positive has probability one


@pytest.mark.parametrize("similarity,temperature", [("cos", 0.01), ("dot", 1.0)], ids=["cos-t0.01", "dot-scores-pm100"])
def test_extreme_logits(similarity, temperature):
    """Logits near +-100 (cosine / 0.01, or raw dot products of +-100) must not overflow."""
    q, docs, pos, owner, call = make_case(4, 2, 400, "blocks", dot_scale=0.5)
    if similarity == "dot":
        docs[8:] *= -1  # the second block of negatives scores near -100
        scores = q @ docs.T
        assert scores.max() > 90 and scores.min() < -90, "the case should reach scores near +-100"
    for options in ({}, {"symmetric": True, "query_query": True, "doc_doc": True}, {"in_batch_negatives": False}):
        check_against_reference(q, docs, pos, owner, call, temperature, similarity=similarity, **options)


def test_stats_rank_and_accuracy():
    # Fresh random data until it holds both hits and misses (about 2% of draws are all one
    # kind, which would make the accuracy check below say nothing).
    for _ in range(100):
        q, docs, pos, owner, call = make_case(8, 3, 4, "index")
        qn, dn = F.normalize(q, dim=-1), F.normalize(docs, dim=-1)
        S = qn.double() @ dn.double().T
        s_pos = S[torch.arange(8), pos][:, None]
        keep = S <= 0.8
        expected = ((S > s_pos) & keep).sum(1)
        if 0 < int((expected == 0).sum()) < 8:
            break
    out = infonce_loss(q, docs, pos, threshold=0.8, return_stats=True)
    torch.testing.assert_close(out.rank, expected)
    torch.testing.assert_close(out.accuracy, (expected == 0).float().mean())
    assert 0 < float(out.accuracy) < 1, "random data should give a mix of hits and misses"


def test_learnable_temperature_and_clamp():
    q, docs, pos, owner, call = make_case(4, 1, 8, "blocks")
    q, docs = q.double().requires_grad_(True), docs.double()
    loss_fn = InfoNCELoss(0.05, learnable_temperature=True, temperature_range=(0.02, 0.5), symmetric=True)
    loss = loss_fn(q, docs)
    loss.backward()
    log_scale = loss_fn.log_scale.detach().double().requires_grad_(True)  # the same float32 value
    ref = reference_loss(q.detach(), docs, pos, log_scale.exp(), symmetric=True)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    # log_scale is a float32 parameter: its gradient sums float32 terms of size scale * |s| ~ 20
    torch.testing.assert_close(loss_fn.log_scale.grad.double(), log_scale.grad, rtol=1e-5, atol=1e-5)
    # Beyond the range (scale 1000 > 50): the forward uses the clamped scale 50; the gradient
    # passes only when a descent step moves log_scale back into the range (grad > 0).
    aligned = q.detach().clone()  # positives = the queries: the loss wants a larger scale (grad < 0)
    noisy = torch.randn_like(aligned)  # unrelated positives: the loss wants a smaller scale (grad > 0)
    for name, positives in (("sharper", aligned), ("softer", noisy)):
        docs_case = torch.cat([positives, torch.randn(4, 8, dtype=torch.float64)])
        with torch.no_grad():
            loss_fn.log_scale.fill_(math.log(1 / 0.001))
        loss_fn.log_scale.grad = None
        loss_fn(q.detach(), docs_case).backward()
        assert loss_fn.temperature == pytest.approx(0.02)
        at_clamp = torch.tensor(math.log(50.0), dtype=torch.float64, requires_grad=True)
        reference_loss(q.detach(), docs_case, pos, at_clamp.exp(), symmetric=True).backward()
        if name == "sharper":
            assert at_clamp.grad < 0 and float(loss_fn.log_scale.grad) == 0.0, "pushing further out: blocked"
        else:
            assert at_clamp.grad > 0, "the case should want a softer temperature"
            torch.testing.assert_close(loss_fn.log_scale.grad.double(), at_clamp.grad, rtol=1e-5, atol=1e-5)
    # and the recovery is real: a few SGD steps bring log_scale back inside the range
    opt = torch.optim.SGD([loss_fn.log_scale], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        loss_fn(q.detach(), torch.cat([noisy, torch.randn(4, 8, dtype=torch.float64)])).backward()
        opt.step()
    assert float(loss_fn.log_scale.detach()) <= math.log(50.0)
    fixed = InfoNCELoss(0.05)
    assert not list(fixed.parameters()) and fixed.temperature == pytest.approx(0.05)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"query_query": True, "doc_doc": True}, marks=NEEDS_POS_KEY, id="gte"),
        pytest.param({"in_batch_negatives": False, "margin": 0.95}, id="stage2"),
    ],
)
def test_gradcheck_float64(options):
    q, docs, pos, owner, call = make_case(3, 1, 5, "blocks", dup=True)
    q, docs = q.double().requires_grad_(True), docs.double().requires_grad_(True)
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    ids = duplicate_keys(docs)  # fixed ids: bitwise row equality would break under perturbation

    def fn(q, docs, temp):
        return infonce_loss(q, docs, temperature=temp, symmetric=True, doc_ids=ids, reduction="none", **options)

    assert torch.autograd.gradcheck(fn, (q, docs, temp))


# --- cosine normalisation without float32 copies ----------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (5, 127), (4, 1)], ids=["R1-D3", "R5-D127", "R4-D1"])
def test_cosine_normalize_matches_f_normalize(shape):
    x = torch.randn(shape, dtype=torch.float64)
    x[0] *= 1e-14  # below F.normalize's eps: divided by eps, not by its norm
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, theirs = cosine_normalize(x1), F.normalize(x2, dim=-1)
    upstream = torch.randn_like(ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    (g1,), (g2,) = torch.autograd.grad(ours, x1, upstream), torch.autograd.grad(theirs, x2, upstream)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(cosine_normalize, (torch.randn(shape, dtype=torch.float64, requires_grad=True),))
    x32 = torch.randn(shape)  # float32: bitwise F.normalize's rows (duplicate masking compares bits)
    assert torch.equal(cosine_normalize(x32), F.normalize(x32, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cosine_normalize_saves_no_float32_copy(dtype):
    """Autograd keeps x itself and [rows] float32 norms, never a float32 [rows, D] tensor; the
    result and its gradient are within the dtype's rounding of float64."""
    x = torch.randn(6, 40, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cosine_normalize(x)
    assert y.dtype == dtype
    assert all(t.numel() <= x.shape[0] or t.dtype == dtype for t in saved), [(t.dtype, tuple(t.shape)) for t in saved]
    assert any(t.data_ptr() == x.data_ptr() for t in saved), "x itself is what is kept"
    upstream = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, upstream)
    x64 = x.detach().double().requires_grad_(True)
    y64 = F.normalize(x64, dim=-1)
    (g64,) = torch.autograd.grad(y64, x64, upstream.double())
    eps = torch.finfo(dtype).eps
    assert (y.double() - y64).abs().max() <= eps
    assert (g.double() - g64).abs().max() <= 4 * eps * g64.abs().max()


def test_stage2_loss_saves_no_float32_rows():
    """The whole stage-2 loss (normalisation + owned scores) keeps no float32 [rows, D] tensor."""
    B, k, D = 6, 3, 40
    q = torch.randn(B, D, dtype=torch.float16, requires_grad=True)
    docs = torch.randn(B * (1 + k), D, dtype=torch.float16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = infonce_loss(q, docs, in_batch_negatives=False, margin=0.95)
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= B * D]
    assert not big_fp32, big_fp32
    loss.backward()
    assert q.grad.dtype == docs.grad.dtype == torch.float16


# --- doc_doc / query_query duplicates ---------------------------------------------------------


@NEEDS_POS_KEY
def test_doc_doc_masks_duplicates_of_the_positive():
    """An exact duplicate of d+_0 among the documents is the worst false negative of the doc_doc
    term (the reviewer's case: query 0's loss 0.000 -> 3.9 without masking)."""
    q, docs, pos, owner, call = make_case(4, 2, 16, "blocks", dup=True)  # docs[4] duplicates docs[0]
    for options in ({"doc_doc": True}, {"query_query": True, "doc_doc": True, "symmetric": True}):
        masked = check_against_reference(
            q, docs, pos, owner, call, 0.05, dtype=torch.float64, mask_duplicates=True, reduction="none", **options
        )
        unmasked = infonce_loss(q.double(), docs.double(), temperature=0.05, reduction="none", **options)
        assert (unmasked[0] - masked[0]).item() > 0.1, "the duplicate should matter for query 0"


# --- stage 2: each query scores only its own documents ------------------------------------------


@pytest.mark.parametrize("layout", ["blocks", "per_query", "3d"])
@pytest.mark.parametrize(
    "options",
    [{}, {"threshold": 0.5, "margin": 0.95}, {"mask_duplicates": True}, {"symmetric": True, "similarity": "dot"}],
    ids=["plain", "threshold-margin", "duplicates", "symmetric-dot"],
)
def test_stage2_owned_scores_equal_generic_path(layout, options, monkeypatch):
    """Layouts that imply ownership take the [B, 1 + k] batched-dot path (no infonce_lse call);
    it equals the op's generic masked pass over explicit doc_owner, loss and gradients."""
    q, docs, pos, owner, call = make_case(5, 3, 24, layout, dup="mask_duplicates" in options)
    q, docs = q.double(), docs.double()  # equal up to float64 rounding; ranks without near-ties
    upstream = torch.rand(5, dtype=torch.float64) + 0.5

    def run(generic):
        qv, dv = q.clone().requires_grad_(True), docs.clone().requires_grad_(True)
        if generic:
            out = infonce_loss(
                qv, dv, pos, doc_owner=owner, in_batch_negatives=False, reduction="none", return_stats=True, **options
            )
        else:
            documents, _, kw = call(dv)
            out = infonce_loss(
                qv, documents, in_batch_negatives=False, reduction="none", return_stats=True, **kw, **options
            )
        return (out.loss, out.rank, *torch.autograd.grad(out.loss, (qv, dv), upstream))

    expected = run(generic=True)
    # the owned path must not need the op
    monkeypatch.setattr(contrastive_terms, "infonce_lse", None)
    monkeypatch.setattr(contrastive_terms, "infonce_per_query_loss", None)
    got = run(generic=False)
    for name, g, e in zip(("loss", "rank", "grad queries", "grad documents"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


# --- low precision: the eager loss's own error sets the budget ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "options", ["plain", "no_in_batch", case("gte_duplicates", options="gte_duplicates", id="gte_duplicates")]
)
def test_low_precision_reference_backend(dtype, options):
    """Half inputs through the module (normalisation, layouts, terms) with the reference op. A 1%
    wrong temperature fails here in fp16 (checked by hand). No threshold / margin in half
    precision: a candidate near the bound flips in or out with rounding (a jump, not an error)."""
    q, docs, pos, owner, call = make_case(24, 3, 64, "blocks", dup=True)
    check_against_reference(q, docs, pos, owner, call, 0.05, dtype=dtype, **OPTION_SETS[options])


@pytest.mark.skipif(TRITON_REASON is not None, reason=TRITON_REASON or "")
@pytest.mark.parametrize(
    "options,dtype",
    [
        case(o, dt, options=o, id=f"{str(dt)[6:]}-{o}")
        for o, dt in (
            ("plain", torch.float32),
            ("dot", torch.float32),
            ("no_in_batch", torch.float32),
            ("everything", torch.float32),
            ("plain", torch.float16),
            ("gte_duplicates", torch.float16),
        )
    ],
)
def test_triton_backend(options, dtype):
    """The same loss through the Triton kernels (interpreter on CPU: fp32/fp16), small sizes."""
    # B = 10: the eager fp16 loss's error (the budget) is an average over queries, not a coin flip
    q, docs, pos, owner, call = make_case(10, 2, 16, "index", dup=True)
    check_against_reference(q, docs, pos, owner, call, 0.05, backend="triton", dtype=dtype, **OPTION_SETS[options])


def test_module_equals_function():
    q, docs, pos, owner, call = make_case(4, 2, 8, "per_query", dup=True)
    options = dict(
        symmetric=True,
        margin=0.95,
        mask_duplicates=True,
        negatives_order="per_query",
        in_batch_negatives=False,
        reduction="none",
    )
    loss_fn = InfoNCELoss(0.05, **options)
    torch.testing.assert_close(loss_fn(q, docs), infonce_loss(q, docs, temperature=0.05, **options))
    assert "in_batch_negatives=False" in repr(loss_fn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("options", ["plain", "no_in_batch", case("everything", options="everything", id="everything")])
def test_gpu_low_precision(dtype, options):
    """backend="auto" on the GPU (the fused kernels) in bf16/fp16 at a realistic shape: the error
    against float64 stays within twice that of PyTorch's own low-precision reference."""
    torch.set_default_device("cuda")
    try:
        q, docs, pos, owner, call = make_case(96, 3, 136, "blocks", dup=True)
        check_against_reference(
            q, docs, pos.cuda(), owner.cuda(), call, 0.02, backend="auto", dtype=dtype, **OPTION_SETS[options]
        )
    finally:
        torch.set_default_device("cpu")


# --- sentence-transformers' MultipleNegativesRankingLoss on the same embeddings ---------------


def _mnrl_case(B, k, D):
    q = torch.randn(B, D, dtype=torch.float64)
    cols = [q + 0.8 * torch.randn(B, D, dtype=torch.float64) for _ in range(1 + k)]
    return q, cols


@pytest.mark.parametrize(
    "directions,partition,k,ours",
    [
        (("query_to_doc",), "joint", 0, {}),
        (("query_to_doc",), "joint", 3, {}),
        (("query_to_doc", "doc_to_query"), "per_direction", 2, {"symmetric": True}),
        (("query_to_doc", "query_to_query", "doc_to_doc"), "joint", 0, {"query_query": True, "doc_doc": True}),
    ],
    ids=["in-batch", "hard-negatives", "symmetric", "gte-qq-dd"],
)
def test_matches_sentence_transformers_mnrl(directions, partition, k, ours):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    # The loss only keeps the model for its forward(); compute_loss_from_embeddings is its own
    # public entry point from embeddings, the least invasive real comparison.
    mnrl = MultipleNegativesRankingLoss(model=None, scale=20.0, directions=directions, partition_mode=partition)
    q, cols = _mnrl_case(6, k, 12)
    q1, cols1 = q.clone().requires_grad_(True), [c.clone().requires_grad_(True) for c in cols]
    theirs = mnrl.compute_loss_from_embeddings([q1, *cols1], labels=None)
    theirs.backward()
    q2, docs2 = q.clone().requires_grad_(True), torch.cat(cols).requires_grad_(True)
    mine = infonce_loss(q2, docs2, temperature=1 / 20.0, similarity="cos", backend="reference", **ours)
    mine.backward()
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q2.grad, q1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(docs2.grad, torch.cat([c.grad for c in cols1]), rtol=1e-9, atol=1e-12)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_call,error,match",
    [
        (lambda q, d: infonce_loss(q, d[:, :7]), ValueError, "same D"),
        (
            lambda q, d: infonce_loss(q, d, torch.tensor([0, 1, 2, 12])),
            ValueError,
            r"pos_index values must be in \[0, N\)",
        ),
        (lambda q, d: infonce_loss(q, d, torch.tensor([0, 1, -1, 2])), ValueError, "pos_index values"),
        (
            lambda q, d: infonce_loss(q, d, torch.tensor([0, 1, 2])),
            ValueError,
            r"pos_index must have shape \[B\] = \(4,\), got \(3,\)",
        ),
        (lambda q, d: infonce_loss(q, d, temperature=-0.05), ValueError, "temperature must be positive"),
        (lambda q, d: infonce_loss(q, d, temperature=torch.tensor(0.0)), ValueError, "temperature must be positive"),
        (lambda q, d: InfoNCELoss(-1.0), ValueError, "temperature must be positive"),
        (lambda q, d: infonce_loss(q, d[:10]), ValueError, "multiple of B"),
        (lambda q, d: infonce_loss(q, d, torch.arange(4), in_batch_negatives=False), ValueError, "needs doc_owner"),
        (lambda q, d: infonce_loss(q, d, in_batch_negatives=False, query_query=True), ValueError, "in-batch terms"),
        (lambda q, d: infonce_loss(q, d[:4], hard_negatives=torch.randn(3, 2, 8)), ValueError, "hard_negatives"),
        (lambda q, d: infonce_loss(q, d, similarity="l2"), ValueError, "similarity"),
        (lambda q, d: infonce_loss(q, d, reduction="max"), ValueError, "reduction"),
        (lambda q, d: infonce_loss(q[0], d), ValueError, r"queries must have shape \[B, D\]"),
        (lambda q, d: InfoNCELoss(0.05, learnable_temperature=True, temperature_range=(0.1, 1.0)), ValueError, "range"),
        (lambda q, d: InfoNCELoss(0.05, hard_negatives=None), TypeError, "per-call"),
        (lambda q, d: infonce_loss(q, d.double()), TypeError, "documents must have the dtype of queries"),
        (
            lambda q, d: infonce_loss(q, d[:4], hard_negatives=torch.randn(4, 2, 8).half(), in_batch_negatives=False),
            TypeError,
            "hard_negatives must have the dtype",
        ),
        (lambda q, d: infonce_loss(q, d, torch.tensor([0, 0, 1, 2]), doc_doc=True), ValueError, "distinct positives"),
    ],
    ids=[
        "D-mismatch",
        "label-too-big",
        "label-negative",
        "label-shape",
        "neg-temperature",
        "zero-temp-tensor",
        "module-neg-temperature",
        "bad-layout",
        "owner-missing",
        "qq-without-in-batch",
        "hard-neg-shape",
        "bad-similarity",
        "bad-reduction",
        "queries-1d",
        "temp-outside-range",
        "per-call-option",
        "doc-dtype",
        "hard-neg-dtype",
        "doc-doc-repeated-positive",
    ],
)
def test_bad_input(make_call, error, match):
    q, d = torch.randn(4, 8), torch.randn(12, 8)
    with pytest.raises(error, match=match):
        make_call(q, d)
