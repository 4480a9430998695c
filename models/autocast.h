// defines: cuda_bf16_autocast — whether a CUDA tensor's ops run under bf16 autocast
// (the trainer's bf16 mode). Layers that bypass autocast (grouped GEMMs, fused kernels,
// custom backward passes) ask this to pick the dtype autocast would have picked.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

namespace moetrain {

inline bool cuda_bf16_autocast(const torch::Tensor& t) {
  return t.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA) &&
         at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16;
}

}  // namespace moetrain
