// Torch glue for the latent-attention CUDA kernels: argument checks, outputs, stream, device.
//
// The op schemas are defined in Python (src/latentembed/ops/latent_attention/cuda.py); this file
// only registers their CUDA implementations. The kernels write every output element they own,
// so outputs are allocated with at::empty.
//
// The current stream comes from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (the
// same stream): the latter pulls in cuBLAS/cuSPARSE headers that CPU CI does not have. The
// GEMMs of latent_cross_attention go to cuBLAS through ATen calls (at::mm / at::addmm), which
// need no cuBLAS header here.
//
// latent_cross_attention (x [T, D], m/u [H, R, D], N = H * R; see the Triton module's header for
// the shared design). What is fused in our kernels and what goes to cuBLAS, and why:
//   forward   1. kernel: LayerNorm statistics (fp32, two passes) + normalise, xn = LN(x) written
//               once in x's dtype (a GEMM operand must be in memory for cuBLAS; the Triton
//               backend instead normalises on load and never writes xn);
//             2. cuBLAS: scores = xn M_flat^T [T, N], fp32 output (mm.dtype) when this torch has
//               it, so the softmax sees unrounded scores;
//             3. kernel: per-head softmax over R, P [T, N] written in x's dtype (kept for the
//               backward, which then needs no recomputation of the scores);
//             4. cuBLAS: y = addmm(x, P, U_flat): the residual is fused as beta = 1.
//   backward  1. cuBLAS: dP = dy U_flat^T (fp32 output as above);
//             2. kernel: dS = P * (dP - rowsum_h(P * dP)) per head, in x's dtype;
//             3. cuBLAS: dLN = dS M_flat (fp32 output), dU = P^T dy; and, after a kernel rebuilds
//               xn from the saved statistics, dM = dS^T xn;
//             4. kernel: LayerNorm backward + the residual gradient (dx = dy + ...), and a
//               column kernel for per-chunk partial sums of d ln_weight / d ln_bias, summed here
//               (deterministic, no atomics).
// cuBLAS cannot apply a row-wise softmax or LayerNorm inside a GEMM, and a hand-written GEMM
// would be slower than cuBLAS's on these shapes, so the kernels are the memory-bound steps
// between GEMMs. ATen's GEMMs run under an autocast exclusion: the op computes in x's dtype.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common/torch_utils.h"
#include "latent_attention/geglu_segment_mean.cuh"
#include "latent_attention/latent_cross_attention.cuh"

namespace latentembed {
namespace {

// a as [T, 2F] with a unit column stride (a copy only when it has another one).
at::Tensor checked_a(const at::Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "a must be a CUDA tensor, got device ", a.device());
  TORCH_CHECK(a.dim() == 2 && a.size(1) % 2 == 0 && a.size(1) > 0,
              "a must have shape [T, 2F] with F >= 1, got ", a.sizes());
  return a.stride(1) == 1 ? a : a.contiguous();
}

at::Tensor checked_cu_seqlens(const at::Tensor& cu_seqlens, const at::Tensor& a) {
  TORCH_CHECK(cu_seqlens.device() == a.device(), "cu_seqlens must be on the same device as a (",
              a.device(), "), got ", cu_seqlens.device());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must have dtype int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "cu_seqlens must have shape [B+1], got ", cu_seqlens.sizes());
  return cu_seqlens.contiguous();
}

// a [T, 2F], cu_seqlens [B+1] -> [B, F] in a's dtype.
at::Tensor geglu_segment_mean_fwd_cuda(const at::Tensor& a_in, const at::Tensor& cu_seqlens) {
  const at::Tensor a = checked_a(a_in);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, a);
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
  const at::Tensor cu = checked_cu_seqlens(cu_seqlens, a);
  TORCH_CHECK(grad_out_in.device() == a.device(), "grad_out must be on the same device as a (",
              a.device(), "), got ", grad_out_in.device());
  TORCH_CHECK(grad_out_in.scalar_type() == a.scalar_type(), "grad_out must have a's dtype ",
              a.scalar_type(), ", got ", grad_out_in.scalar_type());
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

// ----------------------------------------------------------------------------- latent cross-attention

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, bool same_dtype) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on the same device as x (", x.device(),
              "), got ", t.device());
  TORCH_CHECK(!same_dtype || t.scalar_type() == x.scalar_type(), name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// Checks x [T, D], ln_weight/ln_bias [D], m/u [H, R, D] in x's dtype.
void check_lca_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    const at::Tensor& m, const at::Tensor& u) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x must have shape [T, D] with D >= 1, got ",
              x.sizes());
  kernel_dtype<LcaDtype>(x, "x");
  const int64_t D = x.size(1);
  check_like(w, "ln_weight", x, false);
  check_like(b, "ln_bias", x, false);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D, "ln_weight must have shape [", D, "], got ",
              w.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == D, "ln_bias must have shape [", D, "], got ",
              b.sizes());
  TORCH_CHECK(w.is_floating_point() && b.is_floating_point(),
              "ln_weight and ln_bias must be floating point, got ", w.scalar_type(), " and ",
              b.scalar_type());
  check_like(m, "m", x, true);
  check_like(u, "u", x, true);
  TORCH_CHECK(m.dim() == 3 && m.size(0) > 0 && m.size(1) > 0 && m.size(2) == D,
              "m must have shape [H, R, ", D, "] with H, R >= 1, got ", m.sizes());
  TORCH_CHECK(u.sizes() == m.sizes(), "u must have m's shape ", m.sizes(), ", got ", u.sizes());
}

