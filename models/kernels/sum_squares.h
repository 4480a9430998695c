// defines: sum_of_squares_fused, sum_of_squares_kernel_ok — Σ x² over a list of tensors in
// one CUDA kernel (sum_squares_kernels.cu): the global gradient norm for clipping. trainer's
// grad_norm keeps _foreach_norm as the reference twin and picks.
#pragma once

#include <vector>

#include <torch/torch.h>

namespace moetrain {

// Whether the kernel takes every tensor: CUDA build, contiguous fp32/bf16 on one CUDA device.
bool sum_of_squares_kernel_ok(const std::vector<torch::Tensor>& tensors);

// -> fp32 scalar on the device: Σ over all tensors of Σ x² (fp32 accumulation).
torch::Tensor sum_of_squares_fused(const std::vector<torch::Tensor>& tensors);

}  // namespace moetrain
