// defines: launch_router_select — raw CUDA launcher of the router's expert selection
// (biased, group-limited top-k and the per-expert counts) in one pass over the scores.
// No torch headers. Called only from models/kernels/router_select.cpp.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// Largest expert count and top-k the kernel handles (one warp per row, 16 values per lane).
constexpr int kRouterSelectMaxExperts = 512;
constexpr int kRouterSelectMaxTopK = 32;

// scores [N, E] (dtype 0 = fp32, 1 = bf16, contiguous), bias [E] fp32 ->
// topk_idx [N, K] int64 (by biased score, descending; ties -> lower expert index),
// counts [E] int64 += tokens per expert (the caller zeroes it). Groups: n_group contiguous
// groups of E / n_group experts; a group's score is the sum of its top-2 biased scores; only
// the best topk_group groups are eligible (n_group <= 32). Returns a cudaError_t as int.
int launch_router_select(const void* scores, int dtype, const float* bias, int64_t n_rows, int n_experts, int top_k,
                         int n_group, int topk_group, int64_t* topk_idx, int64_t* counts, void* stream);

}  // namespace moetrain::kernels