// a @ b by cuBLAS (through ATen) with an fp32 result when torch has aten::mm.dtype (half
// inputs, fp32 output: what the softmax and LayerNorm kernels want), else in a's dtype (the
// kernels read either). Looked up at run time, so the extension builds and runs against torch
// versions with or without it; if it ever fails for another reason than memory, the op warns
// once and keeps to GEMM outputs in a's dtype.
at::Tensor mm_fp32_out(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  static const std::optional<c10::OperatorHandle> mm_dtype =
      c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
  static std::atomic<bool> usable{mm_dtype.has_value()};
  if (usable.load()) {
    try {
      return mm_dtype->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>()
          .call(a, b, at::kFloat);
    } catch (const c10::OutOfMemoryError&) {
      throw;
    } catch (const c10::Error& e) {
      usable.store(false);
      const std::string why = e.msg();
      TORCH_WARN("latent_cross_attention (cuda): aten::mm.dtype failed (",
                 why.substr(0, why.find('\n')), "); GEMM outputs stay in the input dtype");
    }
  }
  return at::mm(a, b);
}

// x, ln_weight, ln_bias, m, u -> (y [T, D], P [T, H*R] in x's dtype, mean [T], rstd [T] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_attn_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& m_in, const at::Tensor& u_in, double eps) {
  check_lca_args(x_in, ln_weight, ln_bias, m_in, u_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = m_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const int64_t T = x.size(0);
  const int64_t D = x.size(1);
  const int64_t H = m.size(0);
  const int64_t R = m.size(1);
  const at::TensorOptions stats_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({T}, stats_options);
  at::Tensor rstd = at::empty({T}, stats_options);
  at::Tensor probs = at::empty({T, H * R}, x.options());
  if (T == 0) return {x.clone(), probs, mean, rstd};  // no launch with an empty grid
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const at::Tensor w = ln_weight.to(at::kFloat).contiguous();
  const at::Tensor b = ln_bias.to(at::kFloat).contiguous();

  at::Tensor xn = at::empty_like(x);
  LcaLayerNormParams ln{};
  ln.x = x.const_data_ptr();
  ln.weight = w.const_data_ptr<float>();
  ln.bias = b.const_data_ptr<float>();
  ln.mean = mean.data_ptr<float>();
  ln.rstd = rstd.data_ptr<float>();
  ln.xn = xn.data_ptr();
  ln.rows = T;
  ln.features = D;
  ln.eps = static_cast<float>(eps);
  ln.compute_stats = true;
  ln.dtype = kernel_dtype<LcaDtype>(x, "x");
  check_launch(lca_layer_norm_fwd(ln, stream), "latent_attn_fwd_cuda (LayerNorm)");

  const at::Tensor scores = mm_fp32_out(xn, m.view({H * R, D}).t()).contiguous();
  LcaSoftmaxParams sm{};
  sm.scores = scores.const_data_ptr();
  sm.probs = probs.data_ptr();
  sm.rows = T;
  sm.heads = H;
  sm.latents = R;
  sm.gemm_fp32 = scores.scalar_type() == at::kFloat;
  sm.dtype = ln.dtype;
  check_launch(lca_softmax_fwd(sm, stream), "latent_attn_fwd_cuda (softmax)");

  at::Tensor y = at::addmm(x, probs, u.view({H * R, D}));
  return {y, probs, mean, rstd};
}

