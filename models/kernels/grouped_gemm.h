// defines: grouped_linear, grouped_linear_input_grad, grouped_linear_reference,
// grouped_gemm_kernel_applies — the routed experts' forward GEMM out[rows of e] = x[rows of e] ·
// w[e]ᵀ and its input gradient dx[rows of e] = dy[rows of e] · w[e].
//
// On an H100/H200 (sm_90) with bf16 operands of suitable widths they run our swapped-operand
// kernel (grouped_gemm_kernels.cu: an expert's last tile as narrow as its rows need; on
// bench-1b's shapes 10–18 % less time than ATen's grouped GEMM alone, the same time in the MoE
// layer at 64 experts and 2–6 % less at 256, bench/NOTES.md 61), else ATen's grouped GEMM (the
// twin the GPU test holds it to) where it takes the operands, else a loop of one matmul per
// expert (which reads the offsets on the host).
// MOETRAIN_GROUPED_GEMM: "auto" (default) ours where it applies, "0" always ATen's.
#pragma once

#include <torch/torch.h>

namespace moetrain {

// x: [M, K] rows grouped by expert, w: [E, N, K], offs: [E] int32 end row of each group (on x's
// device) -> [M, N] in x's dtype. Pass offsets that end at M (the MoE layer's counts sum to M):
// rows past offs[E − 1] are zeros from our kernel and the loop but left unwritten by ATen's.
torch::Tensor grouped_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs);

// dy: [M, N], w: [E, N, K] -> [M, K]: dy[rows of e] · w[e], the input gradient of grouped_linear.
torch::Tensor grouped_linear_input_grad(const torch::Tensor& dy, const torch::Tensor& w, const torch::Tensor& offs);

// The twin of both: per expert x[rows] · w[e]ᵀ (or · w[e] when input_grad) summed in fp32 (fp64
// for fp64 operands), rows past the last offset zero; reads offs on the host.
torch::Tensor grouped_linear_reference(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs,
                                       bool input_grad = false);

// Whether our kernel runs grouped_linear(x, w, offs) (input_grad: grouped_linear_input_grad): a
// CUDA build on an sm_90 device, bf16 contiguous 16-byte-aligned operands, an output width ≥ 128
// and % 128 == 0, a reduction width ≥ 64 and % 64 == 0, 1 ≤ E ≤ 512, M and E · width within the
// kernel's 32-bit coordinates, int32 offsets, and MOETRAIN_GROUPED_GEMM not "0".
bool grouped_gemm_kernel_applies(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs,
                                 bool input_grad = false);

}  // namespace moetrain
