// GEGLU segment mean kernels: see geglu_segment_mean.cuh for shapes and semantics.
//
// Blocks of 32 x kWarps threads. Lane x owns VEC consecutive features of a 32*VEC-wide slice of
// F: VEC elements of the value half and the same VEC of the gate half, read as 16-byte vectors
// when the layout allows (else VEC = 1). Warp y takes rows y, y + kWarps, ... of its range.
//
// Forward: one block per (sequence, feature slice); fp32 partial sums in registers, reduced over
// the warps in shared memory in a fixed order: deterministic, no atomics.
// Backward: grid.z splits each sequence's rows so that a small batch still fills the GPU; each
// block scales its slice of grad_out by 1 / len once and writes grad_v and grad_g of its rows,
// recomputing gelu from a (cheaper than storing it in the forward).
//
// Built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): only explicit conversion
// intrinsics. No fast math: erff and expf are the accurate versions, like torch's exact gelu.

#include "geglu_segment_mean.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/device_utils.cuh"

namespace latentembed {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__device__ __forceinline__ float gelu_cdf(float g) { return 0.5f * (1.f + erff(g * kSqrt1_2)); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
geglu_mean_fwd_kernel(const GegluSegmentMeanFwdParams p) {
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t b = blockIdx.x;
  int64_t start = 0;
  int64_t end = 0;
  sequence_rows(p.cu_seqlens, b, p.rows, &start, &end);
  const T* a = static_cast<const T*>(p.a);

  __shared__ float partial[kWarps][VEC][32];
  const int64_t n_slices = (p.features + 32 * VEC - 1) / (32 * VEC);
  for (int64_t slice = blockIdx.y; slice < n_slices; slice += gridDim.y) {
    const int64_t f = (slice * 32 + lane) * VEC;
    const bool active = f < p.features;  // F % VEC == 0 when VEC > 1: whole vectors in or out
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    if (active) {
      for (int64_t row = start + warp; row < end; row += kWarps) {
        float v[VEC];
        float g[VEC];
        load_vec<T, VEC>(a + row * p.stride_at + f, v);
        load_vec<T, VEC>(a + row * p.stride_at + p.features + f, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += v[j] * (g[j] * gelu_cdf(g[j]));
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[warp][j][lane] = acc[j];
    __syncthreads();
    if (warp == 0 && active) {
      const int64_t count = end - start;
      const float n = static_cast<float>(count > 0 ? count : 1);
      float mean[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += partial[w][j][lane];
        mean[j] = s / n;
      }
      store_vec<T, VEC>(static_cast<T*>(p.out) + b * p.stride_ob + f, mean);
    }
    __syncthreads();  // partial is reused by the next slice
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
geglu_mean_bwd_kernel(const GegluSegmentMeanBwdParams p) {
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t b = blockIdx.x;
  int64_t start = 0;
  int64_t end = 0;
  sequence_rows(p.cu_seqlens, b, p.rows, &start, &end);
  const int64_t chunk = (end - start + gridDim.z - 1) / gridDim.z;
  const int64_t row_begin = start + blockIdx.z * chunk;
  if (row_begin >= end) return;  // uniform over the block
  const int64_t row_end = row_begin + chunk < end ? row_begin + chunk : end;
  const int64_t count = end - start;
  const float n = static_cast<float>(count > 0 ? count : 1);
  const T* a = static_cast<const T*>(p.a);
  T* grad_a = static_cast<T*>(p.grad_a);

  const int64_t n_slices = (p.features + 32 * VEC - 1) / (32 * VEC);
  for (int64_t slice = blockIdx.y; slice < n_slices; slice += gridDim.y) {
    const int64_t f = (slice * 32 + lane) * VEC;
    if (f >= p.features) continue;  // no block-wide synchronisation below
    float s[VEC];
    load_vec<T, VEC>(static_cast<const T*>(p.grad_out) + b * p.stride_gob + f, s);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] = s[j] / n;  // a division, like autograd's total / count
    for (int64_t row = row_begin + warp; row < row_end; row += kWarps) {
      float v[VEC];
      float g[VEC];
      load_vec<T, VEC>(a + row * p.stride_at + f, v);
      load_vec<T, VEC>(a + row * p.stride_at + p.features + f, g);
      float dv[VEC];
      float dg[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float cdf = gelu_cdf(g[j]);
        const float pdf = expf(-0.5f * g[j] * g[j]) * kInvSqrt2Pi;
        dv[j] = s[j] * (g[j] * cdf);
        dg[j] = s[j] * v[j] * (cdf + g[j] * pdf);
      }
      store_vec<T, VEC>(grad_a + row * p.stride_gat + f, dv);
      store_vec<T, VEC>(grad_a + row * p.stride_gat + p.features + f, dg);
    }
  }
}

template <typename T>
cudaError_t launch_fwd(const GegluSegmentMeanFwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = p.features % kVec == 0 && p.stride_at % kVec == 0 &&
                         p.stride_ob % kVec == 0 && aligned16(p.a) && aligned16(p.out);
  const dim3 block(32, kWarps);
  if (vectorize) {
    geglu_mean_fwd_kernel<T, kVec>
        <<<slice_grid<kVec>(p.batch, p.features, 1), block, 0, stream>>>(p);
  } else {
    geglu_mean_fwd_kernel<T, 1><<<slice_grid<1>(p.batch, p.features, 1), block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const GegluSegmentMeanBwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = p.features % kVec == 0 && p.stride_at % kVec == 0 &&
                         p.stride_gat % kVec == 0 && p.stride_gob % kVec == 0 &&
                         aligned16(p.a) && aligned16(p.grad_a) && aligned16(p.grad_out);
  const int vec = vectorize ? kVec : 1;
  const int64_t n_slices = ceil_div(p.features, 32 * vec);
  const int64_t blocks_per_split = p.batch * (n_slices < kMaxGridYZ ? n_slices : kMaxGridYZ);
  int64_t splits = 1;
  // At least a row per warp in every split.
  const cudaError_t err =
      row_splits(blocks_per_split, ceil_div(p.rows, p.batch), kThreads, kWarps, &splits);
  if (err != cudaSuccess) return err;
  const dim3 block(32, kWarps);
  if (vectorize) {
    geglu_mean_bwd_kernel<T, kVec>
        <<<slice_grid<kVec>(p.batch, p.features, splits), block, 0, stream>>>(p);
  } else {
    geglu_mean_bwd_kernel<T, 1>
        <<<slice_grid<1>(p.batch, p.features, splits), block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

bool valid_sizes(int64_t batch, int64_t rows, int64_t features) {
  return batch >= 0 && batch <= 0x7fffffff && rows >= 0 && features >= 0;
}

}  // namespace

cudaError_t geglu_segment_mean_fwd(const GegluSegmentMeanFwdParams& p, cudaStream_t stream) {
  if (!valid_sizes(p.batch, p.rows, p.features)) return cudaErrorInvalidValue;
  // T = 0 still launches: every output row is written, as zeros.
  if (p.batch == 0 || p.features == 0) return cudaSuccess;
  switch (p.dtype) {
    case GegluDtype::kFloat32: return launch_fwd<float>(p, stream);
    case GegluDtype::kFloat16: return launch_fwd<__half>(p, stream);
    case GegluDtype::kBFloat16: return launch_fwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t geglu_segment_mean_bwd(const GegluSegmentMeanBwdParams& p, cudaStream_t stream) {
  if (!valid_sizes(p.batch, p.rows, p.features)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.features == 0 || p.rows == 0) return cudaSuccess;  // empty grad_a
  switch (p.dtype) {
    case GegluDtype::kFloat32: return launch_bwd<float>(p, stream);
    case GegluDtype::kFloat16: return launch_bwd<__half>(p, stream);
    case GegluDtype::kBFloat16: return launch_bwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace latentembed
