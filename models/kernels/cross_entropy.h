// defines: cross_entropy_rows_fused, cross_entropy_grad_fused, cross_entropy_rows_and_grad_fused,
// cross_entropy_kernel_ok — the LM
// head's cross-entropy over a chunk of fp32 or bf16 logits (fp32 math) as one CUDA kernel each way
// (cross_entropy_kernels.cu). models/lm_loss.cpp keeps the ATen twin and picks.
#pragma once

#include <torch/torch.h>

namespace moetrain {

// Whether the kernels take these logits: CUDA build, contiguous fp32 or bf16 CUDA [n, V].
bool cross_entropy_kernel_ok(const torch::Tensor& logits);

// logits [n, V] fp32/bf16, targets [n] int64 -> writes loss [n] (logsumexp − logit[target]; 0 for
// ignore_index rows) and lse [n] (fp32 views the caller owns). No autograd.
void cross_entropy_rows_fused(const torch::Tensor& logits, const torch::Tensor& targets, int64_t ignore_index,
                              torch::Tensor& loss, torch::Tensor& lse);

// -> grad [n, V] in grad_dtype (fp32 or bf16) = (softmax(logits) − onehot(target)) · scale,
// 0 for ignore_index rows; lse from cross_entropy_rows_fused, scale a one-element fp32 tensor on the device.
torch::Tensor cross_entropy_grad_fused(const torch::Tensor& logits, const torch::Tensor& lse, const torch::Tensor& targets,
                                       const torch::Tensor& scale, int64_t ignore_index, torch::ScalarType grad_dtype);

// Both at once, one read of the logits (the fused path of the LM head's gradients in the
// forward): writes loss and lse as cross_entropy_rows_fused and returns the gradient as
// cross_entropy_grad_fused would — written over `logits` when grad_dtype is its dtype (the
// logits are consumed), else a new tensor.
torch::Tensor cross_entropy_rows_and_grad_fused(torch::Tensor& logits, const torch::Tensor& targets,
                                                const torch::Tensor& scale, int64_t ignore_index, torch::Tensor& loss,
                                                torch::Tensor& lse, torch::ScalarType grad_dtype);

}  // namespace moetrain
