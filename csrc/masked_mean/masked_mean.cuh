// Masked mean pooling, forward and backward, as plain CUDA launchers.
//
// No torch/ATen/c10 header on purpose: this file and masked_mean.cu compile alone with
// `nvcc -arch=sm_90 -c` on machines whose torch has no CUDA headers (CPU CI), and the torch
// glue lives in csrc/masked_mean/bindings.cpp. Sizes and strides are int64 and counted in elements.
//
// Shapes (B sequences, D features):
//   padded: hidden [B, L, D], mask [B, L] (nonzero byte = keep; nullptr keeps every row)
//   packed: hidden [T, D], cu_seqlens int32 [B+1] (sequence b is rows cu[b]..cu[b+1])
// Forward:  out[b] = sum of the kept rows of sequence b / max(count_b, 1), accumulated in fp32.
// Backward: grad_hidden row = grad_out[b] / max(count_b, 1) on kept rows, 0 on dropped rows.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace latentembed {

enum class MaskedMeanDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct MaskedMeanFwdParams {
  const void* hidden;          // padded [B, L, D] / packed [T, D], any strides
  const uint8_t* mask;         // [B, L] bytes or nullptr; must be nullptr when packed
  const int32_t* cu_seqlens;   // [B+1] contiguous, or nullptr for padded
  void* out;                   // [B, D], row stride stride_ob, unit feature stride
  int64_t batch;               // B
  int64_t length;              // L (padded) or T (packed)
  int64_t dim;                 // D
  int64_t stride_hb;           // unused when packed
  int64_t stride_hl;
  int64_t stride_hd;
  int64_t stride_mb;
  int64_t stride_ml;
  int64_t stride_ob;
  MaskedMeanDtype dtype;
};

struct MaskedMeanBwdParams {
  const void* grad_out;        // [B, D], any strides
  const uint8_t* mask;         // [B, L] bytes or nullptr; must be nullptr when packed
  const int32_t* cu_seqlens;   // [B+1] contiguous, or nullptr for padded
  void* grad_hidden;           // contiguous: padded [B, L, D] / packed [T, D]; fully written
  int64_t batch;               // B
  int64_t length;              // L (padded) or T (packed)
  int64_t dim;                 // D
  int64_t stride_gb;
  int64_t stride_gd;
  int64_t stride_mb;
  int64_t stride_ml;
  MaskedMeanDtype dtype;
};

// Both return the launch error (cudaSuccess when nothing had to be launched) and never
// synchronize. Packed inputs need a valid cu_seqlens (0 = cu[0] <= ... <= cu[B] = T) for the
// backward to write every row.
cudaError_t masked_mean_fwd(const MaskedMeanFwdParams& params, cudaStream_t stream);
cudaError_t masked_mean_bwd(const MaskedMeanBwdParams& params, cudaStream_t stream);

}  // namespace latentembed
