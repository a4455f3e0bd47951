// Torch glue for the CUDA kernels: argument checks, output allocation, stream and device.
//
// The op schemas are defined in Python (src/latentembed/ops/masked_mean/cuda.py); this file only
// registers their CUDA implementations, so the extension has no Python module init and is
// loaded with torch.ops.load_library. The kernels write every output element, so outputs are
// allocated with at::empty.
//
// The current stream comes from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (the
// same stream): the latter pulls in cuBLAS/cuSPARSE headers, which CPU CI does not have for its
// syntax-only check of this file.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common/torch_utils.h"
#include "masked_mean/masked_mean.cuh"

namespace latentembed {
namespace {

// The mask's bytes ([batch, length], any strides) or nullptr when absent.
const uint8_t* mask_bytes(const std::optional<at::Tensor>& mask, const at::Tensor& ref,
                          const char* ref_name, int64_t batch, int64_t length,
                          int64_t* stride_mb, int64_t* stride_ml) {
  *stride_mb = 0;
  *stride_ml = 0;
  if (!mask.has_value()) return nullptr;
  const at::Tensor& m = *mask;
  check_same_device(m, "mask", ref, ref_name);
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte,
              "mask must have dtype bool (or uint8), got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == length,
              "mask must have shape [", batch, ", ", length, "], got ", m.sizes());
  *stride_mb = m.stride(0);
  *stride_ml = m.stride(1);
  return static_cast<const uint8_t*>(m.const_data_ptr());
}

// hidden [B, L, D] (+ mask [B, L]) or [T, D] + cu_seqlens [B+1] -> [B, D], hidden's dtype.
at::Tensor masked_mean_fwd_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& cu_seqlens) {
  check_cuda_tensor(hidden, "hidden");
  MaskedMeanFwdParams p{};
  p.dtype = kernel_dtype<MaskedMeanDtype>(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());

  at::Tensor cu;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(!mask.has_value(),
                "mask must be None when cu_seqlens is given (packed sequences have no padding)");
    TORCH_CHECK(hidden.dim() == 2, "hidden must have 2 dims [T, D] with cu_seqlens, got shape ",
                hidden.sizes());
    cu = checked_cu_seqlens(*cu_seqlens, hidden, "hidden");
    p.batch = cu.size(0) - 1;
    p.cu_seqlens = cu.const_data_ptr<int32_t>();
    p.length = hidden.size(0);
    p.dim = hidden.size(1);
    p.stride_hb = 0;
    p.stride_hl = hidden.stride(0);
    p.stride_hd = hidden.stride(1);
  } else {
    TORCH_CHECK(hidden.dim() == 3, "hidden must have 3 dims [B, L, D] without cu_seqlens, got ",
                "shape ", hidden.sizes());
    p.batch = hidden.size(0);
    p.length = hidden.size(1);
    p.dim = hidden.size(2);
    p.stride_hb = hidden.stride(0);
    p.stride_hl = hidden.stride(1);
    p.stride_hd = hidden.stride(2);
    p.mask = mask_bytes(mask, hidden, "hidden", p.batch, p.length, &p.stride_mb, &p.stride_ml);
  }

  at::Tensor out = at::empty({p.batch, p.dim}, hidden.options());
  p.hidden = hidden.const_data_ptr();
  p.out = out.data_ptr();
  p.stride_ob = out.stride(0);
  check_launch(masked_mean_fwd(p, c10::cuda::getCurrentCUDAStream(hidden.device().index())),
               "masked_mean_fwd_cuda");
  return out;
}

// grad_out [B, D] -> grad of hidden, contiguous: [B, length, D] padded, [length, D] packed.
at::Tensor masked_mean_bwd_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& cu_seqlens, int64_t length) {
  check_cuda_tensor(grad_out, "grad_out");
  MaskedMeanBwdParams p{};
  p.dtype = kernel_dtype<MaskedMeanDtype>(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2, "grad_out must have 2 dims [B, D], got shape ",
              grad_out.sizes());
  TORCH_CHECK(length >= 0, "length must be >= 0, got ", length);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  p.batch = grad_out.size(0);
  p.length = length;
  p.dim = grad_out.size(1);
  p.stride_gb = grad_out.stride(0);
  p.stride_gd = grad_out.stride(1);

  at::Tensor cu;
  at::Tensor grad_hidden;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(!mask.has_value(),
                "mask must be None when cu_seqlens is given (packed sequences have no padding)");
    cu = checked_cu_seqlens(*cu_seqlens, grad_out, "grad_out");
    const int64_t batch = cu.size(0) - 1;
    TORCH_CHECK(batch == p.batch, "grad_out must have ", batch,
                " rows (one per sequence of cu_seqlens), got shape ", grad_out.sizes());
    p.cu_seqlens = cu.const_data_ptr<int32_t>();
    grad_hidden = at::empty({length, p.dim}, grad_out.options());
  } else {
    p.mask = mask_bytes(mask, grad_out, "grad_out", p.batch, length, &p.stride_mb, &p.stride_ml);
    grad_hidden = at::empty({p.batch, length, p.dim}, grad_out.options());
  }

  p.grad_out = grad_out.const_data_ptr();
  p.grad_hidden = grad_hidden.data_ptr();
  check_launch(masked_mean_bwd(p, c10::cuda::getCurrentCUDAStream(grad_out.device().index())),
               "masked_mean_bwd_cuda");
  return grad_hidden;
}

}  // namespace
}  // namespace latentembed

TORCH_LIBRARY_IMPL(latentembed, CUDA, m) {
  m.impl("masked_mean_fwd_cuda", &latentembed::masked_mean_fwd_cuda);
  m.impl("masked_mean_bwd_cuda", &latentembed::masked_mean_bwd_cuda);
}
