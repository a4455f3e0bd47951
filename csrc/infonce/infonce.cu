// Masked logsumexp kernels: see infonce.cuh for shapes and semantics.
//
// A portable, correct-first implementation with shared-memory tiling and fp32 FMA (no tensor
// cores; the Triton backend is the tensor-core path). Blocks of 256 threads = 16 x 16; a block
// computes a 64 x 64 score tile, each thread a 4 x 4 micro-tile, stepping through D 16 features
// at a time through shared memory (out-of-range rows, documents and features load as 0, so any
// D works). Masks are applied per element in registers from per-row (positive, its key, bound)
// and per-column (owner, key) values staged in shared memory.
//
// Forward: the masked logits of a tile go to shared memory; warp w then folds rows 8w..8w+7
// into the running (max, sum) with shuffles. Backward: each thread writes its dS elements and
// keeps per-row partial sums of g p s in registers. Per-row partials (count, dscale) are
// reduced across the 16 column threads in a fixed order: results are deterministic, no atomics.
//
// Built with torch's flags (__CUDA_NO_HALF_CONVERSIONS__ and friends): explicit conversion
// intrinsics only. expf, not __expf: the exponent of exp(z - max) must be accurate.

#include "infonce.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/device_utils.cuh"
#include "../common/launch_utils.cuh"

