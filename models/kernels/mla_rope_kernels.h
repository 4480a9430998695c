// defines: launch_mla_rope_q, launch_mla_rope_kv_forward/_backward — raw CUDA launchers of MLA's
// query/key assembly with interleaved RoPE (no torch headers). Called only from
// models/kernels/mla_rope.cpp.
//
// Per head the query/key is [nope | rope] (qk = nope + R); pair i of the rope part is
// (x[2i], x[2i+1]) and turns by the angle of its position: (a cos − b sin, a sin + b cos).
// cos/sin: [T, R/2] fp32. dtype codes: 0 = float32, 1 = bfloat16. Returns a cudaError_t as int.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// q: [B, T, H, qk] contiguous -> out [B, T, H, qk]: nope copied, rope rotated.
// Backward (inverse = true) turns the other way: grad_q from grad_out.
int launch_mla_rope_q(const void* q, void* out, const float* cos, const float* sin, int64_t rows, int64_t t_len,
                      int64_t heads, int64_t nope, int64_t rope, bool inverse, int dtype, void* stream);

// kv: [B, T, H, nope + v] contiguous, k_rope: rows (b, t) of R values, row r at k_rope + r·k_rope_stride
// -> k [B, T, H, nope + R]: k_nope from kv, the rotated k_rope shared by all heads; and
//    v [B, T, H, v] contiguous: kv's v part (one pass over kv for both).
int launch_mla_rope_kv_forward(const void* kv, const void* k_rope, int64_t k_rope_stride, void* k, void* v,
                               const float* cos, const float* sin, int64_t bt, int64_t t_len, int64_t heads,
                               int64_t nope, int64_t v_dim, int64_t rope, int dtype, void* stream);
// grad_k [B, T, H, nope + R] contiguous and grad_v [B, T, H, v] (last dim contiguous, the others
// at grad_v_strides) -> grad_kv [B, T, H, nope + v] = [grad_k's nope | grad_v] and
// grad_k_rope [B·T, R] contiguous (the inverse rotation summed over heads).
int launch_mla_rope_kv_backward(const void* grad_k, const void* grad_v, const int64_t grad_v_strides[3],
                                void* grad_kv, void* grad_k_rope, const float* cos, const float* sin, int64_t bt,
                                int64_t t_len, int64_t heads, int64_t nope, int64_t v_dim, int64_t rope, int dtype,
                                void* stream);

}  // namespace moetrain::kernels
