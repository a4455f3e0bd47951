// Latent cross-attention (folded NV-Embed block) on CUDA tensors: the host-side algorithm, i.e.
// the LayerNorm and softmax kernels of latent_cross_attention.cuh between cuBLAS GEMMs called
// through ATen (latent_cross_attention_host.cpp documents the steps).
//
// The caller (bindings.cpp) has checked the arguments and set the device guard; these functions
// make their inputs contiguous and compute in x's dtype under an autocast exclusion.
//
// y = x + sum_h softmax_R(LN(x) @ m[h]^T) @ u[h]. Shapes: x, y [T, D]; ln_weight, ln_bias [D]
// (any floating dtype, used in fp32); m, u [H, R, D] in x's dtype.
#pragma once

#include <ATen/ATen.h>

namespace latentembed {

// The block's parameters.
struct LcaWeights {
  at::Tensor ln_weight;  // [D]
  at::Tensor ln_bias;    // [D]
  at::Tensor m;          // [H, R, D]: m[h] = K_h Wq_h / sqrt(dim_head), scale included
  at::Tensor u;          // [H, R, D]: u[h] = V_h Wo_h^T
};

// What the forward keeps for the backward.
struct LcaSaved {
  at::Tensor probs;  // [T, H*R] in x's dtype, the per-head softmax
  at::Tensor mean;   // [T] fp32, LayerNorm statistics
  at::Tensor rstd;   // [T] fp32
};

struct LcaForward {
  at::Tensor y;  // [T, D] in x's dtype: x + attention
  LcaSaved saved;
};

// Gradients of the inputs; ln_weight / ln_bias in their own dtypes; m / u are empty ([0]) when
// not requested.
struct LcaGrads {
  at::Tensor x;
  at::Tensor ln_weight;
  at::Tensor ln_bias;
  at::Tensor m;
  at::Tensor u;
};

LcaForward latent_cross_attention_fwd(const at::Tensor& x, const LcaWeights& weights, double eps);

LcaGrads latent_cross_attention_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                    const LcaWeights& weights, const LcaSaved& saved,
                                    bool need_dm, bool need_du);

}  // namespace latentembed
