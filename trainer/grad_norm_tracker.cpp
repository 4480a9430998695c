#include "trainer/grad_norm_tracker.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#ifdef MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "models/kernels/sum_squares.h"
#include "trainer/post_acc_hooks.h"

namespace moetrain {

bool norm_in_backward_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOETRAIN_NORM_IN_BACKWARD");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

std::unique_ptr<GradNormTracker> norm_tracker_for(const std::vector<torch::Tensor>& params, bool one_process) {
  if (!norm_in_backward_enabled() || !one_process || params.empty() || !params.front().is_cuda()) return nullptr;
  return std::make_unique<GradNormTracker>(params);
}

struct GradNormTracker::Hook : torch::autograd::PostAccumulateGradHook {
  Hook(GradNormTracker* tracker, size_t slot) : tracker(tracker), slot(slot) {}
  void operator()(const torch::autograd::Variable&) override { tracker->on_gradient(slot); }
  GradNormTracker* tracker;
  size_t slot;
};

struct GradNormTracker::Streams {
#ifdef MOETRAIN_WITH_CUDA
  // A pool stream of the greatest priority: never the capture stream (the default pool, or
  // priority −1 under MOETRAIN_GRAPH_PRIORITY=nodes) or the weight-gradient side stream (the
  // default pool), and its short blocks take SMs as they free up.
  explicit Streams(c10::DeviceIndex device) : side(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)) {}
  c10::cuda::CUDAStream side;
  std::vector<torch::Tensor> held;  // gradients read on the side stream and not yet joined
#endif
};

GradNormTracker::GradNormTracker(const std::vector<torch::Tensor>& params) {
  if (params.empty()) throw std::invalid_argument("GradNormTracker: no parameters");
  const torch::Device device = params.front().device();
  int64_t chunks = 0;
  std::vector<int64_t> first;
  for (const auto& p : params) {
    if (!p.requires_grad()) throw std::invalid_argument("GradNormTracker: every parameter must require grad");
    if (p.device() != device) throw std::invalid_argument("GradNormTracker: parameters on more than one device");
    first.push_back(chunks);
    chunks += sum_of_squares_chunk_count(p.numel());
  }
  buffer_ = torch::zeros({std::max<int64_t>(chunks, 1)}, torch::TensorOptions().dtype(torch::kFloat).device(device));
  for (size_t i = 0; i < params.size(); ++i) {
    Slot s;
    s.param = params[i];
    s.partials = buffer_.narrow(0, first[i], sum_of_squares_chunk_count(params[i].numel()));
    slots_.push_back(std::move(s));
  }
#ifdef MOETRAIN_WITH_CUDA
  if (device.is_cuda()) streams_ = std::make_unique<Streams>(device.index());
#endif
  install_post_acc_grad_hooks(params, "GradNormTracker", [this](size_t i) { return std::make_unique<Hook>(this, i); });
}

GradNormTracker::~GradNormTracker() {
  for (size_t i = 0; i < slots_.size(); ++i) {  // only the hooks that are still this tracker's
    const auto* hook = dynamic_cast<const Hook*>(torch::autograd::impl::post_acc_grad_hooks(slots_[i].param).get());
    if (hook != nullptr && hook->tracker == this) torch::autograd::impl::set_post_acc_grad_hooks(slots_[i].param, nullptr);
  }
}

int64_t GradNormTracker::summed_in_backward() {
  std::lock_guard<std::mutex> lock(mutex_);
  return summed_in_backward_;
}

void GradNormTracker::join_side_stream() {
#ifdef MOETRAIN_WITH_CUDA
  // Nothing queued there since the last join: nothing to wait for (and under graph capture the
  // side stream is not part of the capture until a hook forks it).
  if (!streams_ || streams_->held.empty()) return;
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(buffer_.device().index());
  at::cuda::CUDAEvent join;
  join.record(streams_->side);
  join.block(current);
  streams_->held.clear();  // after the join: the current stream is past every read
#endif
}

void GradNormTracker::prepare() {
  std::lock_guard<std::mutex> lock(mutex_);
  torch::NoGradGuard no_grad;
  join_side_stream();  // a backward that threw before finish() may have left sums queued
  buffer_.zero_();     // on the current stream: every side-stream sum forks after it
  for (Slot& s : slots_) s.summed = false;
  summed_in_backward_ = 0;
  armed_ = true;
}

void GradNormTracker::sum_slot(Slot& s) {
  torch::NoGradGuard no_grad;
  sum_of_squares_chunks_into(s.param.grad(), s.partials);
}

void GradNormTracker::on_gradient(size_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;  // not the last micro-step's backward (or not a training step)
  Slot& s = slots_[slot];
  if (!s.param.grad().defined()) return;
  s.summed = true;
  ++summed_in_backward_;
#ifdef MOETRAIN_WITH_CUDA
  if (streams_) {
    // the side stream starts after everything queued so far on the stream that accumulated it
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(s.param.device().index());
    at::cuda::CUDAEvent fork;
    fork.record(current);
    fork.block(streams_->side);
    streams_->held.push_back(s.param.grad());
    c10::cuda::CUDAStreamGuard on_side(streams_->side);
    sum_slot(s);
    return;
  }
#endif
  sum_slot(s);
}

torch::Tensor GradNormTracker::finish() {
  std::lock_guard<std::mutex> lock(mutex_);  // the backward is over: no hook runs now
  if (!armed_) throw std::logic_error("GradNormTracker::finish without prepare");
  armed_ = false;
  torch::NoGradGuard no_grad;
  for (Slot& s : slots_)  // gradients of earlier micro-steps only; none: zeros
    if (!s.summed && s.param.grad().defined()) sum_slot(s);
  join_side_stream();
  // as ExpertParallel::grad_norm: the fp32 sum of the partials, its root in fp64
  return buffer_.sum().to(torch::kDouble).sqrt();
}

}  // namespace moetrain
