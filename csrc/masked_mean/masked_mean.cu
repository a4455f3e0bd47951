// Masked mean pooling kernels: see masked_mean.cuh for shapes and semantics.
//
// Both kernels use blocks of 32 x kWarps threads. Lane x owns VEC consecutive features of a
// 32*VEC-wide slice of D (16-byte accesses when the layout allows, else VEC = 1 with any feature
// stride); the block walks its rows 32 at a time, warp y taking rows 4y..4y+3 of each group of
// 32. Every lane reads the mask byte of one of the 32 rows and a warp ballot turns them into a
// keep bitmask, so the mask costs one coalesced 32-byte read per group, the kept rows are counted
// with popc, and a dropped row issues no load at all.
//
// Forward: one block per (sequence, D slice). Loads of 4 rows per warp are issued before any of
// them is summed (several 16-byte loads in flight per thread), partial sums stay in fp32
// registers and the kWarps partials are reduced in shared memory in a fixed order: the result is
// deterministic, no atomics.
// Backward: pure write bandwidth. grid.z splits each sequence's rows so a small batch still
// fills the GPU; each block recounts its sequence's kept rows (a few hundred bytes of mask),
// scales its slice of grad_out once and writes every row of its range: the value or zeros.
//
// Built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): only explicit
// conversion intrinsics below. No --use_fast_math: the division by the count is IEEE-exact like
// the reference's.

#include "masked_mean.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/device_utils.cuh"
#include "../common/launch_utils.cuh"

namespace latentembed {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 4;                    // rows of one ballot group per warp
constexpr int kThreads = 32 * kWarps;
static_assert(kWarps * kRowsPerWarp == 32, "one ballot word covers one group of rows");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kWarpRowsMask = (1u << kRowsPerWarp) - 1u;

// A VEC-element value in T's bit pattern, ready to store (uint4 for 16-byte vectors).
template <typename T, int VEC>
struct Packed {
  using Raw = typename std::conditional<VEC == 1, T, uint4>::type;
  Raw raw;

  __device__ __forceinline__ void set(const float (&x)[VEC]) {
    if constexpr (VEC == 1) {
      raw = Convert<T>::from_float(x[0]);
    } else {
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) e[j] = Convert<T>::from_float(x[j]);
    }
  }
  // Stores the value, or zeros (all-zero bits are +0 in fp32, fp16 and bf16) when !keep; a
  // select per word rather than a choice between two objects keeps everything in registers.
  __device__ __forceinline__ void store(T* p, bool keep) const {
    if constexpr (VEC == 1) {
      *p = keep ? raw : Convert<T>::from_float(0.f);
    } else {
      *reinterpret_cast<uint4*>(p) = make_uint4(keep ? raw.x : 0u, keep ? raw.y : 0u,
                                                keep ? raw.z : 0u, keep ? raw.w : 0u);
    }
  }
};

// Whether this lane's row of the current group is kept: in range and mask byte nonzero.
__device__ __forceinline__ bool lane_keeps(const uint8_t* mask_row, int64_t stride_ml,
                                           int64_t row, int64_t end) {
  if (row >= end) return false;
  return mask_row == nullptr || mask_row[row * stride_ml] != 0;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
masked_mean_fwd_kernel(const MaskedMeanFwdParams p) {
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t b = blockIdx.x;

  const T* hidden = static_cast<const T*>(p.hidden);
  RowRange seq{0, p.length};
  if (p.cu_seqlens != nullptr) {
    seq = sequence_rows(p.cu_seqlens, b, p.length);
  } else {
    hidden += b * p.stride_hb;
  }
  const uint8_t* mask_row = p.mask != nullptr ? p.mask + b * p.stride_mb : nullptr;
  const int64_t stride_hd = VEC > 1 ? 1 : p.stride_hd;  // VEC > 1 only when it is 1

  const int64_t n_slices = (p.dim + 32 * VEC - 1) / (32 * VEC);
  for (int64_t slice = blockIdx.y; slice < n_slices; slice += gridDim.y) {
    const int64_t d = (slice * 32 + lane) * VEC;
    const bool active = d < p.dim;  // D % VEC == 0 when VEC > 1: whole vectors in or out
    const T* col = hidden + (active ? d * stride_hd : 0);

    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    int64_t count = 0;  // identical in every thread: popc of the same ballots

    bool keep_next = lane_keeps(mask_row, p.stride_ml, seq.begin + lane, seq.end);
    for (int64_t row0 = seq.begin; row0 < seq.end; row0 += 32) {
      const bool keep = keep_next;
      // The next group's mask byte is requested before this group's rows: its latency hides
      // behind theirs instead of stalling the next iteration.
      keep_next = lane_keeps(mask_row, p.stride_ml, row0 + 32 + lane, seq.end);
      const unsigned word = __ballot_sync(kFullMask, keep);
      count += __popc(word);
      const unsigned mine = (word >> (warp * kRowsPerWarp)) & kWarpRowsMask;
      if (active && mine != 0) {
        const int64_t row = row0 + warp * kRowsPerWarp;
        float v[kRowsPerWarp][VEC];
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
          if ((mine >> k) & 1u) {
            load_vec<T, VEC>(col + (row + k) * p.stride_hl, v[k]);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[k][j] = 0.f;
          }
        }
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += v[k][j];
        }
      }
    }

    store_block_mean<T, VEC, kWarps>(acc, count, active,
                                     static_cast<T*>(p.out) + b * p.stride_ob + (active ? d : 0));
  }
}

