// Masked logsumexp of query-document scores (the core of InfoNCE), as plain CUDA launchers.
//
// No torch/ATen/c10 header on purpose: infonce.cu compiles alone with `nvcc -arch=sm_90 -c`
// (CPU CI), and the torch glue lives in csrc/infonce/bindings.cpp. Sizes and strides are
// int64 and counted in elements; q and d have unit feature stride.
//
// Shapes: q [B, D], d [N, D] (fp32 / fp16 / bf16, the same for both), scores s_ij = q_i . d_j
// accumulated in fp32. Candidate set of query i (see src/latentembed/ops/infonce/reference.py,
// the spec): j == pos_index[i] always; any other j unless doc_owner[j] != i, exclude_diagonal
// and j == i, s_ij > threshold, s_ij > bound[i] (= margin * pos_score[i]), or
// doc_key[j] == pos_key[i] (the key of row i's positive; the bindings default it to
// doc_key[pos_index[i]], and it also works without pos_index).
//
// infonce_tiles runs over the documents [n_start, n_end) in groups of `group` documents, one
// block per (64 queries, group):
//   forward:  per (group, query) partial max m, sum l of exp(scale*s - m) and the count of
//             candidates scoring above spos[i] (the positive excluded), written to
//             part[g * B + i] for the launch's g-th group;
//   backward: ds[i, j - n_start] = grad[i] * (p_ij - [subtract_positive and j == pos[i]]) * scale
//             with p_ij = exp(scale*s_ij - lse[i]) for candidates (0 elsewhere), and per
//             (group, query) partial sum_j grad[i] (p_ij - [...]) s_ij.
// infonce_matmul: C = (accumulate ? C : 0) + A @ B with A, B in the input dtype given by
// strides (so transposes are free) and C in fp32 or the input dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace latentembed {

enum class InfoNCEDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct InfoNCETileParams {
  const void* q;               // [B, D], row stride stride_q
  const void* d;               // [N, D], row stride stride_d
  const float* scale;          // 0-dim, on the device (no host sync, may be learnable)
  const int64_t* pos_index;    // [B] or nullptr
  const float* bound;          // [B] margin * pos_score, or nullptr
  const int64_t* doc_owner;    // [N] or nullptr
  const int64_t* doc_key;      // [N] or nullptr (then pos_key is nullptr too)
  const int64_t* pos_key;      // [B], set whenever doc_key is
  const float* spos;           // forward: [B] positive scores, or nullptr without pos_index
  const float* lse;            // backward: [B]
  const float* grad;           // backward: [B], upstream gradient of lse
  void* ds;                    // backward: [B, >= n_end - n_start], row stride stride_ds
  float* m_part;               // forward: [groups of this launch, B]
  float* l_part;               // forward: [groups of this launch, B]
  int32_t* c_part;             // forward: [groups of this launch, B]
  float* dscale_part;          // backward: [groups of this launch, B]
  int64_t batch;               // B
  int64_t num_docs;            // N
  int64_t dim;                 // D
  int64_t stride_q;
  int64_t stride_d;
  int64_t stride_ds;
  int64_t n_start;
  int64_t n_end;
  int64_t group;               // documents per block, a multiple of the 64-wide tile
  float threshold;
  bool has_threshold;
  bool exclude_diagonal;
  bool subtract_positive;      // backward of lse - scale * s_pos instead of lse
  bool backward;
  InfoNCEDtype dtype;
};

struct InfoNCEMatmulParams {
  const void* a;               // element (m, k) at a[m * a_sm + k * a_sk], input dtype
  const void* b;               // element (k, n) at b[k * b_sk + n * b_sn], input dtype
  void* c;                     // element (m, n) at c[m * ldc + n]
  int64_t a_sm, a_sk, b_sk, b_sn, ldc;
  int64_t rows, cols, inner;   // M, N, K
  InfoNCEDtype dtype;          // of a and b (and of c unless c_float32)
  bool c_float32;
  bool accumulate;
};

// All return the launch error (cudaSuccess when nothing had to be launched), never synchronize.
cudaError_t infonce_tiles(const InfoNCETileParams& params, cudaStream_t stream);
cudaError_t infonce_positive_scores(const void* q, const void* d, const int64_t* pos_index,
                                    float* out, int64_t batch, int64_t dim, int64_t stride_q,
                                    int64_t stride_d, InfoNCEDtype dtype, cudaStream_t stream);
cudaError_t infonce_matmul(const InfoNCEMatmulParams& params, cudaStream_t stream);

}  // namespace latentembed
