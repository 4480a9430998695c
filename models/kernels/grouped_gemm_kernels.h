// defines: launch_grouped_gemm, grouped_gemm_supported — the routed experts' forward and
// input-gradient GEMMs as one Hopper kernel with the operands swapped (bench/NOTES.md 61).
//
// out[rows of e] = x[rows of e] · w[e]ᵀ (w: [groups, n_out, k], the forward) or x[rows of e] ·
// w[e] (w: [groups, k, n_out], the input gradient), rows of e = [offs[e − 1], offs[e]) (offs[−1] =
// 0, cumulative, on the device). ATen's grouped GEMM tiles each expert's rows by 128, so at a few
// hundred rows an expert up to a third of its last tile is past the group's end (NOTES.md 39).
// Here the weights are the MMA's M side (128 output features a tile) and the tokens its N side,
// which the tensor cores take in steps of 16: an expert's rows go in tiles of 256 and one last
// tile of round_up(rest, 16), so less than 16 rows an expert are wasted. Each output row depends
// on its own input row only (rows of the next expert in a tile are computed and dropped).
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// Whether `device` can run the kernel (sm_90 with its sm_90a code; one synchronizing probe
// launch the first time a device is asked, then a cached answer).
bool grouped_gemm_supported(int device);

// x [rows, k] bf16, w as above (bf16, contiguous), out [rows, n_out] bf16; every pointer 16-byte
// aligned; n_out % 128 == 0, k % 64 == 0, 1 ≤ groups ≤ 512, rows < 2^31 − 256. Rows past
// offs[groups − 1] are written as zeros. Offsets outside [0, rows] or decreasing are clamped to a
// non-decreasing run inside it (no fault, no hang). No workspace, no host synchronization.
// Returns a cudaError_t value (0: launched).
int launch_grouped_gemm(const void* x, const void* w, const int* offs, void* out, int64_t rows, int groups,
                        int64_t n_out, int64_t k, bool w_transposed, void* stream);

}  // namespace moetrain::kernels
