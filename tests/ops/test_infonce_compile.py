"""infonce ops under compilers: the Triton kernels compile for the H100 (sm_90) to a cubin with
tensor-core instructions on a machine without a GPU (the interpreter accepts code the GPU
compiler rejects; run in a subprocess because this process has TRITON_INTERPRET=1 set), the
public functions trace under torch.compile without a graph break, and the custom ops pass
torch.library.opcheck (schema, fakes, autograd registration)."""

import pytest
import torch

from latentembed.ops.infonce import CandidateRule, infonce_lse, infonce_per_query_loss
from tests.ops._common import cpu_only_compile, run_compile_script
from tests.ops.infonce_helpers import DEVICE, HAS_GPU


@cpu_only_compile
def test_infonce_kernels_compile_for_sm90_without_spills():
    # Every configuration the autotuner may try for the benchmark's option set (and for no mask,
    # every mask, fp32), compiled for the H100: no register spills, tensor cores for bf16.
    pytest.importorskip("triton")
    from latentembed.ops.infonce.triton import shipped_configs

    compiled, stdout = run_compile_script("compile_infonce_sm90.py")
    expected = 2  # the positive-score kernel, bf16 and fp32
    for option_set, dtype in (("pos", "bf16"), ("none", "bf16"), ("all", "bf16"), ("pos", "fp32"), ("all", "fp32")):
        masks = option_set == "all"
        expected += sum(len(shipped_configs(dtype == "fp32", backward, masks)) for backward in (False, True))
    assert len(compiled) == expected, stdout
    assert all(" spills 0/0 B " in line for line in compiled), stdout


def test_shipped_configs_prune_what_spilled():
    # The tiles that spilled for sm_90 (compile script) are never offered: [128, 128] 16-bit tiles
    # in a backward with masks, 16-bit tiles for fp32 input.
    from latentembed.ops.infonce.triton import FP32_CONFIGS, HALF_CONFIGS, shipped_configs

    assert shipped_configs(False, False, True) == HALF_CONFIGS
    assert all(c[1] <= 64 for c in shipped_configs(False, True, True))
    assert shipped_configs(True, True, False) == FP32_CONFIGS


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
        fused, _ = infonce_per_query_loss(q, d, scale, pos_index=pos, backend=backend)
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


def _op_cases(device):
    """(q, d, scale, [(rule, subtract_positive), ...]): no option, every option, keys without positives."""
    B, N, D = 5, 9, 20
    q, d = torch.randn(B, D, device=device), torch.randn(N, D, device=device)
    scale = torch.tensor(1.5, device=device)
    pos = torch.randint(0, N, (B,), device=device)
    owner = torch.randint(0, B, (N,), device=device)
    key = torch.randint(0, 4, (N,), device=device)
    pos_key = torch.randint(0, 4, (B,), device=device)
    score = torch.randn(B, device=device)
    return (
        q,
        d,
        scale,
        [
            (CandidateRule(), False),
            (
                CandidateRule(
                    pos_index=pos,
                    pos_score=score,
                    doc_owner=owner,
                    doc_key=key,
                    threshold=0.5,
                    margin=0.9,
                    exclude_diagonal=True,
                ),
                True,
            ),
            (CandidateRule(doc_key=key, pos_key=pos_key, exclude_diagonal=True), False),
        ],
    )


def _opcheck(forward_op, backward_op, device):
    q, d, scale, cases = _op_cases(device)
    for rule, sub in cases:
        torch.library.opcheck(forward_op, (q, d, scale), rule.keywords())
        lse, _, _ = forward_op(q, d, scale, **rule.keywords())
        g = torch.randn_like(lse)
        torch.library.opcheck(backward_op, (g, q, d, scale, lse), dict(rule.keywords(), subtract_positive=sub))


def test_triton_ops_pass_opcheck():
    from latentembed.ops.infonce.triton import infonce_lse_bwd_triton, infonce_lse_fwd_triton

    _opcheck(infonce_lse_fwd_triton, infonce_lse_bwd_triton, DEVICE)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_ops_pass_opcheck():
    from latentembed._extension import load_extension
    from latentembed.ops.infonce import cuda  # noqa: F401  (defines the schemas)

    load_extension()
    ops = torch.ops.latentembed
    _opcheck(ops.infonce_lse_fwd_cuda.default, ops.infonce_lse_bwd_cuda.default, "cuda")
