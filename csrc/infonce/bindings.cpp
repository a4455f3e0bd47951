// Torch glue for the masked-logsumexp CUDA kernels: checks, allocation, the group/chunk plan,
// the merge of per-group partials and the backward chunk loop.
//
// The op schemas are defined in Python (src/latentembed/ops/infonce/cuda.py); this file only
// registers their CUDA implementations. The current stream comes from c10/cuda/CUDAStream.h
// (ATen/cuda/CUDAContext.h would pull in cuBLAS headers that CPU CI lacks for its syntax check).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "infonce/infonce.cuh"

namespace latentembed {
namespace {

constexpr int64_t kTileDocs = 64;            // the kernels' document tile
constexpr int64_t kChunkElements = 1 << 22;  // dS chunk of the backward: ~8 MiB in bf16
constexpr int64_t kMinChunkDocs = 1024;
constexpr int64_t kMaxGridY = 65535;         // CUDA's limit on grid y (a launch's groups)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// A contiguous int64 [length] tensor on q's device, or an undefined tensor when absent.
at::Tensor index_arg(const std::optional<at::Tensor>& t, const char* name, int64_t length,
                     const at::Tensor& q) {
  if (!t.has_value()) return at::Tensor();
  check_same_device(*t, name, q, "q");
  TORCH_CHECK(t->scalar_type() == at::kLong, name, " must have dtype int64, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == length, name, " must have shape [", length, "], got ",
              t->sizes());
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

struct Plan {
  InfoNCETileParams p;
  at::Tensor q, d, scale, pos, bound, owner, key, pos_key;  // keep the converted tensors alive
};

Plan make_plan(const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
               const std::optional<at::Tensor>& pos_index, const std::optional<at::Tensor>& pos_score,
               const std::optional<at::Tensor>& doc_owner, const std::optional<at::Tensor>& doc_key,
               const std::optional<at::Tensor>& pos_key, std::optional<double> threshold,
               std::optional<double> margin, bool exclude_diagonal) {
  check_cuda_tensor(q, "q");
  TORCH_CHECK(q.dim() == 2 && d.dim() == 2 && q.size(1) == d.size(1),
              "q [B, D] and d [N, D] must have the same D, got ", q.sizes(), " and ", d.sizes());
  check_same_device(d, "d", q, "q");
  check_same_dtype(d, "d", q, "q");
  TORCH_CHECK(scale.numel() == 1 && scale.device() == q.device(), "scale must be a 0-dim tensor on q's device");
  Plan plan;
  InfoNCETileParams& p = plan.p;
  p = InfoNCETileParams{};
  p.dtype = kernel_dtype<InfoNCEDtype>(q, "q");
  plan.q = q.contiguous();
  plan.d = d.contiguous();
  plan.scale = scale.to(at::kFloat).contiguous();
  p.batch = q.size(0);
  p.num_docs = d.size(0);
  p.dim = q.size(1);
  plan.pos = index_arg(pos_index, "pos_index", p.batch, q);
  plan.owner = index_arg(doc_owner, "doc_owner", p.num_docs, q);
  plan.key = index_arg(doc_key, "doc_key", p.num_docs, q);
  plan.pos_key = index_arg(pos_key, "pos_key", p.batch, q);
  TORCH_CHECK(!plan.pos_key.defined() || plan.key.defined(), "pos_key needs doc_key");
  if (plan.key.defined() && !plan.pos_key.defined()) {
    TORCH_CHECK(plan.pos.defined(), "doc_key needs pos_index or pos_key");
    plan.pos_key = plan.key.index_select(0, plan.pos);  // the key of each row's positive
  }
  if (margin.has_value()) {
    TORCH_CHECK(pos_score.has_value(), "margin needs pos_score");
    TORCH_CHECK(pos_score->numel() == p.batch, "pos_score must have shape [", p.batch, "]");
    // One fp32 multiply, rounded exactly like the reference.
    plan.bound = (pos_score->to(at::kFloat) * *margin).contiguous();
  }
  p.q = plan.q.const_data_ptr();
  p.d = plan.d.const_data_ptr();
  p.scale = plan.scale.const_data_ptr<float>();
  p.pos_index = ptr_or_null<int64_t>(plan.pos);
  p.bound = ptr_or_null<float>(plan.bound);
  p.doc_owner = ptr_or_null<int64_t>(plan.owner);
  p.doc_key = ptr_or_null<int64_t>(plan.key);
  p.pos_key = ptr_or_null<int64_t>(plan.pos_key);
  p.stride_q = plan.q.stride(0);
  p.stride_d = plan.d.stride(0);
  p.has_threshold = threshold.has_value();
  p.threshold = threshold.has_value() ? static_cast<float>(*threshold) : 0.0f;
  p.exclude_diagonal = exclude_diagonal;
  // Enough document groups for ~4 blocks per SM when B alone cannot fill the GPU.
  int device = q.device().index();
  int sms = 1;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t splits = std::max<int64_t>(1, cdiv(4 * sms, cdiv(p.batch, kTileDocs)));
  p.group = round_up(std::max<int64_t>(1, cdiv(p.num_docs, splits)), kTileDocs);
  // The grid's y dimension holds the groups of one launch.
  p.group = std::max(p.group, round_up(cdiv(p.num_docs, kMaxGridY), kTileDocs));
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_lse_fwd_cuda(
    const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
    const std::optional<at::Tensor>& pos_index, const std::optional<at::Tensor>& pos_score,
    const std::optional<at::Tensor>& doc_owner, const std::optional<at::Tensor>& doc_key,
    const std::optional<at::Tensor>& pos_key, std::optional<double> threshold,
    std::optional<double> margin, bool exclude_diagonal) {
  const c10::cuda::CUDAGuard guard(q.device());
  Plan plan = make_plan(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold,
                        margin, exclude_diagonal);
  InfoNCETileParams& p = plan.p;
  const auto stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t groups = cdiv(p.num_docs, p.group);
  at::Tensor m_part = at::empty({groups, p.batch}, f32);
  at::Tensor l_part = at::empty({groups, p.batch}, f32);
  at::Tensor c_part = at::empty({groups, p.batch}, q.options().dtype(at::kInt));
  at::Tensor spos = at::zeros({0}, f32);
  if (plan.pos.defined()) {
    spos = at::empty({p.batch}, f32);
    check_launch(infonce_positive_scores(p.q, p.d, p.pos_index, spos.data_ptr<float>(), p.batch,
                                         p.dim, p.stride_q, p.stride_d, p.dtype, stream),
                 "infonce_lse_fwd_cuda");
    p.spos = spos.const_data_ptr<float>();
  }
  p.m_part = m_part.data_ptr<float>();
  p.l_part = l_part.data_ptr<float>();
  p.c_part = c_part.data_ptr<int32_t>();
  p.n_start = 0;
  p.n_end = p.num_docs;
  p.backward = false;
  check_launch(infonce_tiles(p, stream), "infonce_lse_fwd_cuda");
  // lse = M + log(sum_g l_g exp(m_g - M)); log(0) = -inf for an empty candidate set. In
  // float64 (B * groups numbers), so lse is rounded once, as torch.logsumexp's is.
  at::Tensor m64 = m_part.to(at::kDouble);
  at::Tensor l64 = l_part.to(at::kDouble);
  at::Tensor m_max = std::get<0>(m64.max(0));
  at::Tensor shift = at::where(at::isinf(m_max), at::zeros_like(m_max), m_max);
  at::Tensor lse = (shift + at::log((l64 * at::exp(m64 - shift)).sum(0))).to(at::kFloat);
  return {lse, c_part.sum(0, /*keepdim=*/false, at::kLong), spos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_lse_bwd_cuda(
    const at::Tensor& grad_lse, const at::Tensor& q, const at::Tensor& d, const at::Tensor& scale,
    const at::Tensor& lse, const std::optional<at::Tensor>& pos_index,
    const std::optional<at::Tensor>& pos_score, const std::optional<at::Tensor>& doc_owner,
    const std::optional<at::Tensor>& doc_key, const std::optional<at::Tensor>& pos_key,
    std::optional<double> threshold, std::optional<double> margin, bool exclude_diagonal,
    bool subtract_positive) {
  const c10::cuda::CUDAGuard guard(q.device());
  Plan plan = make_plan(q, d, scale, pos_index, pos_score, doc_owner, doc_key, pos_key, threshold,
                        margin, exclude_diagonal);
  InfoNCETileParams& p = plan.p;
  TORCH_CHECK(!subtract_positive || plan.pos.defined(), "subtract_positive needs pos_index");
  p.subtract_positive = subtract_positive;
  TORCH_CHECK(grad_lse.numel() == p.batch && lse.numel() == p.batch,
              "grad_lse and lse must have shape [", p.batch, "]");
  const auto stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  const auto f32 = q.options().dtype(at::kFloat);
  // Chunk by chunk: small groups give each chunk's launch enough blocks.
  p.group = 4 * kTileDocs;
  at::Tensor g = grad_lse.to(at::kFloat).contiguous();
  at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  // At most kMaxGridY groups per launch (grid y), even for B = 1 (which asks for 2^22 documents).
  const int64_t chunk = std::min({round_up(std::max(kMinChunkDocs, kChunkElements / p.batch), p.group),
                                  round_up(p.num_docs, p.group), kMaxGridY * p.group});
  // dq sums over every chunk in fp32 (a bf16 accumulator would round once per chunk).
  at::Tensor grad_q = at::zeros({p.batch, p.dim}, f32);
  at::Tensor grad_d = at::empty({p.num_docs, p.dim}, q.options());
  at::Tensor ds = at::empty({p.batch, chunk}, q.options());
  at::Tensor dscale_part = at::empty({chunk / p.group, p.batch}, f32);
  at::Tensor grad_scale = at::zeros({}, q.options().dtype(at::kDouble));
  p.lse = lse32.const_data_ptr<float>();
  p.grad = g.const_data_ptr<float>();
  p.ds = ds.data_ptr();
  p.stride_ds = chunk;
  p.dscale_part = dscale_part.data_ptr<float>();
  p.backward = true;
  const int64_t elem = q.element_size();
  for (int64_t n0 = 0; n0 < p.num_docs; n0 += chunk) {
    const int64_t width = std::min(chunk, p.num_docs - n0);
    p.n_start = n0;
    p.n_end = n0 + width;
    check_launch(infonce_tiles(p, stream), "infonce_lse_bwd_cuda");
    const char* d_chunk = static_cast<const char*>(p.d) + n0 * p.stride_d * elem;
    // grad_q (fp32) += dS [B, width] @ d[n0:n0+width]
    InfoNCEMatmulParams mq{};
    mq.a = ds.const_data_ptr();
    mq.a_sm = chunk;
    mq.a_sk = 1;
    mq.b = d_chunk;
    mq.b_sk = p.stride_d;
    mq.b_sn = 1;
    mq.c = grad_q.data_ptr();
    mq.ldc = p.dim;
    mq.rows = p.batch;
    mq.cols = p.dim;
    mq.inner = width;
    mq.dtype = p.dtype;
    mq.c_float32 = true;
    mq.accumulate = true;
    check_launch(infonce_matmul(mq, stream), "infonce_lse_bwd_cuda");
    // grad_d[n0:n0+width] = dS^T [width, B] @ q, written once.
    InfoNCEMatmulParams md{};
    md.a = ds.const_data_ptr();
    md.a_sm = 1;
    md.a_sk = chunk;
    md.b = p.q;
    md.b_sk = p.stride_q;
    md.b_sn = 1;
    md.c = static_cast<char*>(grad_d.data_ptr()) + n0 * p.dim * elem;
    md.ldc = p.dim;
    md.rows = width;
    md.cols = p.dim;
    md.inner = p.batch;
    md.dtype = p.dtype;
    md.c_float32 = false;
    md.accumulate = false;
    check_launch(infonce_matmul(md, stream), "infonce_lse_bwd_cuda");
    grad_scale += dscale_part.narrow(0, 0, cdiv(width, p.group)).sum(at::kDouble);
  }
  ds = at::Tensor();  // free the chunk before the cast of dq
  return {grad_q.to(q.scalar_type()), grad_d, grad_scale.to(at::kFloat)};
}

}  // namespace
}  // namespace latentembed

TORCH_LIBRARY_IMPL(latentembed, CUDA, m) {
  m.impl("infonce_lse_fwd_cuda", &latentembed::infonce_lse_fwd_cuda);
  m.impl("infonce_lse_bwd_cuda", &latentembed::infonce_lse_bwd_cuda);
}
