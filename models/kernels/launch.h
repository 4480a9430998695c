// defines: kernel_dtype_code, check_kernel_launch, current_stream_of — the glue between
// the C++ autograd wrappers of models/kernels and their raw .cu launchers.
// CUDA builds only (MOETRAIN_WITH_CUDA).
#pragma once

#include <cstring>
#include <stdexcept>

#include <c10/cuda/CUDAStream.h>
#include <fmt/format.h>
#include <torch/torch.h>

namespace moetrain::kernels {

// The launchers' dtype codes: 0 = float32, 1 = bfloat16 (callers check the dtype first).
inline int kernel_dtype_code(torch::ScalarType t) { return t == torch::kBFloat16 ? 1 : 0; }
inline int kernel_dtype_code(const torch::Tensor& t) { return kernel_dtype_code(t.scalar_type()); }
inline bool kernel_dtype_ok(torch::ScalarType t) { return t == torch::kFloat32 || t == torch::kBFloat16; }

inline void* current_stream_of(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// A kernel's argument table (plain structs) on the device: copied through pinned memory, so
// the copy is asynchronous on the current stream (no host sync). Keep the result alive until
// the kernel reading it is queued (the caching allocators then order its reuse).
inline torch::Tensor upload_table(const void* data, size_t bytes, const torch::Device& device) {
  torch::Tensor host =
      torch::empty({static_cast<int64_t>(bytes)}, torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, bytes);
  return host.to(device, /*non_blocking=*/true);
}

// A launcher's cudaError_t (0 = success) -> exception naming the kernel.
inline void check_kernel_launch(int err, const char* what) {
  if (err != 0) throw std::runtime_error(fmt::format("{}: CUDA error {}", what, err));
}

}  // namespace moetrain::kernels
