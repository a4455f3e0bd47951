// Latent cross-attention on CUDA tensors: the op's host-side algorithm (see
// latent_cross_attention_host.h for the contract; bindings.cpp checks the arguments).
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
//
// The current stream comes from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (the
// same stream): the latter pulls in cuBLAS/cuSPARSE headers that CPU CI does not have. The GEMMs
// go to cuBLAS through ATen calls (at::mm / at::addmm), which need no cuBLAS header here.

#include "latent_attention/latent_cross_attention_host.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common/torch_utils.h"
#include "latent_attention/latent_cross_attention.cuh"

namespace latentembed {
namespace {

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

// xn = LN(x) [T, D] in x's dtype, with w, b the fp32 LayerNorm parameters [D]. With
// compute_stats the statistics are computed and written to mean and rstd ([T] fp32); without,
// they are read (the backward rebuilds xn from the saved ones) and eps is unused.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                      const at::Tensor& mean, const at::Tensor& rstd, bool compute_stats,
                      double eps, cudaStream_t stream, const char* what) {
  at::Tensor xn = at::empty_like(x);
  LcaLayerNormParams ln{};
  ln.x = x.const_data_ptr();
  ln.weight = w.const_data_ptr<float>();
  ln.bias = b.const_data_ptr<float>();
  if (compute_stats) {
    ln.mean = mean.data_ptr<float>();
    ln.rstd = rstd.data_ptr<float>();
  } else {  // read, not written
    ln.mean = const_cast<float*>(mean.const_data_ptr<float>());
    ln.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
  }
  ln.xn = xn.data_ptr();
  ln.rows = x.size(0);
  ln.features = x.size(1);
  ln.eps = static_cast<float>(eps);
  ln.compute_stats = compute_stats;
  ln.dtype = kernel_dtype<LcaDtype>(x, "x");
  check_launch(lca_layer_norm_fwd(ln, stream), what);
  return xn;
}

// probs [T, H*R] (x's dtype) = the softmax over the R latents of each head of scores [T, H*R]
// (fp32, or x's dtype on a torch without aten::mm.dtype).
void head_softmax_fwd(const at::Tensor& scores, const at::Tensor& probs, int64_t heads,
                      int64_t latents, cudaStream_t stream) {
  LcaSoftmaxParams sm{};
  sm.scores = scores.const_data_ptr();
  sm.probs = probs.data_ptr();
  sm.rows = probs.size(0);
  sm.heads = heads;
  sm.latents = latents;
  sm.gemm_fp32 = scores.scalar_type() == at::kFloat;
  sm.dtype = kernel_dtype<LcaDtype>(probs, "probs");
  check_launch(lca_softmax_fwd(sm, stream), "latent_attn_fwd_cuda (softmax)");
}

// dscores [T, H*R] (probs' dtype) = probs * (dprobs - sum over each head's R latents of
// probs * dprobs), with dprobs [T, H*R] fp32 (or probs' dtype).
at::Tensor head_softmax_bwd(const at::Tensor& probs, const at::Tensor& dprobs, int64_t heads,
                            int64_t latents, cudaStream_t stream) {
  at::Tensor dscores = at::empty_like(probs);
  LcaSoftmaxBwdParams sb{};
  sb.probs = probs.const_data_ptr();
  sb.dprobs = dprobs.const_data_ptr();
  sb.dscores = dscores.data_ptr();
  sb.rows = probs.size(0);
  sb.heads = heads;
  sb.latents = latents;
  sb.gemm_fp32 = dprobs.scalar_type() == at::kFloat;
  sb.dtype = kernel_dtype<LcaDtype>(probs, "probs");
  check_launch(lca_softmax_bwd(sb, stream), "latent_attn_bwd_cuda (softmax)");
  return dscores;
}

// The LayerNorm backward plus the residual: dx [T, D] in x's dtype, and the fp32 gradients of
// the LayerNorm weight and bias [D], each a sum of per-chunk partials (deterministic).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_xn, const at::Tensor& x, const at::Tensor& w,
    const at::Tensor& mean, const at::Tensor& rstd, cudaStream_t stream) {
  const int64_t T = x.size(0);
  const int64_t D = x.size(1);
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
  lb.dtype = kernel_dtype<LcaDtype>(x, "x");
  check_launch(lca_layer_norm_bwd(lb, stream), "latent_attn_bwd_cuda (LayerNorm backward)");
  return {dx, dw_partial.sum(0), db_partial.sum(0)};
}

}  // namespace

