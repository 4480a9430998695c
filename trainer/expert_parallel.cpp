#include "trainer/expert_parallel.h"

#include "trainer/optim.h"

#include <cmath>

#include <unistd.h>

#include <fmt/format.h>

#include "models/moe.h"

namespace moetrain {

namespace {

// The all-to-all as an autograd node: its backward is the reverse all-to-all.
struct AllToAllRows : torch::autograd::Function<AllToAllRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, ProcessGroup* group,
                               const std::vector<int64_t>& send_splits, const std::vector<int64_t>& recv_splits) {
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);  // outlives the graph (ExpertParallel owns it)
    ctx->saved_data["send"] = send_splits;
    ctx->saved_data["recv"] = recv_splits;
    ctx->saved_data["like"] = torch::empty({0}, x.options());
    ctx->saved_data["shape"] = x.sizes().vec();
    return group->all_to_all(x, send_splits, recv_splits);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* group = reinterpret_cast<ProcessGroup*>(ctx->saved_data["group"].toInt());
    const std::vector<int64_t> send = ctx->saved_data["send"].toIntVector(), recv = ctx->saved_data["recv"].toIntVector();
    torch::Tensor g = grads[0];
    if (!g.defined()) {  // an unused output: zeros, since every rank must take part in the exchange
      std::vector<int64_t> shape = ctx->saved_data["shape"].toIntVector();
      shape[0] = 0;
      for (int64_t n : recv) shape[0] += n;
      g = torch::zeros(shape, ctx->saved_data["like"].toTensor().options());
    }
    return {group->all_to_all(g, /*send_splits=*/recv, /*recv_splits=*/send), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

// Rows gathered by a permutation: forward x[index], backward grad[inverse] (a gather again,
// not index_select's scatter-add into zeros). x: [M, ...], index / inverse: [M] int64.
struct PermuteRows : torch::autograd::Function<PermuteRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& index, const torch::Tensor& inverse) {
    ctx->saved_data["inverse"] = inverse;
    return x.index_select(0, index);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::Tensor& g = grads[0];
    return {g.defined() ? g.index_select(0, ctx->saved_data["inverse"].toTensor()) : torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

// The c10d dispatcher: an all-to-all of the counts, then of the rows, inside the EP group.
// Host syncs: one read of the [2, ep, E_local] send / receive counts per dispatch (c10d's
// all-to-all takes host split sizes); the counts exchange, the regroup indices and both
// directions of the backward stay on the rows' device.
class C10dExpertDispatcher : public ExpertDispatcher {
 public:
  explicit C10dExpertDispatcher(ProcessGroup& group) : group_(group) {}
  int64_t size() const override { return group_.world_size(); }
  int64_t index() const override { return group_.rank(); }

  ExpertDispatch dispatch(const torch::Tensor& rows, const torch::Tensor& counts) override {
    const int64_t n = size(), e_local = counts.size(0) / n;
    const torch::Tensor send_counts = counts.to(torch::kLong).reshape({n, e_local});  // [dest, e], on the device
    // recv_counts[s, e]: rows of local expert e that source s sends; one all-to-all of e_local
    // counts per rank, on the counts' device (NCCL: the GPU; Gloo stages CUDA through the host)
    const std::vector<int64_t> equal(static_cast<size_t>(n), e_local);
    const torch::Tensor recv_counts = group_.all_to_all(send_counts.flatten(), equal, equal).view({n, e_local});
    // the one host read: the split sizes of the rows' all-to-all, both directions at once
    const torch::Tensor host = torch::stack({send_counts, recv_counts}).sum(2).to(torch::kCPU).contiguous();  // [2, n]
    const int64_t* h = host.data_ptr<int64_t>();
    ExpertDispatch d;
    d.send_splits.assign(h, h + n);
    d.recv_splits.assign(h + n, h + 2 * n);
    int64_t m_local = 0;
    for (int64_t r : d.recv_splits) m_local += r;
    const torch::Tensor received = ep_all_to_all(group_, rows, d.send_splits, d.recv_splits);  // source-major
    const EpRegroup g = ep_regroup(recv_counts, m_local);
    d.regroup = g.regroup;
    d.restore = g.restore;
    d.rows = PermuteRows::apply(received, d.regroup, d.restore);  // local-expert-major
    d.counts = recv_counts.sum(0);                                // [E_local], on the device
    return d;
  }

  torch::Tensor combine(const torch::Tensor& out, const ExpertDispatch& d) override {
    const torch::Tensor source_major = PermuteRows::apply(out, d.restore, d.regroup);
    return ep_all_to_all(group_, source_major, /*send_splits=*/d.recv_splits, /*recv_splits=*/d.send_splits);
  }

 private:
  ProcessGroup& group_;
};

}  // namespace

torch::Tensor ep_all_to_all(ProcessGroup& group, const torch::Tensor& x, const std::vector<int64_t>& send_splits,
                            const std::vector<int64_t>& recv_splits) {
  return AllToAllRows::apply(x, &group, send_splits, recv_splits);
}

EpRegroup ep_regroup(const torch::Tensor& recv_counts, int64_t total) {
  const int64_t n = recv_counts.size(0), e_local = recv_counts.size(1);
  const torch::Tensor c = recv_counts.to(torch::kLong).contiguous();  // [S, E] block sizes, source-major
  const torch::Tensor ct = c.t().contiguous();                        // [E, S] the same, expert-major
  // exclusive prefix sums: where block (s, e) starts among the received rows and among the local rows
  const torch::Tensor src_start = (c.flatten().cumsum(0) - c.flatten()).view({n, e_local});    // [S, E]
  const torch::Tensor dst_start = (ct.flatten().cumsum(0) - ct.flatten()).view({e_local, n});  // [E, S]
  // row k of block (s, e) is received row src_start + k and local row dst_start + k: each
  // index is arange plus its block's shift, repeated over the block (output_size given: no sync)
  const torch::Tensor iota = torch::arange(total, c.options());
  const torch::Tensor shift = dst_start.t() - src_start;  // [S, E]
  EpRegroup g;
  g.regroup = iota - shift.t().flatten().repeat_interleave(ct.flatten(), /*dim=*/0, /*output_size=*/total);
  g.restore = iota + shift.flatten().repeat_interleave(c.flatten(), /*dim=*/0, /*output_size=*/total);
  return g;
}

bool ep_is_expert_param(const std::string& name) {
  for (const char* w : {".experts.w13", ".experts.w2"}) {
    const size_t n = std::char_traits<char>::length(w);
    if (name.size() >= n && name.compare(name.size() - n, n, w) == 0) return true;
  }
  return false;
}

ExpertParallel::ExpertParallel(ProcessGroup& world, int64_t ep_size) : world_(world), ep_size_(ep_size) {
  const int64_t w = world.world_size(), r = world.rank();
  if (ep_size < 1 || w % ep_size != 0)
    throw DistError(fmt::format("distributed.ep_size {} must divide the world size {}", ep_size, w));
  // EP groups first, then EDP groups, in the same order on every rank (Gloo connects per group)
  std::vector<int64_t> ep_ranks, edp_ranks;
  for (int64_t i = 0; i < ep_size; ++i) ep_ranks.push_back(r / ep_size * ep_size + i);
  for (int64_t i = r % ep_size; i < w; i += ep_size) edp_ranks.push_back(i);
  ep_ = world.new_group(ep_ranks, fmt::format("ep_{}/", r / ep_size));
  edp_ = world.new_group(edp_ranks, fmt::format("edp_{}/", r % ep_size));
  if (enabled()) {
    torch::Tensor job = torch::tensor({static_cast<int64_t>(::getpid())}, torch::kInt64);
    world.broadcast({job}, 0);
    job_ = job.item<int64_t>();
  }
}

ExpertParallel::~ExpertParallel() = default;

void ExpertParallel::shard(Transformer& model) {
  n_experts_ = model->cfg.n_routed_experts;
  if (enabled()) {
    auto dispatcher = std::make_shared<C10dExpertDispatcher>(*ep_);
    for (const auto& m : model->modules(/*include_self=*/false))
      if (auto* moe = m->as<MoEImpl>()) moe->shard_experts(dispatcher);
  }
  dense_.clear();
  experts_.clear();
  for (const auto& p : model->named_parameters())
    (enabled() && ep_is_expert_param(p.key()) ? experts_ : dense_).push_back(p.value());
}

ExpertShard ExpertParallel::expert_shard() const {
  if (!enabled()) return {};
  const int64_t per = n_experts_ / ep_size_;
  return ExpertShard{index() * per, per};
}

void ExpertParallel::broadcast_model(Transformer& model) {
  if (world_.world_size() == 1) return;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> replicated, sharded;
  for (const auto& p : model->named_parameters())
    (enabled() && ep_is_expert_param(p.key()) ? sharded : replicated).push_back(p.value());
  for (const auto& b : model->buffers()) replicated.push_back(b);
  world_.broadcast(replicated, /*root=*/0);
  edp_->broadcast(sharded, /*root=*/0);
}

void ExpertParallel::reduce_gradients() {
  world_.average_gradients(dense_);
  reduce_expert_gradients();
}

void ExpertParallel::reduce_expert_gradients() {
  if (!enabled()) return;
  for (auto& p : experts_)
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
  edp_->average_gradients(experts_);  // sum / (W / ep) ...
  std::vector<torch::Tensor> grads;
  for (auto& p : experts_) grads.push_back(p.grad());
  at::_foreach_div_(grads, static_cast<double>(ep_size_));  // ... / ep = sum / W
}

namespace {

// The defined gradients of `params`.
std::vector<torch::Tensor> grads_of(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad().detach());
  return grads;
}

// Sum of the squared gradient norms (optim.h's grad_squares_sum), a 0-dim fp64 tensor on
// `device`, no host sync.
torch::Tensor squared_norm(const std::vector<torch::Tensor>& params, torch::Device device) {
  const std::vector<torch::Tensor> grads = grads_of(params);
  if (grads.empty()) return torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  return grad_squares_sum(grads).to(device, torch::kDouble);
}

}  // namespace

torch::Tensor ExpertParallel::grad_norm() {
  const torch::Device device = dense_.empty() ? torch::Device(torch::kCPU) : dense_.front().device();
  torch::Tensor sq = squared_norm(dense_, device);  // replicated ones once
  if (enabled()) {
    torch::Tensor expert_sq = squared_norm(experts_, device);
    ep_->all_reduce(expert_sq, ReduceOp::kSum);  // every expert shard once (in place on the device under NCCL)
    sq = sq + expert_sq;
  }
  return sq.sqrt();
}

std::string ExpertParallel::save_checkpoint(const ExperimentConfig& cfg, Transformer& model,
                                            torch::optim::AdamW& optimizer, const TrainingState& state) {
  const std::string tmp = checkpoint_temp_dir(cfg.checkpoint.dir, state.step, job_);
  std::string dir;
  if (world_.is_main()) begin_checkpoint(cfg.checkpoint.dir, tmp);
  world_.barrier();  // the directory exists
  if (edp_->rank() == 0) save_expert_shard(tmp, model, optimizer, expert_shard());
  world_.barrier();  // every shard is written and synced
  if (world_.is_main()) dir = ::moetrain::save_checkpoint(cfg, model, optimizer, state, expert_shard(), job_);
  world_.barrier();  // committed: nobody runs ahead (or exits) before
  return dir.empty() ? cfg.checkpoint.dir + "/" + checkpoint_dir_name(state.step) : dir;
}

}  // namespace moetrain
