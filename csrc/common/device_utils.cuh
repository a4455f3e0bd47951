// Device helpers shared by the ops' kernels (no torch headers); the host-side launch helpers
// are in launch_utils.cuh.
//
// Kernels are built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): Convert<T>
// uses only the explicit conversion intrinsics.
//
// Without __CUDACC__ this header gives only the pieces that need no CUDA header (the launch
// limit and Convert<float>), so that host code may include it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace latentembed {

// Largest gridDim.y / gridDim.z of a launch.
constexpr int64_t kMaxGridYZ = 65535;

// fp32 <-> element type (round to nearest even on the way back).
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

#if defined(__CUDACC__)

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// VEC elements at p (16-byte aligned when VEC > 1) as fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = Convert<T>::to_float(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == sizeof(uint4), "vector accesses are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = Convert<T>::to_float(e[j]);
  }
}

// VEC fp32 values rounded to T and stored at p (16-byte aligned when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = Convert<T>::from_float(x[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = Convert<T>::from_float(x[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Rows [begin, end) of a sequence, or the part of them one block takes.
struct RowRange {
  int64_t begin;
  int64_t end;
  __device__ __forceinline__ bool empty() const { return begin >= end; }
};

// Rows of packed sequence b, clamped to [0, total]: offsets that were never validated (the
// Python side may skip that host sync) can give wrong results but never out-of-bounds accesses.
__device__ __forceinline__ RowRange sequence_rows(const int32_t* cu_seqlens, int64_t b,
                                                  int64_t total) {
  const int64_t lo = cu_seqlens[b];
  const int64_t hi = cu_seqlens[b + 1];
  const int64_t begin = lo < 0 ? 0 : (lo > total ? total : lo);
  return {begin, hi < begin ? begin : (hi > total ? total : hi)};
}

// The rows of `rows` that block blockIdx.z takes when gridDim.z blocks split them (grid.z from
// set_row_splits): equal chunks, rounded up to a multiple of `align` rows. Empty, the same in
// every thread of the block, when the block gets none (an empty sequence or a short tail).
__device__ __forceinline__ RowRange block_rows(RowRange rows, int64_t align) {
  int64_t chunk = (rows.end - rows.begin + gridDim.z - 1) / gridDim.z;
  chunk = (chunk + align - 1) / align * align;
  const int64_t begin = rows.begin + blockIdx.z * chunk;
  return {begin, begin + chunk < rows.end ? begin + chunk : rows.end};
}

// Epilogue of a forward slice kernel (blocks of 32 x WARPS threads, lane x owning VEC features):
// sums every warp's acc in a fixed order (deterministic, no atomics), divides by max(count, 1)
// (IEEE division, like the references) and stores the VEC means at out from warp 0's lanes that
// are active. Synchronizes the block twice: every thread of the block must call it.
template <typename T, int VEC, int WARPS>
__device__ __forceinline__ void store_block_mean(const float (&acc)[VEC], int64_t count,
                                                 bool active, T* out) {
  __shared__ float partial[WARPS][VEC][32];
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) partial[warp][j][lane] = acc[j];
  __syncthreads();
  if (warp == 0 && active) {
    const float n = static_cast<float>(count > 0 ? count : 1);
    float mean[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s += partial[w][j][lane];
      mean[j] = s / n;
    }
    store_vec<T, VEC>(out, mean);
  }
  __syncthreads();  // partial is reused by the caller's next slice
}

#endif  // __CUDACC__

}  // namespace latentembed
