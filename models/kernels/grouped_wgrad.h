// defines: grouped_weight_grad, grouped_weight_grad_reference, grouped_wgrad_kernel_applies —
// the routed experts' weight gradient dw[e] = dy[rows of e]ᵀ · x[rows of e].
//
// On an H100/H200 (sm_90) with bf16 operands of suitable widths it can run our own kernel
// (grouped_wgrad_kernels.cu: heavy experts' rows split into chunks, summed in a fixed order, so
// the result is deterministic; bench/NOTES.md 44), else ATen's grouped GEMM. The reference is a
// loop of one matmul per expert.
//
// Which one, by measurement (NOTES.md 44): ours takes 6–30 % less time than ATen's alone, and
// the bench step 0.65–0.85 ms less when the experts' backward runs on one stream; on a second
// stream beside the input-gradient chain ATen's gives the faster step (by ≈ 0.5 ms: the SMs its uneven
// tail frees run the main stream's GEMMs, where our persistent kernel holds every SM until its
// tiles run out). MOETRAIN_GROUPED_WGRAD: "auto" (default) ours except beside another stream,
// "1" always ours, "0" always ATen's.
#pragma once

#include <torch/torch.h>

namespace moetrain {

// dy: [M, N] and x: [M, K] rows grouped by expert, offs: [E] int32 end row of each group (on
// dy's device) -> [E, N, K] in dy's dtype; an expert without rows gets zeros.
// beside_main_stream: the caller runs it on a side stream next to other GEMMs (see above).
torch::Tensor grouped_weight_grad(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& offs,
                                  bool beside_main_stream = false);

// The twin: per expert, dy[rows]ᵀ · x[rows] summed in fp32 (fp64 for fp64 operands; reads offs on
// the host).
torch::Tensor grouped_weight_grad_reference(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& offs);

// Whether grouped_weight_grad takes our kernel for these operands: a CUDA build on an sm_90
// device, bf16 contiguous operands, N % 128 == 0, K % 256 == 0, E ≤ 512, and the
// MOETRAIN_GROUPED_WGRAD rule above.
bool grouped_wgrad_kernel_applies(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& offs,
                                  bool beside_main_stream = false);

}  // namespace moetrain
