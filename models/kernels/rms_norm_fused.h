// defines: rms_norm_reference, rms_norm_fused, add_rms_norm_reference, add_rms_norm_fused — RMSNorm's math as plain ATen ops (the
// reference, Hugging Face's DeepseekV3RMSNorm order) and as one CUDA kernel each way
// (rms_norm_kernels.cu) for contiguous-able fp32/bf16 CUDA inputs with an fp32 weight;
// everything else falls back to the reference.
#pragma once

#include <torch/torch.h>

namespace moetrain {

// x: [..., D], weight: [D] -> weight · round_x(x / rms(x)) in promote(weight, x)'s dtype,
// normalized in fp32 (fp64 for fp64 inputs).
torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// The same value rounded to out_dtype, with its gradients; on CUDA one fused kernel
// forward and one backward (the weight gradient summed from per-warp partials).
torch::Tensor rms_norm_fused(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                             torch::ScalarType out_dtype);

// The pre-norm residual step: h = x + delta and its norm, {h, rms_norm(h)} (the reference:
// ATen's add, then rms_norm_reference).
std::pair<torch::Tensor, torch::Tensor> add_rms_norm_reference(const torch::Tensor& x, const torch::Tensor& delta,
                                                               const torch::Tensor& weight, double eps);

// The same with the norm rounded to out_dtype; on CUDA (x and delta of one dtype) one kernel
// each way: the forward writes h and its norm in one pass, the backward adds h's incoming
// gradient into the norm's input gradient before its one rounding (the reference rounds
// both and adds them in the residual's dtype).
std::pair<torch::Tensor, torch::Tensor> add_rms_norm_fused(const torch::Tensor& x, const torch::Tensor& delta,
                                                           const torch::Tensor& weight, double eps,
                                                           torch::ScalarType out_dtype);

}  // namespace moetrain
