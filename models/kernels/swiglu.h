// defines: swiglu_reference, swiglu_fused, fused_kernels_available — the SwiGLU
// activation silu(gate) * up. swiglu_fused runs the CUDA kernel
// (swiglu_kernels.cu) for contiguous fp32/bf16 CUDA tensors and falls back to the
// ATen reference everywhere else, so CPU builds and CPU tensors never need it.
#pragma once

#include <torch/torch.h>

namespace moetrain {

// gate, up: same shape -> silu(gate) * up (plain ATen ops; the reference)
torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up);

// Same value and gradients as swiglu_reference; one fused kernel each way on CUDA.
torch::Tensor swiglu_fused(const torch::Tensor& gate, const torch::Tensor& up);

// True when this build compiled the CUDA kernels (MOETRAIN_WITH_CUDA).
bool fused_kernels_available();

}  // namespace moetrain
