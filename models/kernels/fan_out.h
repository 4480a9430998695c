// defines: fan_out3, sum_gradients — one tensor handed to three readers through one autograd
// node, so the backward sums the three gradients in one pass (fan_out_kernels.cu) instead of
// autograd's two adds. The MoE layer's input is read by the router, the shared experts and the
// routed experts: on bench-1b its [16384, 1024] bf16 gradient took 22 adds a step (0.53 ms).
#pragma once

#include <array>
#include <vector>

#include <torch/torch.h>

namespace moetrain {

// x -> three tensors sharing x's storage (read-only uses), whose gradients flow back to x
// summed. Where sum_gradients has no kernel (CPU, other dtypes, a build without CUDA) it
// returns x itself three times: autograd's own accumulation, the reference twin.
std::array<torch::Tensor, 3> fan_out3(const torch::Tensor& x);

// Σ of the defined tensors of `grads` (same shape; at least one defined): one CUDA kernel for
// two or three contiguous fp32/bf16 tensors of one dtype, else ATen adds (the reference).
torch::Tensor sum_gradients(const std::vector<torch::Tensor>& grads);

}  // namespace moetrain
