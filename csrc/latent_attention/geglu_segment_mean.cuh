// GEGLU segment mean, forward and backward, as plain CUDA launchers.
//
// No torch/ATen/c10 header on purpose: this file and geglu_segment_mean.cu compile alone with
// `nvcc -arch=sm_90 -c` on machines whose torch has no CUDA headers (CPU CI); the torch glue
// lives in csrc/latent_attention/bindings.cpp. Sizes and strides are int64, in elements.
//
// Shapes (B sequences, F features, T packed rows):
//   a [T, 2F]: row t is [v_t, g_t] (value half, then gate half), unit column stride;
//   cu_seqlens int32 [B+1] (sequence b is rows cu[b]..cu[b+1]).
// Forward:  out[b] = sum over the rows t of b of v_t * gelu(g_t) / max(len_b, 1), exact (erf)
//           gelu, accumulated in fp32; out [B, F].
// Backward: with s = grad_out[b] / max(len_b, 1) for row t of sequence b,
//           grad_v_t = s * gelu(g_t), grad_g_t = s * v_t * gelu'(g_t); grad_a [T, 2F].
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace latentembed {

enum class GegluDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GegluSegmentMeanFwdParams {
  const void* a;               // [T, 2F], row stride stride_at, unit column stride
  const int32_t* cu_seqlens;   // [B+1] contiguous
  void* out;                   // [B, F], row stride stride_ob, unit column stride
  int64_t batch;               // B
  int64_t rows;                // T
  int64_t features;            // F
  int64_t stride_at;
  int64_t stride_ob;
  GegluDtype dtype;
};

struct GegluSegmentMeanBwdParams {
  const void* grad_out;        // [B, F], row stride stride_gob, unit column stride
  const void* a;               // [T, 2F], row stride stride_at, unit column stride
  const int32_t* cu_seqlens;   // [B+1] contiguous
  void* grad_a;                // [T, 2F], row stride stride_gat, unit column stride
  int64_t batch;
  int64_t rows;
  int64_t features;
  int64_t stride_gob;
  int64_t stride_at;
  int64_t stride_gat;
  GegluDtype dtype;
};

// Both return the launch error (cudaSuccess when nothing had to be launched) and never
// synchronize. The backward writes every row only when cu_seqlens is valid
// (0 = cu[0] <= ... <= cu[B] = T); invalid offsets are clamped, never read out of bounds.
cudaError_t geglu_segment_mean_fwd(const GegluSegmentMeanFwdParams& params, cudaStream_t stream);
cudaError_t geglu_segment_mean_bwd(const GegluSegmentMeanBwdParams& params, cudaStream_t stream);

}  // namespace latentembed
