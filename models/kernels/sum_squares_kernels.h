// defines: SumSquaresTensor, launch_sum_squares — raw CUDA launcher of Σ x² over many tensors
// in one kernel (the gradient norm for clipping; no torch headers). Called only from
// models/kernels/sum_squares.cpp.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

struct SumSquaresTensor {
  const void* data;     // contiguous device buffer
  int64_t numel;
  int64_t first_chunk;  // chunks of the tensors before this one
  int dtype;            // 0 = fp32, 1 = bf16
  int vec;              // 16-byte aligned and numel % 4 == 0: four elements per access
};

// tensors: a device array of n_tensors entries ordered by first_chunk; one block per chunk of
// `chunk` elements writes partials[c] = Σ x² of its chunk in fp32. Returns a cudaError_t as int.
int launch_sum_squares(const SumSquaresTensor* tensors, int n_tensors, int64_t n_chunks, int64_t chunk, float* partials,
                       void* stream);

// One tensor t (first_chunk unused): a block per chunk writes partials[c] = Σ x² of its chunk
// c, the same per-chunk sums launch_sum_squares writes for t inside a list (the gradient norm
// summed parameter by parameter as the backward finishes them: trainer/grad_norm_tracker.h).
int launch_sum_squares_one(SumSquaresTensor t, int64_t chunk, float* partials, void* stream);

}  // namespace moetrain::kernels
