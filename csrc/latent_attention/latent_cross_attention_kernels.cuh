// Kernel bodies of latent_cross_attention.cu (see latent_cross_attention.cuh for the semantics).
//
// Kept apart from the launchers and written with only threadIdx/blockIdx/__syncthreads/
// __shared__ and plain float math (no warp shuffles, no intrinsics beyond Convert<T>). (No test
// compiles them on the host yet: they are checked by nvcc in CI and against the reference on a
// GPU by tests/ops/test_latent_attention_cuda.py.)
//
// Layout of the work:
//   * row kernels (LayerNorm forward, LayerNorm backward): one block of kThreads per row, a
//     grid-stride loop over rows; thread i takes columns i, i + kThreads, ... (coalesced);
//   * segment kernels (softmax forward/backward): one block per (row, head) segment of R scores,
//     grid-stride over the T * H segments;
//   * parameter-gradient kernel: blocks of 32 x kColWarps threads, one column per lane, one
//     chunk of rows per blockIdx.y, the warps of a block splitting the chunk's rows.
// Reductions are shared-memory trees in a fixed order: deterministic, no atomics.
// The row loops depend only on blockIdx, so every __syncthreads is reached by the whole block.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/device_utils.cuh"
#include "latent_cross_attention.cuh"

namespace latentembed {
namespace lca {

constexpr int kThreads = 256;   // row and segment kernels (a power of two: tree reductions)
constexpr int kColWarps = 8;    // parameter-gradient kernel: 32 x kColWarps threads

// Sum (or max) of one value per thread over the block; every thread gets the result. `red` is
// a __shared__ float[kThreads] that is free again when this returns.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] = kMax ? fmaxf(red[tid], red[tid + s]) : red[tid] + red[tid + s];
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();  // everyone has read red[0] before the next reduction overwrites it
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_fwd_kernel(const LcaLayerNormParams p) {
  __shared__ float red[kThreads];
  const T* x_all = static_cast<const T*>(p.x);
  T* xn_all = static_cast<T*>(p.xn);
  const int64_t D = p.features;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = x_all + row * D;
    float mean;
    float rstd;
    if (p.compute_stats) {
      float s = 0.f;
      for (int64_t d = threadIdx.x; d < D; d += kThreads) s += Convert<T>::to_float(x[d]);
      mean = block_reduce<false>(s, red) / static_cast<float>(D);
      // Second pass over the (cached) row: variance of centred values, no cancellation.
      float sq = 0.f;
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        const float c = Convert<T>::to_float(x[d]) - mean;
        sq += c * c;
      }
      rstd = 1.f / sqrtf(block_reduce<false>(sq, red) / static_cast<float>(D) + p.eps);
      if (threadIdx.x == 0) {
        p.mean[row] = mean;
        p.rstd[row] = rstd;
      }
    } else {
      mean = p.mean[row];
      rstd = p.rstd[row];
    }
    T* xn = xn_all + row * D;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float xh = (Convert<T>::to_float(x[d]) - mean) * rstd;
      xn[d] = Convert<T>::from_float(xh * p.weight[d] + p.bias[d]);
    }
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) softmax_fwd_kernel(const LcaSoftmaxParams p) {
  __shared__ float red[kThreads];
  const int64_t R = p.latents;
  const int64_t segments = p.rows * p.heads;
  // Segment (t, h) starts at t * H * R + h * R = seg * R: the rows are contiguous [T, H*R].
  for (int64_t seg = blockIdx.x; seg < segments; seg += gridDim.x) {
    const S* s = static_cast<const S*>(p.scores) + seg * R;
    T* out = static_cast<T*>(p.probs) + seg * R;
    float mx = -INFINITY;
    for (int64_t r = threadIdx.x; r < R; r += kThreads) mx = fmaxf(mx, Convert<S>::to_float(s[r]));
    mx = block_reduce<true>(mx, red);
    float sum = 0.f;
    for (int64_t r = threadIdx.x; r < R; r += kThreads) sum += expf(Convert<S>::to_float(s[r]) - mx);
    const float inv = 1.f / block_reduce<false>(sum, red);
    for (int64_t r = threadIdx.x; r < R; r += kThreads) {
      out[r] = Convert<T>::from_float(expf(Convert<S>::to_float(s[r]) - mx) * inv);
    }
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) softmax_bwd_kernel(const LcaSoftmaxBwdParams p) {
  __shared__ float red[kThreads];
  const int64_t R = p.latents;
  const int64_t segments = p.rows * p.heads;
  for (int64_t seg = blockIdx.x; seg < segments; seg += gridDim.x) {
    const T* prob = static_cast<const T*>(p.probs) + seg * R;
    const S* dprob = static_cast<const S*>(p.dprobs) + seg * R;
    T* ds = static_cast<T*>(p.dscores) + seg * R;
    float dot = 0.f;
    for (int64_t r = threadIdx.x; r < R; r += kThreads) {
      dot += Convert<T>::to_float(prob[r]) * Convert<S>::to_float(dprob[r]);
    }
    dot = block_reduce<false>(dot, red);
    for (int64_t r = threadIdx.x; r < R; r += kThreads) {
      const float pr = Convert<T>::to_float(prob[r]);
      ds[r] = Convert<T>::from_float(pr * (Convert<S>::to_float(dprob[r]) - dot));
    }
  }
}

// grad_x of every row (the parameter gradients come from layer_norm_bwd_params_kernel).
template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) layer_norm_bwd_dx_kernel(const LcaLayerNormBwdParams p) {
  __shared__ float red[kThreads];
  const int64_t D = p.features;
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * D;
    const G* gxn = static_cast<const G*>(p.grad_xn) + row * D;
    const T* gy = static_cast<const T*>(p.grad_y) + row * D;
    T* gx = static_cast<T*>(p.grad_x) + row * D;
    const float mean = p.mean[row];
    const float rstd = p.rstd[row];
    float c1 = 0.f;  // sum_d g * xhat
    float c2 = 0.f;  // sum_d g
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float xh = (Convert<T>::to_float(x[d]) - mean) * rstd;
      const float g = Convert<G>::to_float(gxn[d]) * p.weight[d];
      c1 += g * xh;
      c2 += g;
    }
    c1 = block_reduce<false>(c1, red) * inv_d;
    c2 = block_reduce<false>(c2, red) * inv_d;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float xh = (Convert<T>::to_float(x[d]) - mean) * rstd;
      const float g = Convert<G>::to_float(gxn[d]) * p.weight[d];
      gx[d] = Convert<T>::from_float(Convert<T>::to_float(gy[d]) + rstd * (g - c2 - xh * c1));
    }
  }
}