// Kept rows of one padded sequence, summed over the whole block (every thread gets it).
__device__ __forceinline__ int64_t block_count_kept(const uint8_t* mask_row, int64_t stride_ml,
                                                    int64_t length) {
  __shared__ long long warp_counts[kWarps];
  const int tid = threadIdx.y * 32 + threadIdx.x;
  long long local = 0;
  for (int64_t r = tid; r < length; r += kThreads) local += mask_row[r * stride_ml] != 0;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) local += __shfl_xor_sync(kFullMask, local, offset);
  if (threadIdx.x == 0) warp_counts[threadIdx.y] = local;
  __syncthreads();
  long long total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_counts[w];
  return total;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
masked_mean_bwd_kernel(const MaskedMeanBwdParams p) {
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t b = blockIdx.x;

  T* grad_hidden = static_cast<T*>(p.grad_hidden);  // contiguous: row r at r * dim
  RowRange seq{0, p.length};
  if (p.cu_seqlens != nullptr) {
    seq = sequence_rows(p.cu_seqlens, b, p.length);
  } else {
    grad_hidden += b * p.length * p.dim;
  }

  // This block's share of the sequence's rows, in whole groups of 32.
  const RowRange share = block_rows(seq, 32);
  if (share.empty()) return;  // uniform over the block

  const uint8_t* mask_row = p.mask != nullptr ? p.mask + b * p.stride_mb : nullptr;
  int64_t count = seq.end - seq.begin;
  if (mask_row != nullptr) count = block_count_kept(mask_row, p.stride_ml, p.length);
  const float n = static_cast<float>(count > 0 ? count : 1);

  const int64_t n_slices = (p.dim + 32 * VEC - 1) / (32 * VEC);
  for (int64_t slice = blockIdx.y; slice < n_slices; slice += gridDim.y) {
    const int64_t d = (slice * 32 + lane) * VEC;
    const bool active = d < p.dim;

    // grad / count (a division, as autograd computes it), rounded to T once per block.
    float g[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const T* src = static_cast<const T*>(p.grad_out) + b * p.stride_gb + (d + j) * p.stride_gd;
      g[j] = active ? Convert<T>::to_float(*src) / n : 0.f;
    }
    Packed<T, VEC> value;
    value.set(g);
    T* col = grad_hidden + d;

    bool keep_next = lane_keeps(mask_row, p.stride_ml, share.begin + lane, share.end);
    for (int64_t row0 = share.begin; row0 < share.end; row0 += 32) {
      const bool keep = keep_next;
      keep_next = lane_keeps(mask_row, p.stride_ml, row0 + 32 + lane, share.end);
      const unsigned word = __ballot_sync(kFullMask, keep);
      const unsigned mine = (word >> (warp * kRowsPerWarp)) & kWarpRowsMask;
      if (active) {
        const int64_t row = row0 + warp * kRowsPerWarp;
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
          if (row + k < share.end) {  // dropped rows in range still get their zeros
            value.store(col + (row + k) * p.dim, (mine >> k) & 1u);
          }
        }
      }
    }
  }
}

bool valid_batch(int64_t batch) { return batch >= 0 && batch <= 0x7fffffff; }

}  // namespace

cudaError_t masked_mean_fwd(const MaskedMeanFwdParams& p, cudaStream_t stream) {
  if (!valid_batch(p.batch) || p.dim < 0 || p.length < 0) return cudaErrorInvalidValue;
  if (p.cu_seqlens != nullptr && p.mask != nullptr) return cudaErrorInvalidValue;
  // Zero rows (L = 0 or T = 0) still launch: every output row is written, as zeros.
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool packed = p.cu_seqlens != nullptr;
    const bool vectorize = p.stride_hd == 1 && p.dim % kVec == 0 && p.stride_hl % kVec == 0 &&
                           (packed || p.stride_hb % kVec == 0) && p.stride_ob % kVec == 0 &&
                           aligned16(p.hidden) && aligned16(p.out);
    SliceLaunch grid;
    grid.batch = p.batch;
    grid.width = p.dim;
    grid.warps = kWarps;
    return launch_slices<kVec>(
        grid, vectorize, [](auto vec) { return masked_mean_fwd_kernel<T, decltype(vec)::value>; },
        p, stream);
  });
}

cudaError_t masked_mean_bwd(const MaskedMeanBwdParams& p, cudaStream_t stream) {
  if (!valid_batch(p.batch) || p.dim < 0 || p.length < 0) return cudaErrorInvalidValue;
  if (p.cu_seqlens != nullptr && p.mask != nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.dim == 0 || p.length == 0) return cudaSuccess;  // empty grad_hidden
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    constexpr int kVec = 16 / sizeof(T);
    SliceLaunch grid;
    grid.batch = p.batch;
    grid.width = p.dim;
    grid.warps = kWarps;
    grid.rows_per_sequence = p.cu_seqlens != nullptr ? ceil_div(p.length, p.batch) : p.length;
    grid.min_split_rows = 32;  // one ballot group
    return launch_slices<kVec>(
        grid, p.dim % kVec == 0 && aligned16(p.grad_hidden),
        [](auto vec) { return masked_mean_bwd_kernel<T, decltype(vec)::value>; }, p, stream);
  });
}

}  // namespace latentembed
