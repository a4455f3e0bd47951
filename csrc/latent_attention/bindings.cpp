// Torch glue for the latent-attention CUDA ops: argument checks, outputs, stream, device.
//
// The op schemas are defined in Python (src/latentembed/ops/latent_attention/cuda.py); this file
// only registers their CUDA implementations. geglu_segment_mean's kernels are launched here;
// latent cross-attention's host-side algorithm (LayerNorm and softmax kernels between cuBLAS
// GEMMs) is in latent_cross_attention_host.cpp. The kernels write every output element they
// own, so outputs are allocated with at::empty.
//
// The current stream comes from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (the
// same stream): the latter pulls in cuBLAS/cuSPARSE headers that CPU CI does not have.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/torch_utils.h"
#include "latent_attention/geglu_segment_mean.cuh"
#include "latent_attention/latent_cross_attention.cuh"
#include "latent_attention/latent_cross_attention_host.h"

namespace latentembed {
namespace {

// a as [T, 2F] with a unit column stride (a copy only when it has another one).
at::Tensor checked_a(const at::Tensor& a) {
  check_cuda_tensor(a, "a");
  TORCH_CHECK(a.dim() == 2 && a.size(1) % 2 == 0 && a.size(1) > 0,
              "a must have shape [T, 2F] with F >= 1, got ", a.sizes());
  return a.stride(1) == 1 ? a : a.contiguous();
}

// a [T, 2F], cu_seqlens [B+1] -> [B, F] in a's dtype.
at::Tensor geglu_segment_mean_fwd_cuda(const at::Tensor& a_in, const at::Tensor& cu_seqlens) {
  const at::Tensor a = checked_a(a_in);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, a, "a");
  GegluSegmentMeanFwdParams p{};
  p.dtype = kernel_dtype<GegluDtype>(a, "a");
  p.batch = cu.size(0) - 1;
  p.rows = a.size(0);
  p.features = a.size(1) / 2;
  at::Tensor out = at::empty({p.batch, p.features}, a.options());
  p.a = a.const_data_ptr();
  p.cu_seqlens = cu.const_data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.stride_at = a.stride(0);
  p.stride_ob = out.stride(0);
  check_launch(geglu_segment_mean_fwd(p, c10::cuda::getCurrentCUDAStream(a.device().index())),
               "geglu_segment_mean_fwd_cuda");
  return out;
}

// grad_out [B, F] -> grad of a [T, 2F], contiguous.
at::Tensor geglu_segment_mean_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& a_in,
                                       const at::Tensor& cu_seqlens) {
  const at::Tensor a = checked_a(a_in);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, a, "a");
  check_same_device(grad_out_in, "grad_out", a, "a");
  check_same_dtype(grad_out_in, "grad_out", a, "a");
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == cu.size(0) - 1 &&
                  grad_out_in.size(1) == a.size(1) / 2,
              "grad_out must have shape [B, F] = [", cu.size(0) - 1, ", ", a.size(1) / 2,
              "], got ", grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.stride(1) == 1 ? grad_out_in : grad_out_in.contiguous();
  GegluSegmentMeanBwdParams p{};
  p.dtype = kernel_dtype<GegluDtype>(a, "a");
  p.batch = cu.size(0) - 1;
  p.rows = a.size(0);
  p.features = a.size(1) / 2;
  at::Tensor grad_a = at::empty({p.rows, 2 * p.features}, a.options());
  p.grad_out = grad_out.const_data_ptr();
  p.a = a.const_data_ptr();
  p.cu_seqlens = cu.const_data_ptr<int32_t>();
  p.grad_a = grad_a.data_ptr();
  p.stride_gob = grad_out.stride(0);
  p.stride_at = a.stride(0);
  p.stride_gat = grad_a.stride(0);
  check_launch(geglu_segment_mean_bwd(p, c10::cuda::getCurrentCUDAStream(a.device().index())),
               "geglu_segment_mean_bwd_cuda");
  return grad_a;
}

// ------------------------------------------------------------------------ latent cross-attention

// t on x's device (and with x's dtype when same_dtype).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, bool same_dtype) {
  check_same_device(t, name, x, "x");
  if (same_dtype) check_same_dtype(t, name, x, "x");
}

