// Latent cross-attention kernels: launchers over latent_cross_attention_kernels.cuh (see
// latent_cross_attention.cuh for shapes and semantics, bindings.cpp for the whole op).
//
// Built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): only explicit conversion
// intrinsics. No fast math: expf and sqrtf are the accurate versions.

#include "latent_cross_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

template <typename T>
cudaError_t launch_ln_fwd(const LcaLayerNormParams& p, cudaStream_t stream) {
  layer_norm_fwd_kernel<T><<<blocks_for(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// S: the dtype of the GEMM outputs the kernel reads (fp32, or T on a torch without mm.dtype).
template <typename T>
cudaError_t launch_softmax_fwd(const LcaSoftmaxParams& p, cudaStream_t stream) {
  const unsigned grid = blocks_for(p.rows * p.heads);
  if (p.gemm_fp32) {
    softmax_fwd_kernel<T, float><<<grid, kThreads, 0, stream>>>(p);
  } else {
    softmax_fwd_kernel<T, T><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_softmax_bwd(const LcaSoftmaxBwdParams& p, cudaStream_t stream) {
  const unsigned grid = blocks_for(p.rows * p.heads);
  if (p.gemm_fp32) {
    softmax_bwd_kernel<T, float><<<grid, kThreads, 0, stream>>>(p);
  } else {
    softmax_bwd_kernel<T, T><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t launch_ln_bwd_typed(const LcaLayerNormBwdParams& p, cudaStream_t stream) {
  layer_norm_bwd_dx_kernel<T, G><<<blocks_for(p.rows), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.features + 31) / 32),
                  static_cast<unsigned>(p.chunks < kMaxGridYZ ? p.chunks : kMaxGridYZ));
  layer_norm_bwd_params_kernel<T, G><<<grid, dim3(32, kColWarps), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ln_bwd(const LcaLayerNormBwdParams& p, cudaStream_t stream) {
  return p.gemm_fp32 ? launch_ln_bwd_typed<T, float>(p, stream) : launch_ln_bwd_typed<T, T>(p, stream);
}

}  // namespace
}  // namespace lca

int64_t lca_ln_bwd_chunks(int64_t rows, int64_t* rows_per_chunk) {
  int64_t per = lca::kRowsPerChunk;
  if (rows > per * lca::kMaxChunks) per = (rows + lca::kMaxChunks - 1) / lca::kMaxChunks;
  *rows_per_chunk = per;
  return rows > 0 ? (rows + per - 1) / per : 0;
}

// One switch per entry point: float / __half / __nv_bfloat16 by the op dtype.
#define LCA_DISPATCH(dtype, launch, p, stream)                                        \
  switch (dtype) {                                                                    \
    case LcaDtype::kFloat32: return lca::launch<float>(p, stream);                    \
    case LcaDtype::kFloat16: return lca::launch<__half>(p, stream);                   \
    case LcaDtype::kBFloat16: return lca::launch<__nv_bfloat16>(p, stream);           \
  }                                                                                   \
  return cudaErrorInvalidValue

cudaError_t lca_layer_norm_fwd(const LcaLayerNormParams& p, cudaStream_t stream) {
  if (!lca::valid(p.rows, p.features)) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.features == 0) return cudaSuccess;
  LCA_DISPATCH(p.dtype, launch_ln_fwd, p, stream);
}

cudaError_t lca_softmax_fwd(const LcaSoftmaxParams& p, cudaStream_t stream) {
  if (!lca::valid(p.rows, p.heads) || p.latents < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.heads == 0 || p.latents == 0) return cudaSuccess;
  LCA_DISPATCH(p.dtype, launch_softmax_fwd, p, stream);
}

cudaError_t lca_softmax_bwd(const LcaSoftmaxBwdParams& p, cudaStream_t stream) {
  if (!lca::valid(p.rows, p.heads) || p.latents < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.heads == 0 || p.latents == 0) return cudaSuccess;
  LCA_DISPATCH(p.dtype, launch_softmax_bwd, p, stream);
}

cudaError_t lca_layer_norm_bwd(const LcaLayerNormBwdParams& p, cudaStream_t stream) {
  if (!lca::valid(p.rows, p.features) || p.chunks < 0 || p.rows_per_chunk < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.chunks * p.rows_per_chunk < p.rows) return cudaErrorInvalidValue;  // rows left out
  if (p.rows == 0 || p.features == 0) return cudaSuccess;
  LCA_DISPATCH(p.dtype, launch_ln_bwd, p, stream);
}

#undef LCA_DISPATCH

}  // namespace latentembed
