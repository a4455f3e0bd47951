// Torch glue shared by the ops' .cpp files (host code only; the kernels never see it).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

namespace latentembed {

// The kernels' dtype tag for t's dtype. Dtype is an op's `enum class XxxDtype` (kFloat32,
// kFloat16, kBFloat16); any other dtype is an error naming the argument.
template <typename Dtype>
inline Dtype kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must have dtype float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// Argument checks shared by the bindings; each message names the argument, what was expected
// and what came.
inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// cu_seqlens (int32 [B+1], on ref's device) made contiguous; B = result.size(0) - 1.
inline at::Tensor checked_cu_seqlens(const at::Tensor& cu_seqlens, const at::Tensor& ref,
                                     const char* ref_name) {
  check_same_device(cu_seqlens, "cu_seqlens", ref, ref_name);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must have dtype int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "cu_seqlens must have shape [B+1], got ", cu_seqlens.sizes());
  return cu_seqlens.contiguous();
}

// Turns a launcher's error code into an exception naming the op.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace latentembed
