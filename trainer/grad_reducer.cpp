#include "trainer/grad_reducer.h"

#include <stdexcept>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace moetrain {

// Runs after the parameter's AccumulateGrad, with the parameter (its .grad complete for
// this backward), on the autograd engine's thread for the parameter's device.
struct GradReducer::Hook : torch::autograd::PostAccumulateGradHook {
  Hook(GradReducer* reducer, size_t slot) : reducer(reducer), slot(slot) {}
  void operator()(const torch::autograd::Variable& param) override { reducer->on_gradient(slot, param); }
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
    int64_t& open = open_bucket[static_cast<size_t>(p.scalar_type())];
    if (open >= 0) {
      const Bucket& b = buckets_[static_cast<size_t>(open)];
      if ((b.numel + p.numel()) * static_cast<int64_t>(p.element_size()) > bucket_bytes) open = -1;  // full
    }
    if (open < 0) {
      open = static_cast<int64_t>(buckets_.size());
      buckets_.emplace_back();
      buckets_.back().dtype = p.scalar_type();
    }
    Bucket& b = buckets_[static_cast<size_t>(open)];
    Slot s;
    s.param = p;
    s.bucket = static_cast<size_t>(open);
    s.offset = b.numel;
    s.numel = p.numel();
    b.numel += p.numel();
    b.slots.push_back(slots_.size());
    slots_.push_back(std::move(s));
  }
  for (size_t i = 0; i < slots_.size(); ++i)
    torch::autograd::impl::set_post_acc_grad_hooks(slots_[i].param, std::make_unique<Hook>(this, i));
}

GradReducer::~GradReducer() {
  for (const Slot& s : slots_) torch::autograd::impl::set_post_acc_grad_hooks(s.param, nullptr);
}

void GradReducer::prepare() {
  if (slots_.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  for (Bucket& b : buckets_) {
    if (!b.flat.defined())
      b.flat = torch::empty({b.numel}, slots_[b.slots.front()].param.options().dtype(b.dtype));
    b.pending = b.slots.size();
    b.started = b.dirty = false;
  }
  for (Slot& s : slots_) {
    s.ready = false;
    // Gradients zeroed in place are still last step's bucket slices: an accumulation into
    // them would race with the bucket's next all-reduce.
    torch::Tensor g = s.param.grad();
    if (g.defined() && g.is_alias_of(buckets_[s.bucket].flat)) s.param.mutable_grad() = g.clone();
  }
  next_ = 0;
  overlapped_ = 0;
  armed_ = true;
}

void GradReducer::copy_in(Slot& s) {
  torch::NoGradGuard no_grad;
  torch::Tensor dst = buckets_[s.bucket].flat.narrow(0, s.offset, s.numel).view(s.param.sizes());
  const torch::Tensor& g = s.param.grad();
  if (!g.defined()) {
    dst.zero_();
    return;
  }
  // Divided before the sum (as DDP does): one pass, and exact for power-of-two world sizes.
  torch::mul_out(dst, g, torch::scalar_tensor(1.0 / static_cast<double>(pg_.world_size()), torch::kDouble));
}

void GradReducer::on_gradient(size_t slot, const torch::Tensor& param) {
  (void)param;  // slots_[slot].param is the same tensor
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;  // not the last micro-step's backward (or not a training step)
  Slot& s = slots_[slot];
  Bucket& b = buckets_[s.bucket];
  if (b.started) {  // accumulated again after its all-reduce started: finish() redoes the bucket
    b.dirty = true;
    return;
  }
  copy_in(s);  // again if it accumulated twice before the start: the slice holds the total
  if (s.ready) return;
  s.ready = true;
  if (--b.pending == 0) {
    const size_t before = next_;
    start_ready_buckets();
    overlapped_ += static_cast<int64_t>(next_ - before);
  }
}

void GradReducer::start(Bucket& b) {
  b.started = true;
  b.work = pg_.all_reduce_async(b.flat);
}

void GradReducer::start_ready_buckets() {
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) start(buckets_[next_++]);
}

void GradReducer::finish() {
  if (slots_.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);  // the backward is over: no hook runs now
  if (!armed_) throw std::logic_error("GradReducer::finish without prepare");
  armed_ = false;
  // Gradients the armed backward did not produce: an earlier micro-step's (copied in) or none
  // (zeros). Their buckets have not started (a bucket starts when all its slots are ready).
  for (Slot& s : slots_)
    if (!s.ready) copy_in(s);
  for (; next_ < buckets_.size(); ++next_) start(buckets_[next_]);

  // Agreed over the ranks (MAX), after every bucket started so the collectives keep one
  // order everywhere: which parameters had a gradient anywhere, which buckets must be redone.
  const int64_t n = static_cast<int64_t>(slots_.size()), nb = static_cast<int64_t>(buckets_.size());
  torch::Tensor flags = torch::zeros({n + nb}, torch::kUInt8);
  auto* f = flags.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) f[i] = slots_[static_cast<size_t>(i)].param.grad().defined() ? 1 : 0;
  for (int64_t j = 0; j < nb; ++j) f[n + j] = buckets_[static_cast<size_t>(j)].dirty ? 1 : 0;
  pg_.all_reduce(flags, ReduceOp::kMax);  // the host sync
  for (Bucket& b : buckets_) b.work.wait();
  for (int64_t j = 0; j < nb; ++j) {
    if (!f[n + j]) continue;
    Bucket& b = buckets_[static_cast<size_t>(j)];
    for (size_t i : b.slots) copy_in(slots_[i]);
    pg_.all_reduce(b.flat);
  }
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < n; ++i) {
    Slot& s = slots_[static_cast<size_t>(i)];
    if (!f[i]) continue;
    // The slice as a plain tensor sharing the bucket's storage, not an autograd view:
    // Optimizer::zero_grad detach_()es gradients, which views refuse.
    const torch::Tensor slice = buckets_[s.bucket].flat.narrow(0, s.offset, s.numel).view(s.param.sizes());
    torch::Tensor g = torch::empty({0}, slice.options());
    g.set_(slice.storage(), slice.storage_offset(), slice.sizes(), slice.strides());
    s.param.mutable_grad() = g;
  }
}

}  // namespace moetrain
