// defines: cuda_bf16_autocast, Bf16AutocastGuard — the trainer's bf16 mode (CUDA
// autocast to bf16 over fp32 master weights). Layers that bypass autocast (grouped
// GEMMs, fused kernels, custom backward passes) ask cuda_bf16_autocast to pick the dtype
// autocast would have picked.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

namespace moetrain {

inline bool cuda_bf16_autocast(const torch::Tensor& t) {
  return t.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA) &&
         at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16;
}

// bf16 autocast on CUDA for a scope (a forward pass); a no-op when disabled.
class Bf16AutocastGuard {
 public:
  explicit Bf16AutocastGuard(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
    prev_ = at::autocast::is_autocast_enabled(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ~Bf16AutocastGuard() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(at::kCUDA, prev_);
    at::autocast::clear_cache();
  }
  Bf16AutocastGuard(const Bf16AutocastGuard&) = delete;
  Bf16AutocastGuard& operator=(const Bf16AutocastGuard&) = delete;

 private:
  bool enabled_, prev_ = false;
};

}  // namespace moetrain
