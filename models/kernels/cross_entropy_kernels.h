// defines: launch_cross_entropy_forward, launch_cross_entropy_backward,
// launch_cross_entropy_forward_grad — raw CUDA launchers of
// the LM head's fused cross-entropy over fp32 or bf16 logits rows (no torch headers). Called only from
// models/kernels/cross_entropy.cpp.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// logits [n, V] (logits_dtype 0 = fp32, 1 = bf16; contiguous), targets [n] int64 -> loss [n] =
// logsumexp − logit[target] (0 where target == ignore_index, NaN for a target outside [0, V)),
// lse [n] = logsumexp, in fp32. One pass over each row (online max and sum). Returns a
// cudaError_t as int.
int launch_cross_entropy_forward(const void* logits, int logits_dtype, const int64_t* targets, int64_t n, int64_t V,
                                 int64_t ignore_index, float* loss, float* lse, void* stream);

// grad [n, V] (dtype 0 = fp32, 1 = bf16) = (exp(logit − lse) − onehot(target)) · scale[0]; rows
// whose target is ignore_index get 0. One read of the logits, one write of the gradient.
int launch_cross_entropy_backward(const void* logits, int logits_dtype, const float* lse, const int64_t* targets,
                                  const float* scale, int64_t n, int64_t V, int64_t ignore_index, void* grad,
                                  int grad_dtype, void* stream);

// Both in one kernel: loss and lse as the forward, grad as the backward from the same read of
// each row (the gradient's read hits the caches). grad may be logits itself (same dtype).
int launch_cross_entropy_forward_grad(const void* logits, int logits_dtype, const int64_t* targets, const float* scale,
                                      int64_t n, int64_t V, int64_t ignore_index, float* loss, float* lse, void* grad,
                                      int grad_dtype, void* stream);

}  // namespace moetrain::kernels
