// defines: swiglu_reference, swiglu_packed_reference, swiglu_packed, swiglu_packed_scaled,
// fused_kernels_available — the SwiGLU activation silu(gate) * up, computed from one
// tensor whose last dimension packs gate ‖ up: the output of one GEMM against the
// stacked [w1; w3], which spares the backward an add of the two input gradients.
// swiglu_packed runs the CUDA kernel (swiglu_kernels.cu) for fp32/bf16 CUDA tensors and
// the ATen reference everywhere else, so CPU builds and CPU tensors never need it.
#pragma once

#include <utility>

#include <torch/torch.h>

namespace moetrain {

// gate, up: same shape -> silu(gate) * up (plain ATen ops; the reference)
torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up);

// gu: [..., 2F] = gate ‖ up on the last dimension -> silu(gu[..., :F]) * gu[..., F:]: [..., F]
torch::Tensor swiglu_packed_reference(const torch::Tensor& gu);

// Same value and gradients as swiglu_packed_reference; on CUDA one kernel each way, and the
// backward writes the gradient of gu as one tensor.
torch::Tensor swiglu_packed(const torch::Tensor& gu);

// swiglu_packed's backward as a plain function (for autograd nodes that wrap it): gu: [..., 2F],
// grad_out: [..., F] -> the gradient of gu [..., 2F]. The CUDA kernel where swiglu_packed runs
// it, else the closed form in ATen ops.
torch::Tensor swiglu_packed_backward(const torch::Tensor& gu, const torch::Tensor& grad_out);

// The gate-weighted form the routed experts use (models/moe.cpp): out = scale ⊙ silu(gate)·up,
// gu: [..., 2F], scale: [...] fp32 (one weight a row) -> [..., F] in gu's dtype, computed in
// fp32 (at least) and rounded once. The reference in ATen ops.
torch::Tensor swiglu_packed_scaled_reference(const torch::Tensor& gu, const torch::Tensor& scale);
// Same value and gradients (in gu and in scale); on CUDA one kernel each way.
torch::Tensor swiglu_packed_scaled(const torch::Tensor& gu, const torch::Tensor& scale);
// Its backward as a plain function: -> {grad_gu [..., 2F], grad_scale [...] fp32}, where
// grad_scale = Σ_F grad_out · silu(gate)·up. The CUDA kernel (one warp a row) or the closed form.
std::pair<torch::Tensor, torch::Tensor> swiglu_packed_scaled_backward(const torch::Tensor& gu,
                                                                      const torch::Tensor& scale,
                                                                      const torch::Tensor& grad_out);

// True when this build compiled the CUDA kernels (MOETRAIN_WITH_CUDA).
bool fused_kernels_available();

}  // namespace moetrain
