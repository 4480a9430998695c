#include "models/weight_grad_stream.h"

#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#ifdef MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace moetrain {

bool weight_grad_overlap(bool for_experts) {
#ifdef MOETRAIN_WITH_CUDA
  static const std::string mode = [] {
    const char* v = std::getenv("MOETRAIN_WGRAD_STREAM");
    return std::string(v ? v : "1");
  }();
  return mode == "1" || mode == (for_experts ? "experts" : "linear");
#else
  (void)for_experts;
  return false;
#endif
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

// One side stream per device, never the caller's stream (a graph capture runs on a pool stream,
// which the pool may hand out again).
c10::cuda::CUDAStream side_stream_for(const c10::cuda::CUDAStream& current) {
  static std::mutex mu;
  static std::vector<std::optional<c10::cuda::CUDAStream>> streams;
  std::lock_guard<std::mutex> lock(mu);
  const auto dev = static_cast<size_t>(current.device_index());
  if (streams.size() <= dev) streams.resize(dev + 1);
  while (!streams[dev] || *streams[dev] == current)
    streams[dev] = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, current.device_index());
  return *streams[dev];
}

}  // namespace

struct WeightGradOverlap::State {
  c10::cuda::CUDAStream main, side;
  bool forked = false;
};

WeightGradOverlap::WeightGradOverlap(const torch::Device& device, bool enabled) {
  if (!device.is_cuda() || !enabled) return;
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(device.index());
  state_ = std::make_unique<State>(State{main, side_stream_for(main)});
}

torch::Tensor WeightGradOverlap::run(const std::function<torch::Tensor()>& f) {
  fork();
  return run_forked(f);
}

void WeightGradOverlap::fork() {
  if (!state_) return;
  at::cuda::CUDAEvent fork;  // the side stream starts after everything queued on main so far
  fork.record(state_->main);
  fork.block(state_->side);
  state_->forked = true;
}

torch::Tensor WeightGradOverlap::run_forked(const std::function<torch::Tensor()>& f) {
  if (!state_) return f();
  TORCH_CHECK(state_->forked, "WeightGradOverlap::run_forked: fork() first");
  c10::cuda::CUDAStreamGuard on_side(state_->side);
  return f();
}

void WeightGradOverlap::join() {
  if (!state_ || !state_->forked) return;
  at::cuda::CUDAEvent done;
  done.record(state_->side);
  done.block(state_->main);
  state_->forked = false;
}

#else

struct WeightGradOverlap::State {};
WeightGradOverlap::WeightGradOverlap(const torch::Device&, bool) {}
torch::Tensor WeightGradOverlap::run(const std::function<torch::Tensor()>& f) { return f(); }
void WeightGradOverlap::fork() {}
torch::Tensor WeightGradOverlap::run_forked(const std::function<torch::Tensor()>& f) { return f(); }
void WeightGradOverlap::join() {}

#endif

std::pair<torch::Tensor, torch::Tensor> WeightGradOverlap::beside(const std::function<torch::Tensor()>& side,
                                                                  const std::function<torch::Tensor()>& current) {
  fork();
  torch::Tensor c = current();
  return {run_forked(side), c};
}

WeightGradOverlap::~WeightGradOverlap() {
  try {
    join();
  } catch (...) {  // a destructor must not throw; join() fails only if the CUDA context is gone
  }
}

}  // namespace moetrain
