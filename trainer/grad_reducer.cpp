#include "trainer/grad_reducer.h"

#include <algorithm>
#include <iostream>
#include <stdexcept>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "trainer/post_acc_hooks.h"

namespace moetrain {

// Runs after the parameter's AccumulateGrad (its .grad complete for this backward), on the
// autograd engine's thread for the parameter's device.
struct GradReducer::Hook : torch::autograd::PostAccumulateGradHook {
  Hook(GradReducer* reducer, size_t slot) : reducer(reducer), slot(slot) {}
  void operator()(const torch::autograd::Variable&) override { reducer->on_gradient(slot); }
  GradReducer* reducer;
  size_t slot;
};

GradReducer::GradReducer(const std::vector<torch::Tensor>& params, ProcessGroup& pg, int64_t bucket_bytes) : pg_(pg) {
  if (pg.world_size() == 1) return;
  // Reverse registration order: the first layers' gradients come last in the backward.
  std::vector<int64_t> open_bucket(static_cast<size_t>(torch::ScalarType::NumOptions), -1);  // per dtype
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    const torch::Tensor& p = *it;
    TORCH_CHECK(p.requires_grad(), "GradReducer: every parameter must require grad");
    TORCH_CHECK(slots_.empty() || p.device() == slots_.front().param.device(), "GradReducer: parameters on ",
                p.device(), " and ", slots_.front().param.device());
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    int64_t& open = open_bucket[static_cast<size_t>(p.scalar_type())];
    if (open >= 0 && buckets_[static_cast<size_t>(open)].bytes + bytes > bucket_bytes) open = -1;  // full
    if (open < 0) {
      open = static_cast<int64_t>(buckets_.size());
      buckets_.emplace_back();
    }
    Bucket& b = buckets_[static_cast<size_t>(open)];
    b.bytes += bytes;
    b.slots.push_back(slots_.size());
    Slot s;
    s.param = p;
    s.bucket = static_cast<size_t>(open);
    slots_.push_back(std::move(s));
  }
  // Start order: by each bucket's last gradient in the backward (its highest slot). Index
  // order alone would let a bucket of a sparse dtype (the fp32 norm weights among bf16
  // matrices: one bucket from the last layer to the first) hold back every bucket after it
  // until the backward ends. The same on every rank: it depends on the parameters only.
  std::vector<size_t> order(buckets_.size());
  for (size_t b = 0; b < order.size(); ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return buckets_[a].slots.back() < buckets_[b].slots.back(); });
  std::vector<Bucket> sorted;
  for (size_t b : order) sorted.push_back(std::move(buckets_[b]));
  buckets_ = std::move(sorted);
  for (size_t b = 0; b < buckets_.size(); ++b)
    for (size_t slot : buckets_[b].slots) slots_[slot].bucket = b;
  std::vector<torch::Tensor> hooked;  // in slot order
  for (const Slot& s : slots_) hooked.push_back(s.param);
  install_post_acc_grad_hooks(hooked, "GradReducer", [this](size_t i) { return std::make_unique<Hook>(this, i); });
}

GradReducer::~GradReducer() {
  for (const Slot& s : slots_) torch::autograd::impl::set_post_acc_grad_hooks(s.param, nullptr);
  // A bucket started without finish() (its backward threw): its all-reduce writes into the
  // gradients in place, so it must end before they can be freed.
  for (Bucket& b : buckets_) {
    try {
      b.work.wait();  // a no-op for one never started or already waited for
    } catch (const std::exception& e) {
      std::cerr << "GradReducer: an unfinished all-reduce failed: " << e.what() << "\n";
    }
  }
}

void GradReducer::prepare() {
  if (slots_.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  for (Bucket& b : buckets_) {
    b.pending = b.slots.size();
    b.started = false;
  }
  for (Slot& s : slots_) s.ready = s.filled = false;
  next_ = 0;
  overlapped_ = 0;
  armed_ = true;
}

void GradReducer::on_gradient(size_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;  // not the last micro-step's backward (or not a training step)
  Slot& s = slots_[slot];
  Bucket& b = buckets_[s.bucket];
  if (b.started)
    throw std::runtime_error(fmt::format(
        "GradReducer: the gradient of a parameter of shape [{}] accumulated again after its bucket's all-reduce "
        "started (a parameter shared between a nested backward, e.g. reentrant checkpointing, and the rest of "
        "the graph?); set distributed.overlap_grad_reduce: false",
        fmt::join(s.param.sizes(), ", ")));
  if (s.ready) return;  // a second accumulation before the start: the gradient holds the total
  s.ready = true;
  if (--b.pending == 0) {
    const size_t before = next_;
    start_ready_buckets();
    overlapped_ += static_cast<int64_t>(next_ - before);
  }
}

void GradReducer::start(Bucket& b) {
  b.started = true;
  std::vector<torch::Tensor> grads;
  for (size_t i : b.slots) grads.push_back(slots_[i].param.grad());
  b.work = pg_.all_reduce_mean_async(grads);
}

void GradReducer::start_ready_buckets() {
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) start(buckets_[next_++]);
}

void GradReducer::finish() {
  if (slots_.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);  // the backward is over: no hook runs now
  if (!armed_) throw std::logic_error("GradReducer::finish without prepare");
  armed_ = false;
  // Gradients the armed backward did not produce: an earlier micro-step's (reduced as they
  // are) or none (zeros stand in). Their buckets have not started: a bucket starts when all
  // its slots are ready.
  torch::NoGradGuard no_grad;
  for (Slot& s : slots_) {
    if (s.ready || s.param.grad().defined()) continue;
    s.param.mutable_grad() = torch::zeros_like(s.param);
    s.filled = true;
  }
  for (; next_ < buckets_.size(); ++next_) start(buckets_[next_]);

  // Which parameters had a gradient on any rank, agreed (MAX) after every bucket started so
  // the collectives keep one order everywhere.
  const int64_t n = static_cast<int64_t>(slots_.size());
  torch::Tensor had = torch::zeros({n}, torch::kUInt8);
  auto* h = had.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) h[i] = slots_[static_cast<size_t>(i)].filled ? 0 : 1;
  pg_.all_reduce(had, ReduceOp::kMax);  // the host sync
  for (Bucket& b : buckets_) b.work.wait();
  for (int64_t i = 0; i < n; ++i)
    if (!h[i]) slots_[static_cast<size_t>(i)].param.mutable_grad() = torch::Tensor();  // missing everywhere
}

}  // namespace moetrain
