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
#include "../common/launch_utils.cuh"

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
  const RowRange seq = sequence_rows(p.cu_seqlens, b, p.rows);
  const T* a = static_cast<const T*>(p.a);

  const int64_t n_slices = (p.features + 32 * VEC - 1) / (32 * VEC);
  for (int64_t slice = blockIdx.y; slice < n_slices; slice += gridDim.y) {
    const int64_t f = (slice * 32 + lane) * VEC;
    const bool active = f < p.features;  // F % VEC == 0 when VEC > 1: whole vectors in or out
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    if (active) {
      for (int64_t row = seq.begin + warp; row < seq.end; row += kWarps) {
        float v[VEC];
        float g[VEC];
        load_vec<T, VEC>(a + row * p.stride_at + f, v);
        load_vec<T, VEC>(a + row * p.stride_at + p.features + f, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += v[j] * (g[j] * gelu_cdf(g[j]));
      }
    }
    store_block_mean<T, VEC, kWarps>(acc, seq.end - seq.begin, active,
                                     static_cast<T*>(p.out) + b * p.stride_ob + (active ? f : 0));
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
geglu_mean_bwd_kernel(const GegluSegmentMeanBwdParams p) {
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t b = blockIdx.x;
  const RowRange seq = sequence_rows(p.cu_seqlens, b, p.rows);
  const RowRange share = block_rows(seq, 1);
  if (share.empty()) return;  // uniform over the block
  const int64_t count = seq.end - seq.begin;
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
    for (int64_t row = share.begin + warp; row < share.end; row += kWarps) {
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

bool valid_sizes(int64_t batch, int64_t rows, int64_t features) {
  return batch >= 0 && batch <= 0x7fffffff && rows >= 0 && features >= 0;
}

}  // namespace

cudaError_t geglu_segment_mean_fwd(const GegluSegmentMeanFwdParams& p, cudaStream_t stream) {
  if (!valid_sizes(p.batch, p.rows, p.features)) return cudaErrorInvalidValue;
  // T = 0 still launches: every output row is written, as zeros.
  if (p.batch == 0 || p.features == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vectorize = p.features % kVec == 0 && p.stride_at % kVec == 0 &&
                           p.stride_ob % kVec == 0 && aligned16(p.a) && aligned16(p.out);
    SliceLaunch grid;
    grid.batch = p.batch;
    grid.width = p.features;
    grid.warps = kWarps;
    return launch_slices<kVec>(
        grid, vectorize, [](auto vec) { return geglu_mean_fwd_kernel<T, decltype(vec)::value>; },
        p, stream);
  });
}

cudaError_t geglu_segment_mean_bwd(const GegluSegmentMeanBwdParams& p, cudaStream_t stream) {
  if (!valid_sizes(p.batch, p.rows, p.features)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.features == 0 || p.rows == 0) return cudaSuccess;  // empty grad_a
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vectorize = p.features % kVec == 0 && p.stride_at % kVec == 0 &&
                           p.stride_gat % kVec == 0 && p.stride_gob % kVec == 0 &&
                           aligned16(p.a) && aligned16(p.grad_a) && aligned16(p.grad_out);
    SliceLaunch grid;
    grid.batch = p.batch;
    grid.width = p.features;
    grid.warps = kWarps;
    grid.rows_per_sequence = ceil_div(p.rows, p.batch);
    grid.min_split_rows = kWarps;  // at least a row per warp
    return launch_slices<kVec>(
        grid, vectorize, [](auto vec) { return geglu_mean_bwd_kernel<T, decltype(vec)::value>; },
        p, stream);
  });
}

}  // namespace latentembed
