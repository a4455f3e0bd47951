// Latent cross-attention kernels: launchers over latent_cross_attention_kernels.cuh (see
// latent_cross_attention.cuh for shapes and semantics, latent_cross_attention_host.cpp for the
// whole op).
//
// Built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): only explicit conversion
// intrinsics. No fast math: expf and sqrtf are the accurate versions.

#include "latent_cross_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/launch_utils.cuh"
#include "latent_cross_attention_kernels.cuh"

namespace latentembed {
namespace lca {
namespace {

// Grid-stride loops cover any count; this only bounds the launch.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int64_t kRowsPerChunk = 64;
constexpr int64_t kMaxChunks = 1024;

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(items < kMaxBlocks ? items : kMaxBlocks);
}

bool valid(int64_t a, int64_t b) { return a >= 0 && b >= 0; }

// launch(TypeTag<T>{}, TypeTag<G>{}): T the op dtype, G the dtype of the GEMM outputs the kernel
// reads (fp32 when gemm_fp32, else T: a torch without aten::mm.dtype).
template <typename Launch>
cudaError_t dispatch_dtypes(LcaDtype dtype, bool gemm_fp32, Launch&& launch) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return dispatch_bool(gemm_fp32, [&](auto fp32) {
      return launch(t, TypeTag<std::conditional_t<decltype(fp32)::value, float, T>>{});
    });
  });
}

// A segment kernel (softmax forward or backward), kernel_of(TypeTag<T>{}, TypeTag<S>{}), on
// one block per (row, head) segment of p.latents scores.
template <typename Params, typename KernelOf>
cudaError_t launch_segments(const Params& p, cudaStream_t stream, KernelOf&& kernel_of) {
  if (!valid(p.rows, p.heads) || p.latents < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.heads == 0 || p.latents == 0) return cudaSuccess;
  return dispatch_dtypes(p.dtype, p.gemm_fp32, [&](auto t, auto s) {
    return launch_kernel(kernel_of(t, s), blocks_for(p.rows * p.heads), kThreads, stream, p);
  });
}

}  // namespace
}  // namespace lca

int64_t lca_ln_bwd_chunks(int64_t rows, int64_t* rows_per_chunk) {
  int64_t per = lca::kRowsPerChunk;
  if (rows > per * lca::kMaxChunks) per = (rows + lca::kMaxChunks - 1) / lca::kMaxChunks;
  *rows_per_chunk = per;
  return rows > 0 ? (rows + per - 1) / per : 0;
}

cudaError_t lca_layer_norm_fwd(const LcaLayerNormParams& p, cudaStream_t stream) {
  if (!lca::valid(p.rows, p.features)) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.features == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_kernel(lca::layer_norm_fwd_kernel<T>, lca::blocks_for(p.rows), lca::kThreads,
                         stream, p);
  });
}

cudaError_t lca_softmax_fwd(const LcaSoftmaxParams& p, cudaStream_t stream) {
  return lca::launch_segments(p, stream, [](auto t, auto s) {
    return lca::softmax_fwd_kernel<typename decltype(t)::type, typename decltype(s)::type>;
  });
}

cudaError_t lca_softmax_bwd(const LcaSoftmaxBwdParams& p, cudaStream_t stream) {
  return lca::launch_segments(p, stream, [](auto t, auto s) {
    return lca::softmax_bwd_kernel<typename decltype(t)::type, typename decltype(s)::type>;
  });
}

cudaError_t lca_layer_norm_bwd(const LcaLayerNormBwdParams& p, cudaStream_t stream) {
  if (!lca::valid(p.rows, p.features) || p.chunks < 0 || p.rows_per_chunk < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.chunks * p.rows_per_chunk < p.rows) return cudaErrorInvalidValue;  // rows left out
  if (p.rows == 0 || p.features == 0) return cudaSuccess;
  return lca::dispatch_dtypes(p.dtype, p.gemm_fp32, [&](auto t, auto g) {
    using T = typename decltype(t)::type;
    using G = typename decltype(g)::type;
    const cudaError_t err = launch_kernel(lca::layer_norm_bwd_dx_kernel<T, G>,
                                          lca::blocks_for(p.rows), lca::kThreads, stream, p);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(ceil_div(p.features, 32)),
                    static_cast<unsigned>(p.chunks < kMaxGridYZ ? p.chunks : kMaxGridYZ));
    return launch_kernel(lca::layer_norm_bwd_params_kernel<T, G>, grid, dim3(32, lca::kColWarps),
                         stream, p);
  });
}

}  // namespace latentembed
