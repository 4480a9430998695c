#include "trainer/optimizer_overlap.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace moetrain {

#ifdef MOETRAIN_WITH_CUDA
namespace {
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("OptimizerOverlap: ") + what + ": " + cudaGetErrorString(err));
}
}  // namespace

struct OptimizerOverlap::State {
  c10::cuda::CUDAStream side;
  std::vector<cudaEvent_t> stage_done;  // one per stage, re-recorded by every update
  cudaEvent_t begin = nullptr;          // the main stream's point the update starts from
  explicit State(c10::cuda::CUDAStream s) : side(s) {}
};
#else
struct OptimizerOverlap::State {};
#endif

OptimizerOverlap::OptimizerOverlap(TransformerImpl& model) : model_(&model) {
#ifdef MOETRAIN_WITH_CUDA
  const torch::Device device = model.embed->weight.device();
  if (!device.is_cuda()) throw std::runtime_error("train.overlap_optimizer: the model is not on a CUDA device");
  const int64_t L = model.cfg.num_hidden_layers;
  stages_ = L + 1;
  for (const auto& p : model.embed->parameters()) stage_[p.unsafeGetTensorImpl()] = 0;
  for (int64_t i = 0; i < L; ++i)
    for (const auto& p : model.layers[static_cast<size_t>(i)]->parameters()) stage_[p.unsafeGetTensorImpl()] = i;
  // the same priority as the main stream: measured against a low one (bench/NOTES.md)
  state_ = std::make_unique<State>(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
  c10::cuda::CUDAGuard on_device(device);
  state_->stage_done.resize(static_cast<size_t>(stages_));
  for (auto& e : state_->stage_done) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
  check(cudaEventCreateWithFlags(&state_->begin, cudaEventDisableTiming), "event");
  model.before_stage = [this](int64_t s) { wait_stage(s); };
#else
  throw std::runtime_error("train.overlap_optimizer: this build has no CUDA (MOETRAIN_CUDA)");
#endif
}

OptimizerOverlap::~OptimizerOverlap() {
  model_->before_stage = nullptr;
#ifdef MOETRAIN_WITH_CUDA
  if (!state_) return;
  join();  // nothing queued may outlive the events
  for (auto& e : state_->stage_done) cudaEventDestroy(e);
  cudaEventDestroy(state_->begin);
#endif
}

int64_t OptimizerOverlap::stage_of(const torch::Tensor& p) const {
  auto it = stage_.find(p.unsafeGetTensorImpl());
  return it == stage_.end() ? stages_ - 1 : it->second;
}

void OptimizerOverlap::update(const std::vector<torch::Tensor>& used, const std::function<void()>& launch) {
#ifdef MOETRAIN_WITH_CUDA
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream(state_->side.device_index());
  check(cudaEventRecord(state_->begin, main.stream()), "record");
  // The host waits for the main stream first (the trainer already has, reading the gradient
  // norm): no queued forward may still wait on the stage events this update re-records, so
  // which record a captured wait node binds to (at launch or when it runs) cannot matter.
  check(cudaEventSynchronize(state_->begin), "synchronize");
  check(cudaStreamWaitEvent(state_->side.stream(), state_->begin, 0), "wait");
  for (const auto& t : used)
    if (t.defined() && t.is_cuda()) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), state_->side);
  c10::cuda::CUDAStreamGuard on_side(state_->side);
  launch();
#else
  (void)used, (void)launch;
#endif
}

void OptimizerOverlap::finish_stage(int64_t s) {
#ifdef MOETRAIN_WITH_CUDA
  TORCH_CHECK(s >= 0 && s < stages_, "OptimizerOverlap: stage ", s, " of ", stages_);
  check(cudaEventRecord(state_->stage_done[static_cast<size_t>(s)], state_->side.stream()), "record");
#else
  (void)s;
#endif
}

void OptimizerOverlap::wait_stage(int64_t s) const {
#ifdef MOETRAIN_WITH_CUDA
  TORCH_CHECK(s >= 0 && s < stages_, "OptimizerOverlap: stage ", s, " of ", stages_);
  const cudaStream_t main = c10::cuda::getCurrentCUDAStream(state_->side.device_index()).stream();
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(main, &capturing), "capture status");
  // in a capture, an external wait node: each replay waits for the event's latest record
  // (a plain wait would make the event's record part of the graph, which it is not)
  const unsigned flags = capturing == cudaStreamCaptureStatusActive ? cudaEventWaitExternal : cudaEventWaitDefault;
  check(cudaStreamWaitEvent(main, state_->stage_done[static_cast<size_t>(s)], flags), "wait");
#else
  (void)s;
#endif
}

void OptimizerOverlap::join() const {
  // the last stage is finished last: waiting for it waits for the whole update
  if (stages_ > 0) wait_stage(stages_ - 1);
}

}  // namespace moetrain
