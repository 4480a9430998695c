// defines: chunked_cross_entropy — mean next-token cross-entropy of a linear LM
// head, computed over chunks of rows so the [N, V] logits never exist at once,
// not even for the backward pass (a custom autograd function that computes each chunk's
// gradients beside its loss on CUDA, or recomputes the chunk's logits in backward).
#pragma once

#include <torch/torch.h>

namespace moetrain {

constexpr int64_t kIgnoreIndex = -100;  // targets equal to this are skipped (as torch's CE)

// hidden: [N, D], weight: [V, D] (the head), targets: [N] int64 -> scalar loss
// = mean over non-ignored rows of -log softmax(hidden·W^T)[target], in fp32 (fp64
// for fp64 inputs). chunk_tokens <= 0 means one chunk. Differentiable in hidden
// and weight (first order only). Under CUDA bf16 autocast the three matmuls (forward,
// and the recompute + both gradients in backward) take bf16 operands with fp32
// accumulation; softmax and sums stay fp32. The logits are stored in fp32, or with
// bf16_logits under that autocast in bf16 (train.logits_dtype: the head's GEMM output as the
// peers keep it; the loss still reads them into fp32). grads_in_forward (CUDA fused kernels,
// when a backward follows): the gradients are computed beside the loss, chunk by chunk, and the
// backward only scales them — one logits GEMM a chunk instead of two; false: the backward
// recomputes the logits (the twin the GPU test holds it to).
torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                    const torch::Tensor& targets, int64_t chunk_tokens,
                                    int64_t ignore_index = kIgnoreIndex, bool bf16_logits = false,
                                    bool grads_in_forward = true);

}  // namespace moetrain