namespace latentembed {
namespace {

constexpr int kTile = 64;
constexpr int kStep = 16;      // features per shared-memory step
constexpr int kThreads = 256;  // 16 x 16, 4 x 4 outputs each
constexpr int kMicro = 4;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// acc[i][j] = q[row0 + 4*ty + i] . d[col0 + 4*tx + j] in fp32 (0 outside [0, B) x [0, N)).
template <typename T>
__device__ void score_tile(const T* __restrict__ q, const T* __restrict__ d, int64_t row0,
                           int64_t col0, const InfoNCETileParams& p, float (*qs)[kStep + 1],
                           float (*ds)[kStep + 1], float acc[kMicro][kMicro]) {
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < p.dim; k0 += kStep) {
    // Feature index fastest: consecutive threads read consecutive bytes of a row.
    for (int e = threadIdx.x; e < kTile * kStep; e += kThreads) {
      const int r = e / kStep;
      const int c = e % kStep;
      const int64_t k = k0 + c;
      const int64_t row = row0 + r;
      const int64_t col = col0 + r;
      qs[r][c] = (row < p.batch && k < p.dim) ? Convert<T>::to_float(q[row * p.stride_q + k]) : 0.0f;
      ds[r][c] = (col < p.num_docs && k < p.dim) ? Convert<T>::to_float(d[col * p.stride_d + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      float a[kMicro];
      float b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = qs[ty * kMicro + i][kk];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b[j] = ds[tx * kMicro + j][kk];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_tile_kernel(InfoNCETileParams p) {
  __shared__ float qs[kTile][kStep + 1];
  __shared__ float dsm[kTile][kStep + 1];
  __shared__ float z_tile[kTile][kTile + 1];
  __shared__ int64_t row_pos[kTile];
  __shared__ int64_t row_pos_key[kTile];
  __shared__ float row_bound[kTile];
  __shared__ float row_spos[kTile];
  __shared__ float row_lse[kTile];
  __shared__ float row_g[kTile];
  __shared__ float row_m[kTile];
  __shared__ float row_l[kTile];
  __shared__ int64_t col_owner[kTile];
  __shared__ int64_t col_key[kTile];
  __shared__ float red_f[kTile][17];
  __shared__ int red_i[kTile][17];

  const T* q = static_cast<const T*>(p.q);
  const T* d = static_cast<const T*>(p.d);
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t g_start = p.n_start + static_cast<int64_t>(blockIdx.y) * p.group;
  const int64_t g_end = min(g_start + p.group, p.n_end);
  const float scale = *p.scale;
  const float inf = INFINITY;

  if (tid < kTile) {
    const int64_t row = row0 + tid;
    const bool ok = row < p.batch;
    const int64_t pos = (p.pos_index != nullptr && ok) ? p.pos_index[row] : -1;
    row_pos[tid] = pos;
    row_pos_key[tid] = (p.pos_key != nullptr && ok) ? p.pos_key[row] : 0;
    row_bound[tid] = (p.bound != nullptr && ok) ? p.bound[row] : 0.0f;
    row_spos[tid] = (p.spos != nullptr && ok) ? p.spos[row] : 0.0f;
    float lse = (p.lse != nullptr && ok) ? p.lse[row] : 0.0f;
    row_lse[tid] = lse == -inf ? inf : lse;  // empty candidate set: p = exp(z - inf) = 0
    row_g[tid] = (p.grad != nullptr && ok) ? p.grad[row] : 0.0f;
    row_m[tid] = -inf;
    row_l[tid] = 0.0f;
  }
  float dscale_acc[kMicro] = {0.0f, 0.0f, 0.0f, 0.0f};
  int count[kMicro] = {0, 0, 0, 0};
  T* ds_out = static_cast<T*>(p.ds);

  for (int64_t col0 = g_start; col0 < g_end; col0 += kTile) {
    if (tid < kTile) {
      const int64_t col = col0 + tid;
      const bool ok = col < g_end;
      col_owner[tid] = (p.doc_owner != nullptr && ok) ? p.doc_owner[col] : -1;
      col_key[tid] = (p.doc_key != nullptr && ok) ? p.doc_key[col] : 0;
    }
    float acc[kMicro][kMicro];
    score_tile<T>(q, d, row0, col0, p, qs, dsm, acc);  // its barriers publish the column values
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int r = ty * kMicro + i;
      const int64_t row = row0 + r;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int c = tx * kMicro + j;
        const int64_t col = col0 + c;
        const bool in_tile = row < p.batch && col < g_end;
        const float s = acc[i][j];
        bool keep = in_tile;
        if (p.doc_owner != nullptr) keep = keep && col_owner[c] == row;
        if (p.exclude_diagonal) keep = keep && col != row;
        if (p.has_threshold) keep = keep && !(s > p.threshold);
        if (p.bound != nullptr) keep = keep && !(s > row_bound[r]);
        if (p.doc_key != nullptr) keep = keep && col_key[c] != row_pos_key[r];
        bool is_pos = false;
        if (p.pos_index != nullptr) {
          is_pos = col == row_pos[r];
          keep = keep || (is_pos && in_tile);
        }
        const float z = s * scale;
        if (p.backward) {
          float pz = keep ? expf(z - row_lse[r]) : 0.0f;
          if (p.subtract_positive && is_pos && in_tile) pz -= 1.0f;  // cross-entropy's p - onehot
          const float gp = row_g[r] * pz;
          dscale_acc[i] += gp * s;
          if (in_tile) ds_out[row * p.stride_ds + (col - p.n_start)] = Convert<T>::from_float(gp * scale);
        } else {
          z_tile[r][c] = keep ? z : -inf;
          if (keep && p.pos_index != nullptr && !is_pos && s > row_spos[r]) ++count[i];
        }
      }
    }
    if (!p.backward) {
      __syncthreads();
      const int warp = tid / 32;
      const int lane = tid % 32;
      for (int rr = 0; rr < kTile / kWarps; ++rr) {
        const int r = warp * (kTile / kWarps) + rr;
        const float v0 = z_tile[r][lane];
        const float v1 = z_tile[r][lane + 32];
        const float m_old = row_m[r];
        const float m_new = fmaxf(m_old, warp_max(fmaxf(v0, v1)));
        const float shift = m_new == -inf ? 0.0f : m_new;  // no (-inf) - (-inf)
        const float sum = warp_sum(expf(v0 - shift) + expf(v1 - shift));
        if (lane == 0) {
          row_l[r] = row_l[r] * expf(m_old - shift) + sum;
          row_m[r] = m_new;
        }
      }
    }
    __syncthreads();  // before the next tile overwrites the column values and z_tile
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    red_f[ty * kMicro + i][tx] = dscale_acc[i];
    red_i[ty * kMicro + i][tx] = count[i];
  }
  __syncthreads();
  if (tid < kTile && row0 + tid < p.batch) {
    const int64_t part = static_cast<int64_t>(blockIdx.y) * p.batch + row0 + tid;
    if (p.backward) {
      float total = 0.0f;
      for (int t = 0; t < 16; ++t) total += red_f[tid][t];
      p.dscale_part[part] = total;
    } else {
      int total = 0;
      for (int t = 0; t < 16; ++t) total += red_i[tid][t];
      p.m_part[part] = row_m[tid];
      p.l_part[part] = row_l[tid];
      p.c_part[part] = total;
    }
  }
}

// One warp per query: out[i] = q_i . d_pos[i] in fp32.
template <typename T>
__global__ void positive_score_kernel(const T* __restrict__ q, const T* __restrict__ d,
                                      const int64_t* __restrict__ pos, float* __restrict__ out,
                                      int64_t batch, int64_t dim, int64_t stride_q, int64_t stride_d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch) return;
  const T* qr = q + row * stride_q;
  const T* dr = d + pos[row] * stride_d;
  float acc = 0.0f;
  for (int64_t k = lane; k < dim; k += 32) acc = fmaf(Convert<T>::to_float(qr[k]), Convert<T>::to_float(dr[k]), acc);
  acc = warp_sum(acc);
  if (lane == 0) out[row] = acc;
}

template <typename T, typename TC>
__global__ void __launch_bounds__(kThreads) matmul_kernel(InfoNCEMatmulParams p) {
  __shared__ float as[kStep][kTile + 1];
  __shared__ float bs[kStep][kTile + 1];
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  TC* c = static_cast<TC*>(p.c);
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  // Rows along grid x (up to 2^31 - 1 blocks: any B or chunk), columns (D) along y.
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  float acc[kMicro][kMicro] = {};
  for (int64_t k0 = 0; k0 < p.inner; k0 += kStep) {
    for (int e = tid; e < kTile * kStep; e += kThreads) {
      // Walk the unit-stride index fastest so global reads coalesce.
      int kk, mm;
      if (p.a_sk == 1) { kk = e % kStep; mm = e / kStep; } else { mm = e % kTile; kk = e / kTile; }
      const int64_t m = m0 + mm, k = k0 + kk;
      as[kk][mm] = (m < p.rows && k < p.inner) ? Convert<T>::to_float(a[m * p.a_sm + k * p.a_sk]) : 0.0f;
      int kb, nn;
      if (p.b_sk == 1) { kb = e % kStep; nn = e / kStep; } else { nn = e % kTile; kb = e / kTile; }
      const int64_t n = n0 + nn, kq = k0 + kb;
      bs[kb][nn] = (n < p.cols && kq < p.inner) ? Convert<T>::to_float(b[kq * p.b_sk + n * p.b_sn]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      float av[kMicro];
      float bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) av[i] = as[kk][ty * kMicro + i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) bv[j] = bs[kk][tx * kMicro + j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + ty * kMicro + i;
    if (m >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t n = n0 + tx * kMicro + j;
      if (n >= p.cols) continue;
      float v = acc[i][j];
      if (p.accumulate) v += Convert<TC>::to_float(c[m * p.ldc + n]);
      c[m * p.ldc + n] = Convert<TC>::from_float(v);
    }
  }
}

}  // namespace

cudaError_t infonce_tiles(const InfoNCETileParams& p, cudaStream_t stream) {
  const int64_t row_blocks = ceil_div(p.batch, kTile);
  const int64_t groups = ceil_div(p.n_end - p.n_start, p.group);
  if (row_blocks == 0 || groups <= 0) return cudaSuccess;
  if (groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(groups));
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_kernel(infonce_tile_kernel<T>, grid, dim3(kThreads), stream, p);
  });
}

cudaError_t infonce_positive_scores(const void* q, const void* d, const int64_t* pos_index,
                                    float* out, int64_t batch, int64_t dim, int64_t stride_q,
                                    int64_t stride_d, InfoNCEDtype dtype, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(batch, kWarps)));
  return dispatch_dtype(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_kernel(positive_score_kernel<T>, grid, dim3(kThreads), stream,
                         static_cast<const T*>(q), static_cast<const T*>(d), pos_index, out, batch,
                         dim, stride_q, stride_d);
  });
}

cudaError_t infonce_matmul(const InfoNCEMatmulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const int64_t grid_x = ceil_div(p.rows, kTile);
  const int64_t grid_y = ceil_div(p.cols, kTile);
  if (grid_y > kMaxGridYZ || grid_x > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return dispatch_bool(p.c_float32, [&](auto c_float32) {
      using TC = std::conditional_t<decltype(c_float32)::value, float, T>;
      return launch_kernel(matmul_kernel<T, TC>, grid, dim3(kThreads), stream, p);
    });
  });
}

}  // namespace latentembed
