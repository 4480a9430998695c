// defines: sum_of_squares_fused, sum_of_squares_kernel_ok, sum_of_squares_chunks_into (+ its
// reference), kSumSquaresChunk — Σ x² over a list of tensors in one CUDA kernel
// (sum_squares_kernels.cu): the global gradient norm for clipping. trainer's grad_norm keeps
// _foreach_norm as the reference twin and picks. The per-chunk form is the same sums for one
// tensor at a time, into a slice of a buffer: the norm summed during the backward
// (trainer/grad_norm_tracker.h) adds the same partials as the list kernel.
#pragma once

#include <vector>

#include <torch/torch.h>

namespace moetrain {

// Whether the kernel takes every tensor: CUDA build, contiguous fp32/bf16 on one CUDA device.
bool sum_of_squares_kernel_ok(const std::vector<torch::Tensor>& tensors);

// -> fp32 scalar on the device: Σ over all tensors of Σ x² (fp32 accumulation): the sum of
// the per-chunk partials of the tensors in order.
torch::Tensor sum_of_squares_fused(const std::vector<torch::Tensor>& tensors);

// Elements per chunk (a multiple of 8); a tensor of n elements has ceil(n / chunk) chunks.
constexpr int64_t kSumSquaresChunk = 65536;
inline int64_t sum_of_squares_chunk_count(int64_t numel) { return (numel + kSumSquaresChunk - 1) / kSumSquaresChunk; }

// out[c] = Σ x² over chunk c of t (fp32 accumulation), out a contiguous fp32 [chunk_count]
// tensor (a slice of a larger buffer) on t's device, written on the current stream. The CUDA
// kernel where sum_of_squares_kernel_ok({t}) (bit-equal to sum_of_squares_fused's partials
// for t), else the reference.
void sum_of_squares_chunks_into(const torch::Tensor& t, const torch::Tensor& out);
void sum_of_squares_chunks_reference(const torch::Tensor& t, const torch::Tensor& out);

}  // namespace moetrain