// Gradients (dx, d ln_weight, d ln_bias, dm, du); dm / du are empty when not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_attn_bwd_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& m_in, const at::Tensor& u_in,
    const at::Tensor& probs_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    bool need_dm, bool need_du) {
  check_lca_args(x_in, ln_weight, ln_bias, m_in, u_in);
  const int64_t T = x_in.size(0);
  const int64_t D = x_in.size(1);
  const int64_t H = m_in.size(0);
  const int64_t R = m_in.size(1);
  const int64_t N = H * R;
  check_like(grad_y_in, "grad_y", x_in, true);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "grad_y must have x's shape ", x_in.sizes(),
              ", got ", grad_y_in.sizes());
  check_like(probs_in, "probs", x_in, true);
  TORCH_CHECK(probs_in.dim() == 2 && probs_in.size(0) == T && probs_in.size(1) == N,
              "probs must have shape [", T, ", ", N, "], got ", probs_in.sizes());
  for (const at::Tensor* s : {&mean_in, &rstd_in}) {
    check_like(*s, s == &mean_in ? "mean" : "rstd", x_in, false);
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->dim() == 1 && s->size(0) == T,
                s == &mean_in ? "mean" : "rstd", " must be float32 of shape [", T, "], got ",
                s->scalar_type(), " ", s->sizes());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = m_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  if (T == 0) {  // no launch with an empty grid; every gradient is zero
    return {at::empty_like(x), at::zeros_like(ln_weight), at::zeros_like(ln_bias),
            need_dm ? at::zeros_like(m) : m.new_empty({0}),
            need_du ? at::zeros_like(u) : u.new_empty({0})};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const LcaDtype dtype = kernel_dtype<LcaDtype>(x, "x");
  const at::Tensor w = ln_weight.to(at::kFloat).contiguous();
  const at::Tensor b = ln_bias.to(at::kFloat).contiguous();
  const at::Tensor m_flat = m.view({N, D});

  at::Tensor dscores = at::empty({T, N}, x.options());
  {
    const at::Tensor dprobs = mm_fp32_out(grad_y, u.view({N, D}).t()).contiguous();
    LcaSoftmaxBwdParams sb{};
    sb.probs = probs.const_data_ptr();
    sb.dprobs = dprobs.const_data_ptr();
    sb.dscores = dscores.data_ptr();
    sb.rows = T;
    sb.heads = H;
    sb.latents = R;
    sb.gemm_fp32 = dprobs.scalar_type() == at::kFloat;
    sb.dtype = dtype;
    check_launch(lca_softmax_bwd(sb, stream), "latent_attn_bwd_cuda (softmax)");
  }

  at::Tensor dm = m.new_empty({0});
  if (need_dm) {
    at::Tensor xn = at::empty_like(x);  // LN(x) again, from the saved statistics
    LcaLayerNormParams ln{};
    ln.x = x.const_data_ptr();
    ln.weight = w.const_data_ptr<float>();
    ln.bias = b.const_data_ptr<float>();
    ln.mean = const_cast<float*>(mean.const_data_ptr<float>());  // read, not written
    ln.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
    ln.xn = xn.data_ptr();
    ln.rows = T;
    ln.features = D;
    ln.compute_stats = false;
    ln.dtype = dtype;
    check_launch(lca_layer_norm_fwd(ln, stream), "latent_attn_bwd_cuda (LayerNorm)");
    dm = at::mm(dscores.t(), xn).view({H, R, D});
  }
  at::Tensor du = need_du ? at::mm(probs.t(), grad_y).view({H, R, D}) : u.new_empty({0});

  const at::Tensor grad_xn = mm_fp32_out(dscores, m_flat).contiguous();
  int64_t rows_per_chunk = 1;
  const int64_t chunks = lca_ln_bwd_chunks(T, &rows_per_chunk);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor dw_partial = at::empty({chunks, D}, f32);
  at::Tensor db_partial = at::empty({chunks, D}, f32);
  at::Tensor dx = at::empty_like(x);
  LcaLayerNormBwdParams lb{};
  lb.grad_y = grad_y.const_data_ptr();
  lb.grad_xn = grad_xn.const_data_ptr();
  lb.x = x.const_data_ptr();
  lb.weight = w.const_data_ptr<float>();
  lb.mean = mean.const_data_ptr<float>();
  lb.rstd = rstd.const_data_ptr<float>();
  lb.grad_x = dx.data_ptr();
  lb.dw_partial = dw_partial.data_ptr<float>();
  lb.db_partial = db_partial.data_ptr<float>();
  lb.rows = T;
  lb.features = D;
  lb.chunks = chunks;
  lb.rows_per_chunk = rows_per_chunk;
  lb.gemm_fp32 = grad_xn.scalar_type() == at::kFloat;
  lb.dtype = dtype;
  check_launch(lca_layer_norm_bwd(lb, stream), "latent_attn_bwd_cuda (LayerNorm backward)");
  at::Tensor dw = dw_partial.sum(0).to(ln_weight.scalar_type());
  at::Tensor db = db_partial.sum(0).to(ln_bias.scalar_type());
  return {dx, dw, db, dm, du};
}

}  // namespace
}  // namespace latentembed

TORCH_LIBRARY_IMPL(latentembed, CUDA, m) {
  m.impl("geglu_segment_mean_fwd_cuda", &latentembed::geglu_segment_mean_fwd_cuda);
  m.impl("geglu_segment_mean_bwd_cuda", &latentembed::geglu_segment_mean_bwd_cuda);
  m.impl("latent_attn_fwd_cuda", &latentembed::latent_attn_fwd_cuda);
  m.impl("latent_attn_bwd_cuda", &latentembed::latent_attn_bwd_cuda);
}