// Partial LayerNorm weight/bias gradients: block (blockIdx.x, blockIdx.y) sums columns
// [32 * blockIdx.x, +32) over the rows of chunk blockIdx.y (grid-stride over chunks).
template <typename T, typename G>
__global__ void __launch_bounds__(32 * kColWarps) layer_norm_bwd_params_kernel(const LcaLayerNormBwdParams p) {
  __shared__ float part_w[kColWarps][32];
  __shared__ float part_b[kColWarps][32];
  const int64_t D = p.features;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const bool active = col < D;
  for (int64_t chunk = blockIdx.y; chunk < p.chunks; chunk += gridDim.y) {
    const int64_t begin = chunk * p.rows_per_chunk;
    const int64_t end = begin + p.rows_per_chunk < p.rows ? begin + p.rows_per_chunk : p.rows;
    float acc_w = 0.f;
    float acc_b = 0.f;
    if (active) {
      for (int64_t row = begin + threadIdx.y; row < end; row += kColWarps) {
        const float xh = (Convert<T>::to_float(static_cast<const T*>(p.x)[row * D + col]) -
                          p.mean[row]) * p.rstd[row];
        const float g = Convert<G>::to_float(static_cast<const G*>(p.grad_xn)[row * D + col]);
        acc_w += g * xh;
        acc_b += g;
      }
    }
    part_w[threadIdx.y][threadIdx.x] = acc_w;
    part_b[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      float sw = 0.f;
      float sb = 0.f;
#pragma unroll
      for (int w = 0; w < kColWarps; ++w) {
        sw += part_w[w][threadIdx.x];
        sb += part_b[w][threadIdx.x];
      }
      p.dw_partial[chunk * D + col] = sw;
      p.db_partial[chunk * D + col] = sb;
    }
    __syncthreads();  // part_w/part_b are reused by the next chunk
  }
}

}  // namespace lca
}  // namespace latentembed
