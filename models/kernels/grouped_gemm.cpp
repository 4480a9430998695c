#include "models/kernels/grouped_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <ATen/ops/_grouped_mm.h>

#ifdef MOETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "models/kernels/grouped_gemm_kernels.h"
#include "models/kernels/launch.h"
#endif

namespace moetrain {

torch::Tensor grouped_linear_reference(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs,
                                       bool input_grad) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && offs.dim() == 1 && offs.size(0) == w.size(0) &&
                  x.size(1) == (input_grad ? w.size(1) : w.size(2)),
              "grouped_linear: x [M, K], w [E, N, K] (input gradient: x [M, N]), offs [E]; got ", x.sizes(), ", ",
              w.sizes(), ", ", offs.sizes());
  const torch::Tensor ends = offs.to(torch::kCPU, torch::kLong);
  const auto acc = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;  // fp32 sums at least
  const int64_t n_out = input_grad ? w.size(2) : w.size(1);
  torch::Tensor out = torch::zeros({x.size(0), n_out}, x.options().dtype(acc));
  int64_t start = 0;
  for (int64_t e = 0; e < w.size(0); ++e) {
    const int64_t end = ends[e].item<int64_t>();
    TORCH_CHECK(end >= start && end <= x.size(0), "grouped_linear: offs must be non-decreasing and ≤ M");
    if (end > start) {
      const torch::Tensor we = w[e].to(acc);
      out.narrow(0, start, end - start).copy_(x.narrow(0, start, end - start).to(acc).mm(input_grad ? we : we.t()));
    }
    start = end;
  }
  return out.to(x.scalar_type());
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

bool kernel_enabled() {
  static const std::string mode = [] {
    const char* v = std::getenv("MOETRAIN_GROUPED_GEMM");
    return std::string(v ? v : "auto");
  }();
  TORCH_CHECK(mode == "auto" || mode == "0", "MOETRAIN_GROUPED_GEMM: expected auto or 0, found '", mode, "'");
  return mode == "auto";
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

torch::Tensor run_kernel(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs, bool input_grad) {
  const c10::cuda::CUDAGuard on_device(x.device());  // the launcher uses the current device
  const int64_t rows = x.size(0), n_out = input_grad ? w.size(2) : w.size(1);
  torch::Tensor out = torch::empty({rows, n_out}, x.options());
  kernels::check_kernel_launch(
      kernels::launch_grouped_gemm(x.data_ptr(), w.data_ptr(), offs.data_ptr<int>(), out.data_ptr(), rows,
                                   static_cast<int>(w.size(0)), n_out, x.size(1), input_grad,
                                   kernels::current_stream_of(x)),
      input_grad ? "grouped GEMM (input gradient)" : "grouped GEMM");
  return out;
}

}  // namespace
#endif

bool grouped_gemm_kernel_applies(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs,
                                 bool input_grad) {
#ifdef MOETRAIN_WITH_CUDA
  if (!x.is_cuda() || x.dim() != 2 || w.dim() != 3 || offs.dim() != 1 || w.device() != x.device() ||
      offs.device() != x.device())
    return false;
  if (x.scalar_type() != torch::kBFloat16 || w.scalar_type() != torch::kBFloat16 || offs.scalar_type() != torch::kInt)
    return false;
  if (!x.is_contiguous() || !w.is_contiguous() || !offs.is_contiguous() || !aligned16(x) || !aligned16(w)) return false;
  const int64_t k = x.size(1), n_out = input_grad ? w.size(2) : w.size(1), groups = w.size(0);
  if (k != (input_grad ? w.size(1) : w.size(2)) || offs.size(0) != groups) return false;
  // the launcher's limits (grouped_gemm_kernels.h): 32-bit row and TMA coordinates
  constexpr int64_t kInt32Max = (int64_t{1} << 31) - 1;
  if (n_out < 128 || n_out % 128 != 0 || k < 64 || k % 64 != 0 || groups < 1 || groups > 512 || x.size(0) < 1 ||
      x.size(0) > kInt32Max - 256 || groups * std::max(n_out, k) > kInt32Max)
    return false;
  return kernel_enabled() && kernels::grouped_gemm_supported(x.device().index());
#else
  (void)x;
  (void)w;
  (void)offs;
  (void)input_grad;
  return false;
#endif
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

// What at::_grouped_mm (torch 2.11) takes: CUDA operands of one 16-bit or fp32 dtype whose rows
// are 16-byte aligned, int32 offsets on their device. Anything else goes to the reference loop.
bool aten_takes(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs) {
  const auto t = x.scalar_type();
  return x.is_cuda() && w.device() == x.device() && offs.device() == x.device() && w.scalar_type() == t &&
         (t == torch::kBFloat16 || t == torch::kHalf || t == torch::kFloat) && offs.scalar_type() == torch::kInt &&
         x.size(1) % 8 == 0 && w.size(1) % 8 == 0 && w.size(2) % 8 == 0;
}

}  // namespace
#endif

torch::Tensor grouped_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs) {
#ifdef MOETRAIN_WITH_CUDA
  if (grouped_gemm_kernel_applies(x, w, offs, /*input_grad=*/false)) return run_kernel(x, w, offs, false);
  if (aten_takes(x, w, offs)) return at::_grouped_mm(x, w.transpose(-2, -1), offs);
#endif
  return grouped_linear_reference(x, w, offs, /*input_grad=*/false);
}

torch::Tensor grouped_linear_input_grad(const torch::Tensor& dy, const torch::Tensor& w, const torch::Tensor& offs) {
#ifdef MOETRAIN_WITH_CUDA
  if (grouped_gemm_kernel_applies(dy, w, offs, /*input_grad=*/true)) return run_kernel(dy, w, offs, true);
  if (aten_takes(dy, w, offs)) return at::_grouped_mm(dy, w, offs);
#endif
  return grouped_linear_reference(dy, w, offs, /*input_grad=*/true);
}

}  // namespace moetrain
