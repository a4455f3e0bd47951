// Host-side launch helpers shared by the ops' launchers (.cu files only; no torch headers).
//
// Every launcher does the same few things: turn the op's runtime dtype tag into the element type,
// turn a runtime flag (16-byte vectors or not, fp32 GEMM outputs or not) into a kernel template
// argument, shape the grid, launch, and return the launch error. dispatch_dtype and dispatch_bool
// turn the runtime value into a compile-time one and call a generic lambda with it (the
// BOOL_SWITCH / FP16_SWITCH macros of flash-attention, as templates); launch_kernel launches and
// returns the error, so that no launcher repeats the switch or the error handling.
//
//   return dispatch_dtype(p.dtype, [&](auto t) {
//     using T = typename decltype(t)::type;
//     return dispatch_bool(p.flag, [&](auto flag) {
//       return launch_kernel(my_kernel<T, decltype(flag)::value>, grid, block, stream, p);
//     });
//   });
//
// launch_slices does all of it for the "lane owns VEC features" kernels of masked_mean and
// geglu_segment_mean (vectorized or not, rows split over grid.z or not).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "device_utils.cuh"

namespace latentembed {

// A type as a value, for generic lambdas: `typename decltype(tag)::type`.
template <typename T>
struct TypeTag {
  using type = T;
};

// launch(TypeTag<T>{}) with T = float, __half or __nv_bfloat16 for `dtype`, an op's
// `enum class XxxDtype { kFloat32, kFloat16, kBFloat16 }`; returns launch's cudaError_t, or
// cudaErrorInvalidValue for any other value of the enum.
template <typename Dtype, typename Launch>
cudaError_t dispatch_dtype(Dtype dtype, Launch&& launch) {
  switch (dtype) {
    case Dtype::kFloat32: return launch(TypeTag<float>{});
    case Dtype::kFloat16: return launch(TypeTag<__half>{});
    case Dtype::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// launch(std::true_type{}) when flag, else launch(std::false_type{}): a runtime flag as a
// template argument (`decltype(arg)::value`). Returns launch's cudaError_t.
template <typename Launch>
cudaError_t dispatch_bool(bool flag, Launch&& launch) {
  if (flag) return launch(std::true_type{});
  return launch(std::false_type{});
}

// kernel<<<grid, block, 0, stream>>>(args...), then the launch error (cudaGetLastError).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                          cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a "lane owns VEC features" slice kernel: (sequence, 32*VEC-wide slice of `width`, 1);
// grid.y is capped at the launch limit (the kernels loop over further slices). set_row_splits
// picks grid.z when the rows are split.
template <int VEC>
inline dim3 slice_grid(int64_t batch, int64_t width) {
  const int64_t n_slices = ceil_div(width, 32 * VEC);
  return dim3(static_cast<unsigned>(batch),
              static_cast<unsigned>(n_slices < kMaxGridYZ ? n_slices : kMaxGridYZ), 1);
}

// Sets grid->z, the row splits per sequence (block_rows in the kernel), so that the grid of
// `threads`-thread blocks holds about two waves of the GPU, with no split smaller than min_rows
// rows. Returns the error of the device query.
inline cudaError_t set_row_splits(dim3* grid, int64_t rows_per_sequence, int threads,
                                  int64_t min_rows) {
  int device = 0;
  int n_sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int64_t blocks_per_split = static_cast<int64_t>(grid->x) * grid->y;
  const int64_t target_blocks = static_cast<int64_t>(n_sms) * (2048 / threads) * 2;
  int64_t s = ceil_div(target_blocks, blocks_per_split);
  const int64_t most = ceil_div(rows_per_sequence, min_rows);
  if (s > most) s = most;
  if (s > kMaxGridYZ) s = kMaxGridYZ;
  grid->z = static_cast<unsigned>(s > 1 ? s : 1);
  return cudaSuccess;
}

// The grid of a slice kernel: blocks of 32 x warps threads, lane x owning VEC features of a
// 32*VEC-wide slice of `width`; grid (batch, slices, row splits).
struct SliceLaunch {
  int64_t batch = 0;
  int64_t width = 0;
  int warps = 0;
  // > 0: each sequence's rows (about this many) are split over grid.z by set_row_splits, with
  // no split smaller than min_split_rows rows (the kernel takes its share with block_rows).
  int64_t rows_per_sequence = 0;
  int64_t min_split_rows = 1;
};

// Launches kernel_of(std::integral_constant<int, VEC>{}), a slice kernel taking params, on the
// grid of `s`, with VEC = kVec (16-byte accesses) when vectorize, else VEC = 1; returns the
// error of the device query or of the launch.
template <int kVec, typename KernelOf, typename Params>
cudaError_t launch_slices(const SliceLaunch& s, bool vectorize, KernelOf&& kernel_of,
                          const Params& params, cudaStream_t stream) {
  return dispatch_bool(vectorize, [&](auto vec16) {
    constexpr int VEC = decltype(vec16)::value ? kVec : 1;
    dim3 grid = slice_grid<VEC>(s.batch, s.width);
    if (s.rows_per_sequence > 0) {
      const cudaError_t err =
          set_row_splits(&grid, s.rows_per_sequence, 32 * s.warps, s.min_split_rows);
      if (err != cudaSuccess) return err;
    }
    return launch_kernel(kernel_of(std::integral_constant<int, VEC>{}), grid, dim3(32, s.warps),
                         stream, params);
  });
}

}  // namespace latentembed
