#include "models/kernels/grouped_wgrad.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ops/_grouped_mm.h>

#ifdef MOETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "models/kernels/grouped_wgrad_kernels.h"
#include "models/kernels/launch.h"
#endif

namespace moetrain {

torch::Tensor grouped_weight_grad_reference(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& offs) {
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0) && offs.dim() == 1,
              "grouped_weight_grad: dy [M, N], x [M, K], offs [E]; got ", dy.sizes(), ", ", x.sizes(), ", ",
              offs.sizes());
  const torch::Tensor ends = offs.to(torch::kCPU, torch::kLong);
  const int64_t groups = ends.size(0);
  const auto acc = dy.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;  // fp32 sums at least
  torch::Tensor dw = torch::zeros({groups, dy.size(1), x.size(1)}, dy.options().dtype(acc));
  int64_t start = 0;
  for (int64_t e = 0; e < groups; ++e) {
    const int64_t end = ends[e].item<int64_t>();
    TORCH_CHECK(end >= start && end <= dy.size(0), "grouped_weight_grad: offs must be non-decreasing and ≤ M");
    if (end > start)
      dw[e] = dy.narrow(0, start, end - start).to(acc).t().mm(x.narrow(0, start, end - start).to(acc));
    start = end;
  }
  return dw.to(dy.scalar_type());
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

bool kernel_enabled(bool beside_main_stream) {
  static const std::string mode = [] {
    const char* v = std::getenv("MOETRAIN_GROUPED_WGRAD");
    return std::string(v ? v : "auto");
  }();
  if (mode == "1") return true;
  if (mode == "0") return false;
  TORCH_CHECK(mode == "auto", "MOETRAIN_GROUPED_WGRAD: expected auto, 1 or 0, found '", mode, "'");
  return !beside_main_stream;
}

// One workspace per (device, stream): launches on one stream never overlap (each launch zeroes
// the counters it uses first). Grown outside graph capture only (the trainer's warm-up passes run
// first); a capture that finds it too small takes ATen's path for that call. A grown-out buffer
// is kept, since a captured graph may still hold its address. Replays use the workspace of the
// stream the graph was captured on: eager launches on that stream must not overlap a replay.
torch::Tensor workspace_for(const torch::Device& device, cudaStream_t stream, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, torch::Tensor> cache;
  static std::vector<torch::Tensor> outgrown;
  std::lock_guard<std::mutex> lock(mu);
  torch::Tensor& ws = cache[{device.index(), stream}];
  if (ws.defined() && static_cast<size_t>(ws.numel()) >= bytes) return ws;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess || status != cudaStreamCaptureStatusNone)
    return torch::Tensor();
  if (ws.defined()) outgrown.push_back(ws);
  ws = torch::empty({static_cast<int64_t>(bytes)}, torch::TensorOptions().dtype(torch::kUInt8).device(device));
  return ws;
}

}  // namespace
#endif

bool grouped_wgrad_kernel_applies(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& offs,
                                  bool beside_main_stream) {
#ifdef MOETRAIN_WITH_CUDA
  auto aligned = [](const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  return dy.is_cuda() && kernel_enabled(beside_main_stream) && x.device() == dy.device() && offs.device() == dy.device() &&
         dy.scalar_type() == torch::kBFloat16 && x.scalar_type() == torch::kBFloat16 &&
         offs.scalar_type() == torch::kInt && dy.dim() == 2 && x.dim() == 2 && offs.dim() == 1 &&
         dy.size(0) == x.size(0) && dy.size(0) > 0 && dy.size(0) < (int64_t{1} << 31) && dy.is_contiguous() &&
         x.is_contiguous() && offs.is_contiguous() && aligned(dy) && aligned(x) && dy.size(1) % 128 == 0 &&
         x.size(1) % 256 == 0 && offs.size(0) >= 1 && offs.size(0) <= 512 && kernels::grouped_wgrad_supported(dy.device().index());
#else
  (void)dy;
  (void)x;
  (void)offs;
  (void)beside_main_stream;
  return false;
#endif
}

torch::Tensor grouped_weight_grad(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& offs,
                                  bool beside_main_stream) {
#ifdef MOETRAIN_WITH_CUDA
  if (grouped_wgrad_kernel_applies(dy, x, offs, beside_main_stream)) {
    const c10::cuda::CUDAGuard on_device(dy.device());  // the launcher uses the current device
    const int64_t rows = dy.size(0), groups = offs.size(0), n = dy.size(1), k = x.size(1);
    auto stream = static_cast<cudaStream_t>(kernels::current_stream_of(dy));
    const torch::Tensor ws =
        workspace_for(dy.device(), stream, kernels::grouped_wgrad_workspace_bytes(rows, static_cast<int>(groups), n, k));
    if (ws.defined()) {
      torch::Tensor dw = torch::empty({groups, n, k}, dy.options());
      kernels::check_kernel_launch(kernels::launch_grouped_wgrad(dy.data_ptr(), x.data_ptr(), offs.data_ptr<int>(),
                                                                 dw.data_ptr(), rows, static_cast<int>(groups), n, k,
                                                                 ws.data_ptr(), stream),
                                   "grouped weight gradient");
      return dw;
    }
  }
  if (dy.is_cuda()) return at::_grouped_mm(dy.t(), x, offs);
#else
  (void)beside_main_stream;
#endif
  return grouped_weight_grad_reference(dy, x, offs);
}

}  // namespace moetrain
