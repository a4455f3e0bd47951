// Latent cross-attention (folded NV-Embed block): the CUDA kernels that cuBLAS cannot fuse.
//
// No torch/ATen/c10 header on purpose: this file and latent_cross_attention.cu compile alone with
// `nvcc -arch=sm_90 -c` on machines whose torch has no CUDA headers (CPU CI); the cuBLAS GEMMs
// (through ATen) between these kernels are in latent_cross_attention_host.cpp, which documents
// the whole forward and backward, and the torch glue in bindings.cpp. Every tensor here is
// contiguous; sizes are int64, in elements.
//
// Shapes: T rows, D features, H heads, R latents, N = H * R.
//   x, xn, grad_y, grad_x [T, D] in the op dtype; weight, bias [D] fp32; mean, rstd [T] fp32;
//   scores, dprobs [T, N] fp32 (or the op dtype: see `gemm_fp32`); probs, dscores [T, N] in the
//   op dtype; grad_xn [T, D] fp32 (or the op dtype).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace latentembed {

enum class LcaDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// LayerNorm forward: xn = (x - mean) * rstd * weight + bias in the op dtype. With
// compute_stats, mean and rstd (two passes over the row, fp32) are computed and written;
// without, they are read (the backward rebuilds xn from the saved statistics).
struct LcaLayerNormParams {
  const void* x;
  const float* weight;
  const float* bias;
  float* mean;
  float* rstd;
  void* xn;
  int64_t rows;      // T
  int64_t features;  // D
  float eps;
  bool compute_stats;
  LcaDtype dtype;
};

// Per-head softmax over the R latents of each row: probs[t, h*R + r] = softmax_r(scores[t, h*R + r]).
struct LcaSoftmaxParams {
  const void* scores;  // fp32 when gemm_fp32, else the op dtype
  void* probs;         // op dtype
  int64_t rows;        // T
  int64_t heads;       // H
  int64_t latents;     // R
  bool gemm_fp32;
  LcaDtype dtype;
};

// Softmax backward per (row, head): dscores = probs * (dprobs - sum_r probs * dprobs).
struct LcaSoftmaxBwdParams {
  const void* probs;   // op dtype
  const void* dprobs;  // fp32 when gemm_fp32, else the op dtype
  void* dscores;       // op dtype
  int64_t rows;
  int64_t heads;
  int64_t latents;
  bool gemm_fp32;
  LcaDtype dtype;
};

// LayerNorm backward plus the residual: with g = grad_xn * weight and xhat = (x - mean) * rstd,
//   grad_x = grad_y + rstd * (g - mean_d(g) - xhat * mean_d(g * xhat)),
// and per-chunk partial sums of the LayerNorm parameter gradients (summed over chunks by the
// caller, deterministic): dw_partial[c, d] = sum over rows t of chunk c of grad_xn * xhat,
// db_partial[c, d] = sum of grad_xn. Chunk c is rows [c * rows_per_chunk, (c+1) * rows_per_chunk).
struct LcaLayerNormBwdParams {
  const void* grad_y;   // op dtype
  const void* grad_xn;  // fp32 when gemm_fp32, else the op dtype
  const void* x;        // op dtype
  const float* weight;
  const float* mean;
  const float* rstd;
  void* grad_x;         // op dtype
  float* dw_partial;    // [chunks, D]
  float* db_partial;    // [chunks, D]
  int64_t rows;
  int64_t features;
  int64_t chunks;
  int64_t rows_per_chunk;
  bool gemm_fp32;
  LcaDtype dtype;
};

// Rows a chunk of the parameter-gradient reduction takes, and the number of chunks, for T rows.
int64_t lca_ln_bwd_chunks(int64_t rows, int64_t* rows_per_chunk);

// All return the launch error (cudaSuccess when nothing had to be launched) and never
// synchronize. Nothing is launched when a size is 0.
cudaError_t lca_layer_norm_fwd(const LcaLayerNormParams& params, cudaStream_t stream);
cudaError_t lca_softmax_fwd(const LcaSoftmaxParams& params, cudaStream_t stream);
cudaError_t lca_softmax_bwd(const LcaSoftmaxBwdParams& params, cudaStream_t stream);
cudaError_t lca_layer_norm_bwd(const LcaLayerNormBwdParams& params, cudaStream_t stream);

}  // namespace latentembed
