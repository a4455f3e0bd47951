// Device and launch helpers shared by the ops' kernels (no torch headers).
//
// Kernels are built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): Convert<T>
// uses only the explicit conversion intrinsics.
//
// latent_cross_attention_kernels.cuh is also compiled by a host C++ compiler (a shim defines
// __device__, __forceinline__, threadIdx, ...): without __CUDACC__ this header gives only the
// pieces that need no CUDA header (the launch limit and Convert<float>).
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

// Rows of packed sequence b, clamped to [0, total]: offsets that were never validated (the
// Python side may skip that host sync) can give wrong results but never out-of-bounds accesses.
__device__ __forceinline__ void sequence_rows(const int32_t* cu_seqlens, int64_t b, int64_t total,
                                              int64_t* start, int64_t* end) {
  const int64_t lo = cu_seqlens[b];
  const int64_t hi = cu_seqlens[b + 1];
  *start = lo < 0 ? 0 : (lo > total ? total : lo);
  *end = hi < *start ? *start : (hi > total ? total : hi);
}

// ------------------------------------------------------------------ host-side launch helpers

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a "lane owns VEC features" kernel: (sequence, 32*VEC-wide slice of `width`, split of
// the rows); grid.y is capped at the launch limit (the kernels loop over further slices).
template <int VEC>
inline dim3 slice_grid(int64_t batch, int64_t width, int64_t splits) {
  const int64_t n_slices = ceil_div(width, 32 * VEC);
  return dim3(static_cast<unsigned>(batch),
              static_cast<unsigned>(n_slices < kMaxGridYZ ? n_slices : kMaxGridYZ),
              static_cast<unsigned>(splits));
}

// Row splits per sequence so that the grid of `threads`-thread blocks holds about two waves,
// with no split smaller than min_rows rows.
inline cudaError_t row_splits(int64_t blocks_per_split, int64_t rows_per_sequence, int threads,
                              int64_t min_rows, int64_t* splits) {
  int device = 0;
  int n_sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int64_t target_blocks = static_cast<int64_t>(n_sms) * (2048 / threads) * 2;
  int64_t s = ceil_div(target_blocks, blocks_per_split);
  const int64_t most = ceil_div(rows_per_sequence, min_rows);
  if (s > most) s = most;
  if (s > kMaxGridYZ) s = kMaxGridYZ;
  *splits = s > 1 ? s : 1;
  return cudaSuccess;
}

#endif  // __CUDACC__

}  // namespace latentembed