// Checks x [T, D], ln_weight/ln_bias [D], m/u [H, R, D] in x's dtype; returns the parameters.
LcaWeights checked_lca_args(const at::Tensor& x, const at::Tensor& ln_weight,
                            const at::Tensor& ln_bias, const at::Tensor& m, const at::Tensor& u) {
  check_cuda_tensor(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x must have shape [T, D] with D >= 1, got ",
              x.sizes());
  kernel_dtype<LcaDtype>(x, "x");
  const int64_t D = x.size(1);
  check_like(ln_weight, "ln_weight", x, false);
  check_like(ln_bias, "ln_bias", x, false);
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == D, "ln_weight must have shape [", D,
              "], got ", ln_weight.sizes());
  TORCH_CHECK(ln_bias.dim() == 1 && ln_bias.size(0) == D, "ln_bias must have shape [", D,
              "], got ", ln_bias.sizes());
  TORCH_CHECK(ln_weight.is_floating_point() && ln_bias.is_floating_point(),
              "ln_weight and ln_bias must be floating point, got ", ln_weight.scalar_type(),
              " and ", ln_bias.scalar_type());
  check_like(m, "m", x, true);
  check_like(u, "u", x, true);
  TORCH_CHECK(m.dim() == 3 && m.size(0) > 0 && m.size(1) > 0 && m.size(2) == D,
              "m must have shape [H, R, ", D, "] with H, R >= 1, got ", m.sizes());
  TORCH_CHECK(u.sizes() == m.sizes(), "u must have m's shape ", m.sizes(), ", got ", u.sizes());
  LcaWeights weights;
  weights.ln_weight = ln_weight;
  weights.ln_bias = ln_bias;
  weights.m = m;
  weights.u = u;
  return weights;
}

// x, ln_weight, ln_bias, m, u -> (y [T, D], P [T, H*R] in x's dtype, mean [T], rstd [T] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_attn_fwd_cuda(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& m, const at::Tensor& u, double eps) {
  const LcaWeights weights = checked_lca_args(x, ln_weight, ln_bias, m, u);
  const c10::cuda::CUDAGuard guard(x.device());
  const LcaForward out = latent_cross_attention_fwd(x, weights, eps);
  return {out.y, out.saved.probs, out.saved.mean, out.saved.rstd};
}

// Gradients (dx, d ln_weight, d ln_bias, dm, du); dm / du are empty when not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_attn_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& m, const at::Tensor& u, const at::Tensor& probs,
    const at::Tensor& mean, const at::Tensor& rstd, bool need_dm, bool need_du) {
  const LcaWeights weights = checked_lca_args(x, ln_weight, ln_bias, m, u);
  const int64_t T = x.size(0);
  const int64_t N = m.size(0) * m.size(1);
  check_like(grad_y, "grad_y", x, true);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y must have x's shape ", x.sizes(), ", got ",
              grad_y.sizes());
  check_like(probs, "probs", x, true);
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == T && probs.size(1) == N,
              "probs must have shape [", T, ", ", N, "], got ", probs.sizes());
  const auto check_statistic = [&](const at::Tensor& s, const char* name) {
    check_like(s, name, x, false);
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == T, name,
                " must be float32 of shape [", T, "], got ", s.scalar_type(), " ", s.sizes());
  };
  check_statistic(mean, "mean");
  check_statistic(rstd, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  LcaSaved saved;
  saved.probs = probs;
  saved.mean = mean;
  saved.rstd = rstd;
  const LcaGrads g = latent_cross_attention_bwd(grad_y, x, weights, saved, need_dm, need_du);
  return {g.x, g.ln_weight, g.ln_bias, g.m, g.u};
}

}  // namespace
}  // namespace latentembed

TORCH_LIBRARY_IMPL(latentembed, CUDA, m) {
  m.impl("geglu_segment_mean_fwd_cuda", &latentembed::geglu_segment_mean_fwd_cuda);
  m.impl("geglu_segment_mean_bwd_cuda", &latentembed::geglu_segment_mean_bwd_cuda);
  m.impl("latent_attn_fwd_cuda", &latentembed::latent_attn_fwd_cuda);
  m.impl("latent_attn_bwd_cuda", &latentembed::latent_attn_bwd_cuda);
}