LcaForward latent_cross_attention_fwd(const at::Tensor& x_in, const LcaWeights& weights,
                                      double eps) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = weights.m.contiguous();
  const at::Tensor u = weights.u.contiguous();
  const int64_t T = x.size(0);
  const int64_t D = x.size(1);
  const int64_t N = m.size(0) * m.size(1);
  const at::TensorOptions stats_options = x.options().dtype(at::kFloat);
  LcaForward out;
  out.saved.probs = at::empty({T, N}, x.options());
  out.saved.mean = at::empty({T}, stats_options);
  out.saved.rstd = at::empty({T}, stats_options);
  if (T == 0) {  // no launch with an empty grid
    out.y = x.clone();
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const at::Tensor w = weights.ln_weight.to(at::kFloat).contiguous();
  const at::Tensor b = weights.ln_bias.to(at::kFloat).contiguous();

  const at::Tensor xn = layer_norm(x, w, b, out.saved.mean, out.saved.rstd,
                                   /*compute_stats=*/true, eps, stream,
                                   "latent_attn_fwd_cuda (LayerNorm)");
  const at::Tensor scores = mm_fp32_out(xn, m.view({N, D}).t()).contiguous();
  head_softmax_fwd(scores, out.saved.probs, m.size(0), m.size(1), stream);
  out.y = at::addmm(x, out.saved.probs, u.view({N, D}));
  return out;
}

LcaGrads latent_cross_attention_bwd(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                    const LcaWeights& weights, const LcaSaved& saved,
                                    bool need_dm, bool need_du) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor m = weights.m.contiguous();
  const at::Tensor u = weights.u.contiguous();
  const at::Tensor probs = saved.probs.contiguous();
  const at::Tensor mean = saved.mean.contiguous();
  const at::Tensor rstd = saved.rstd.contiguous();
  const int64_t T = x.size(0);
  const int64_t D = x.size(1);
  const int64_t H = m.size(0);
  const int64_t R = m.size(1);
  const int64_t N = H * R;
  LcaGrads grads;
  grads.m = m.new_empty({0});
  grads.u = u.new_empty({0});
  if (T == 0) {  // no launch with an empty grid; every gradient is zero
    grads.x = at::empty_like(x);
    grads.ln_weight = at::zeros_like(weights.ln_weight);
    grads.ln_bias = at::zeros_like(weights.ln_bias);
    if (need_dm) grads.m = at::zeros_like(m);
    if (need_du) grads.u = at::zeros_like(u);
    return grads;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const at::Tensor w = weights.ln_weight.to(at::kFloat).contiguous();
  const at::Tensor b = weights.ln_bias.to(at::kFloat).contiguous();

  const at::Tensor dscores =
      head_softmax_bwd(probs, mm_fp32_out(grad_y, u.view({N, D}).t()).contiguous(), H, R, stream);
  if (need_dm) {
    const at::Tensor xn = layer_norm(x, w, b, mean, rstd, /*compute_stats=*/false, /*eps=*/0.0,
                                     stream, "latent_attn_bwd_cuda (LayerNorm)");
    grads.m = at::mm(dscores.t(), xn).view({H, R, D});
  }
  if (need_du) grads.u = at::mm(probs.t(), grad_y).view({H, R, D});

  const at::Tensor grad_xn = mm_fp32_out(dscores, m.view({N, D})).contiguous();
  auto [dx, dw, db] = layer_norm_bwd(grad_y, grad_xn, x, w, mean, rstd, stream);
  grads.x = dx;
  grads.ln_weight = dw.to(weights.ln_weight.scalar_type());
  grads.ln_bias = db.to(weights.ln_bias.scalar_type());
  return grads;
}

}  // namespace latentembed
