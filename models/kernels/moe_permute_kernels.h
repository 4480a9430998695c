// defines: launch_moe_expert_sort, launch_moe_permute_*, launch_moe_unpermute_* — raw CUDA
// launchers of the MoE row permutation (no torch headers). Called only from models/kernels/moe_permute.cpp.
//
// Layout: N tokens, K routed experts each, M = N·K expert-sorted rows of width D.
// inv[n·K + k] is the sorted row of token n's k-th choice (the inverse of the sort).
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// dtype codes: 0 = float32, 1 = bfloat16. Returns a cudaError_t as int (0 = success).

// rows[inv[n·K + k]] = x[n]  (x: [N, D] x_dtype -> rows: [M, D] rows_dtype)
int launch_moe_permute_forward(const void* x, const int64_t* inv, void* rows, int64_t n_tokens, int64_t k, int64_t dim,
                               int x_dtype, int rows_dtype, void* stream);
// grad_x[n] = Σ_k grad_rows[inv[n·K + k]]  (fp32 sum, written in x_dtype)
int launch_moe_permute_backward(const void* grad_rows, const int64_t* inv, void* grad_x, int64_t n_tokens, int64_t k,
                                int64_t dim, int rows_dtype, int x_dtype, void* stream);
// out[n] = Σ_k w[n·K + k] · y[inv[n·K + k]]  (y: [M, D] y_dtype, w fp32, out [N, D] y_dtype)
// base: null, or [N, D] in y's dtype added to every sum (the shared experts' output);
// w: null for the unweighted sum (the gates applied inside the experts)
int launch_moe_unpermute_forward(const void* y, const float* w, const int64_t* inv, const void* base, void* out,
                                 int64_t n_tokens, int64_t k, int64_t dim, int y_dtype, void* stream);
// grad_y[inv[n·K + k]] = w[n·K + k] · grad_out[n];  grad_w[n·K + k] = <grad_out[n], y[inv[n·K + k]]>
// w == null (unweighted): grad_y[inv[n·K + k]] = grad_out[n]; y and grad_w unused (may be null)
int launch_moe_unpermute_backward(const void* y, const float* w, const int64_t* inv, const void* grad_out,
                                  void* grad_y, float* grad_w, int64_t n_tokens, int64_t k, int64_t dim, int y_dtype,
                                  void* stream);

// The stable sort of the M pairs by expert (expert: [M] int64 in [0, E), pair i = n·K + k):
// order[r] = the pair at sorted row r, token_idx[r] = order[r] / K, inv[order[r]] = r.
// scratch: moe_expert_sort_scratch(M, E) ints. Needs M < 2^31 and E ≤ kMoeSortMaxExperts.
constexpr int64_t kMoeSortMaxExperts = 1024;
int64_t moe_expert_sort_scratch(int64_t m, int64_t n_experts);
int launch_moe_expert_sort(const int64_t* expert, int64_t m, int64_t n_experts, int64_t k, int* scratch,
                           int64_t* order, int64_t* token_idx, int64_t* inv, void* stream);

}  // namespace moetrain::kernels
