// Torch glue shared by the ops' bindings.cpp files (host code only; the kernels never see it).
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

// Turns a launcher's error code into an exception naming the op.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace latentembed
