// defines: GroupedExperts, moe_experts_reference — DeepSeekMoE's routed SwiGLU
// experts stored as stacked 3-D parameters (the optimizer sees 2 tensors, not 3·E),
// run as grouped GEMMs over expert-sorted rows, plus the slow per-expert loop that
// the tests hold the fast path to.
//
// Expert j computes w2[j] @ (silu(w1[j] @ x) * (w3[j] @ x)), with the gate w1[j] and the
// up projection w3[j] stacked as w13[j] = [w1[j]; w3[j]] (Megatron's fc1, transformers 5's
// in-memory gate_up_proj): one GEMM of twice the width each way, and the backward needs
// no [rows, D] add of the two input gradients (bench/NOTES.md 21).
#pragma once

#include <torch/torch.h>

namespace moetrain {

struct GroupedExpertsImpl : torch::nn::Module {
  GroupedExpertsImpl(int64_t n_experts, int64_t dim, int64_t inter, double init_std);

  // x: [M, D] rows grouped by expert (expert 0's rows first), counts: [E] int64 with
  // sum M, row_scale: undefined or [M] fp32 -> [M, D]; with row_scale, row r's SwiGLU output is
  // scaled by row_scale[r] before w2 (the gate weight applied inside the expert; equal to scaling
  // its output, as w2 is linear). CUDA with bf16 operands — bf16 tensors, or fp32 master weights under
  // bf16 autocast, cast to bf16 here as autocast casts a matmul's — runs grouped GEMMs (ours on
  // sm_90, else at::_grouped_mm: models/kernels/grouped_gemm.h; counts stay on the device);
  // otherwise one matmul per expert on its slice (counts read on the host).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& counts, const torch::Tensor& row_scale = {});

  // One expert on its rows: x: [n, D] -> [n, D]
  torch::Tensor expert_forward(int64_t e, const torch::Tensor& x);

  // Whether forward takes the at::_grouped_mm path for this input (and the autocast state).
  bool uses_grouped_mm(const torch::Tensor& x) const;

  // Expert e's gate (w1) and up projection (w3), views into w13: [E, I, D]
  torch::Tensor gate_weight() const { return w13.narrow(1, 0, inter); }
  torch::Tensor up_weight() const { return w13.narrow(1, inter, inter); }

  int64_t n_experts, dim, inter;
  torch::Tensor w13;  // [E, 2I, D]: rows [0, I) gate (w1), [I, 2I) up (w3)
  torch::Tensor w2;   // [E, D, I] down
};
TORCH_MODULE(GroupedExperts);

// The grouped path's GEMMs and SwiGLU as one autograd node. x: [M, D] bf16 rows grouped by
// expert, w13: [E, 2I, D] and w2: [E, D, I] bf16, offs: [E] int32 end row of each group,
// row_scale: undefined or [M] fp32 (h = row_scale ⊙ silu(g)·u, differentiable in row_scale) -> [M, D].
// Its backward runs the two weight-gradient GEMMs on a second stream beside the input-gradient
// chain (weight_grad_stream.h): a weight-gradient GEMM's tiles are as uneven as the groups (each
// sums its expert's rows), and while its long tiles finish the other stream's GEMMs take the SMs
// it leaves idle (bench/NOTES.md 41). On one stream (MOETRAIN_WGRAD_STREAM=0 or linear) the
// weight gradients are our own sm_90 kernel, which splits heavy experts' rows
// (kernels/grouped_wgrad.h, bench/NOTES.md 44). CUDA tensors in CUDA builds; elsewhere the
// reference.
torch::Tensor grouped_swiglu_experts(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2,
                                     const torch::Tensor& offs, const torch::Tensor& row_scale = {});

// The twin: the same GEMMs and SwiGLU kernel (the scaled SwiGLU in ATen ops) through ATen's
// autograd, on one stream.
torch::Tensor grouped_swiglu_experts_reference(const torch::Tensor& x, const torch::Tensor& w13,
                                               const torch::Tensor& w2, const torch::Tensor& offs,
                                               const torch::Tensor& row_scale = {});

// The reference: for each expert, find its (token, k) pairs, run it, and add the
// gate-weighted result back. x: [N, D], topk_idx / topk_weight: [N, K] -> [N, D]
torch::Tensor moe_experts_reference(GroupedExpertsImpl& experts, const torch::Tensor& x,
                                    const torch::Tensor& topk_idx, const torch::Tensor& topk_weight);

}  // namespace moetrain
