#include "models/kernels/router_select.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/router_select_kernels.h"
#endif

namespace moetrain {

bool router_select_kernel_ok(const torch::Tensor& scores, int64_t top_k, int64_t n_group) {
#ifdef MOETRAIN_WITH_CUDA
  return scores.is_cuda() && scores.dim() == 2 && kernels::kernel_dtype_ok(scores.scalar_type()) &&
         scores.size(1) <= kernels::kRouterSelectMaxExperts && top_k <= kernels::kRouterSelectMaxTopK &&
         n_group <= 32;
#else
  (void)scores, (void)top_k, (void)n_group;
  return false;
#endif
}

std::pair<torch::Tensor, torch::Tensor> router_select_fused(const torch::Tensor& scores, const torch::Tensor& bias,
                                                            int64_t top_k, int64_t n_group, int64_t topk_group) {
  if (!router_select_kernel_ok(scores, top_k, n_group))
    throw std::invalid_argument("router_select_fused: needs contiguous fp32/bf16 CUDA scores, E <= 512, top_k <= 32");
#ifdef MOETRAIN_WITH_CUDA
  const torch::Tensor s = scores.detach().contiguous();
  const torch::Tensor b = bias.to(s.device(), torch::kFloat).contiguous();
  const int64_t N = s.size(0), E = s.size(1);
  TORCH_CHECK(b.numel() == E, "router_select_fused: bias has ", b.numel(), " entries for ", E, " experts");
  torch::Tensor idx = torch::empty({N, top_k}, s.options().dtype(torch::kLong));
  torch::Tensor counts = torch::zeros({E}, s.options().dtype(torch::kLong));
  kernels::check_kernel_launch(
      kernels::launch_router_select(s.data_ptr(), kernels::kernel_dtype_code(s), b.data_ptr<float>(), N,
                                    static_cast<int>(E), static_cast<int>(top_k), static_cast<int>(n_group),
                                    static_cast<int>(topk_group), idx.data_ptr<int64_t>(),
                                    counts.data_ptr<int64_t>(), kernels::current_stream_of(s)),
      "router select");
  return {idx, counts};
#else
  (void)bias, (void)topk_group;
  return {};
#endif
}

}  // namespace moetrain
