#include "models/kernels/sum_squares.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/sum_squares_kernels.h"
#endif

namespace moetrain {

bool sum_of_squares_kernel_ok(const std::vector<torch::Tensor>& tensors) {
#ifdef MOETRAIN_WITH_CUDA
  if (tensors.empty()) return false;
  for (const auto& t : tensors)
    if (!t.is_cuda() || t.device() != tensors.front().device() || !t.is_contiguous() ||
        !kernels::kernel_dtype_ok(t.scalar_type()))
      return false;
  return true;
#else
  (void)tensors;
  return false;
#endif
}

torch::Tensor sum_of_squares_fused(const std::vector<torch::Tensor>& tensors) {
  if (!sum_of_squares_kernel_ok(tensors))
    throw std::invalid_argument("sum_of_squares_fused: contiguous fp32/bf16 tensors on one CUDA device");
#ifdef MOETRAIN_WITH_CUDA
  constexpr int64_t kChunk = 65536;  // elements per block (a multiple of 4)
  std::vector<kernels::SumSquaresTensor> table;
  int64_t chunks = 0;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    kernels::SumSquaresTensor e{};
    e.data = t.data_ptr();
    e.numel = t.numel();
    e.first_chunk = chunks;
    e.dtype = kernels::kernel_dtype_code(t);
    e.vec = e.numel % 4 == 0 && reinterpret_cast<uintptr_t>(e.data) % 16 == 0;
    table.push_back(e);
    chunks += (e.numel + kChunk - 1) / kChunk;
  }
  const torch::Device device = tensors.front().device();
  torch::Tensor partials = torch::zeros({std::max<int64_t>(chunks, 1)}, torch::TensorOptions().device(device));
  if (!table.empty()) {
    const torch::Tensor dev = kernels::upload_table(table.data(), table.size() * sizeof(table[0]), device);
    kernels::check_kernel_launch(
        kernels::launch_sum_squares(reinterpret_cast<const kernels::SumSquaresTensor*>(dev.data_ptr()),
                                    static_cast<int>(table.size()), chunks, kChunk, partials.data_ptr<float>(),
                                    kernels::current_stream_of(partials)),
        "sum of squares");
  }
  return partials.sum();
#else
  return {};
#endif
}

}  // namespace moetrain
