#include "models/kernels/sum_squares.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/sum_squares_kernels.h"
#endif

namespace moetrain {

#ifdef MOETRAIN_WITH_CUDA
namespace {
kernels::SumSquaresTensor entry_of(const torch::Tensor& t) {
  kernels::SumSquaresTensor e{};
  e.data = t.data_ptr();
  e.numel = t.numel();
  e.dtype = kernels::kernel_dtype_code(t);
  e.vec = e.numel % 4 == 0 && reinterpret_cast<uintptr_t>(e.data) % 16 == 0;
  return e;
}
}  // namespace
#endif

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
  constexpr int64_t kChunk = kSumSquaresChunk;
  std::vector<kernels::SumSquaresTensor> table;
  int64_t chunks = 0;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    kernels::SumSquaresTensor e = entry_of(t);
    e.first_chunk = chunks;
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

namespace {
void check_chunks_out(const torch::Tensor& t, const torch::Tensor& out) {
  if (!out.defined() || out.scalar_type() != torch::kFloat || !out.is_contiguous() || out.dim() != 1 ||
      out.size(0) != sum_of_squares_chunk_count(t.numel()) || out.device() != t.device())
    throw std::invalid_argument("sum_of_squares_chunks: out must be a contiguous fp32 [ceil(numel / " +
                                std::to_string(kSumSquaresChunk) + ")] tensor on the input's device");
}
}  // namespace

void sum_of_squares_chunks_into(const torch::Tensor& t, const torch::Tensor& out) {
  check_chunks_out(t, out);
#ifdef MOETRAIN_WITH_CUDA
  if (sum_of_squares_kernel_ok({t})) {
    if (t.numel() == 0) return;
    kernels::check_kernel_launch(kernels::launch_sum_squares_one(entry_of(t), kSumSquaresChunk, out.data_ptr<float>(),
                                                                 kernels::current_stream_of(out)),
                                 "sum of squares (one tensor)");
    return;
  }
#endif
  sum_of_squares_chunks_reference(t, out);
}

void sum_of_squares_chunks_reference(const torch::Tensor& t, const torch::Tensor& out) {
  check_chunks_out(t, out);
  if (t.numel() == 0) return;
  torch::NoGradGuard no_grad;
  // zero-padded to whole chunks: [chunks, chunk], squared and summed along the chunk in fp32
  const torch::Tensor flat = t.detach().reshape({-1}).to(torch::kFloat);
  const int64_t chunks = out.size(0);
  const torch::Tensor padded = torch::constant_pad_nd(flat, {0, chunks * kSumSquaresChunk - flat.numel()});
  out.copy_(padded.view({chunks, kSumSquaresChunk}).square().sum(1));
}

}  // namespace moetrain
