#include "trainer/cuda_graph.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace moetrain {

bool cuda_graphs_available() {
#ifdef MOETRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

struct CapturedForwardBackward::State {
#ifdef MOETRAIN_WITH_CUDA
  at::cuda::CUDAGraph graph;
#endif
  StepLosses sums;  // the graph's outputs (updated in place by every replay)
  bool captured = false;
};

CapturedForwardBackward::CapturedForwardBackward(std::function<StepLosses()> fb, std::vector<torch::Tensor> params,
                                                 std::function<void()> after_warmup)
    : fb_(std::move(fb)),
      params_(std::move(params)),
      after_warmup_(std::move(after_warmup)),
      state_(std::make_unique<State>()) {
  if (!cuda_graphs_available()) throw std::runtime_error("train.cuda_graph: this build has no CUDA (MOETRAIN_CUDA)");
}

CapturedForwardBackward::~CapturedForwardBackward() = default;

bool CapturedForwardBackward::captured() const { return state_->captured; }

void CapturedForwardBackward::drop_grads() {
  for (auto& p : params_) p.mutable_grad() = torch::Tensor();
}

StepLosses CapturedForwardBackward::run() {
#ifdef MOETRAIN_WITH_CUDA
  if (!state_->captured) {
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, current.device_index());
    at::cuda::CUDAEvent before;  // the side stream starts after everything queued so far
    before.record(current);
    before.block(side);
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      // Warm-up on the capture stream: the first cuBLAS/cuBLASLt call of a stream allocates its
      // workspace, which a capture must not do.
      for (int i = 0; i < kWarmupPasses; ++i) {
        drop_grads();
        fb_();
      }
      if (after_warmup_) after_warmup_();
      drop_grads();  // the captured backward allocates the gradients in the graph's pool
      // The warm-up's activations are cached blocks of the side stream that the graph's private
      // pool cannot reuse: give them back first (else the step holds its activations twice).
      c10::cuda::CUDACachingAllocator::emptyCache();
      state_->graph.capture_begin();
      state_->sums = fb_();
      state_->graph.capture_end();
    }
    at::cuda::CUDAEvent after;
    after.record(side);
    after.block(current);
    state_->captured = true;
  }
  state_->graph.replay();
  return state_->sums;
#else
  return fb_();
#endif
}

}  // namespace moetrain
