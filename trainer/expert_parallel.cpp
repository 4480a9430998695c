#include "trainer/expert_parallel.h"

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

// The c10d dispatcher: an all-to-all of the counts, then of the rows, inside the EP group.
class C10dExpertDispatcher : public ExpertDispatcher {
 public:
  explicit C10dExpertDispatcher(ProcessGroup& group) : group_(group) {}
  int64_t size() const override { return group_.world_size(); }
  int64_t index() const override { return group_.rank(); }

  ExpertDispatch dispatch(const torch::Tensor& rows, const torch::Tensor& counts) override {
    const int64_t n = size(), e_local = counts.size(0) / n;
    const torch::Tensor c = counts.to(torch::kCPU, torch::kLong).contiguous().view({n, e_local});  // [dest, e]
    // recv_counts[s, e]: rows of local expert e that source s sends (split sizes first)
    const std::vector<int64_t> equal(static_cast<size_t>(n), e_local);
    const torch::Tensor recv_counts = group_.all_to_all(c.flatten(), equal, equal).view({n, e_local});
    ExpertDispatch d;
    const torch::Tensor send = c.sum(1), recv = recv_counts.sum(1);
    d.send_splits.assign(send.data_ptr<int64_t>(), send.data_ptr<int64_t>() + n);
    d.recv_splits.assign(recv.data_ptr<int64_t>(), recv.data_ptr<int64_t>() + n);
    const torch::Tensor received = ep_all_to_all(group_, rows, d.send_splits, d.recv_splits);  // source-major
    // regroup source-major rows (s, e) into local-expert-major (e, s), stable within a source
    const torch::Tensor labels = torch::arange(e_local, torch::kLong).repeat({n}).repeat_interleave(recv_counts.flatten());
    d.regroup = torch::argsort(labels, /*stable=*/true).to(rows.device());
    d.rows = received.index_select(0, d.regroup);
    d.counts = recv_counts.sum(0).to(counts.device());
    return d;
  }

  torch::Tensor combine(const torch::Tensor& out, const ExpertDispatch& d) override {
    const torch::Tensor source_major = out.index_select(0, torch::argsort(d.regroup));
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

bool ep_is_expert_param(const std::string& name) {
  for (const char* w : {".experts.w1", ".experts.w2", ".experts.w3"}) {
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
  if (!enabled()) return;
  for (auto& p : experts_)
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
  edp_->average_gradients(experts_);  // sum / (W / ep) ...
  for (auto& p : experts_) p.grad().div_(static_cast<double>(ep_size_));  // ... / ep = sum / W
}

double ExpertParallel::clip_grad_norm(double max_norm) {
  std::vector<torch::Tensor> all = dense_;
  all.insert(all.end(), experts_.begin(), experts_.end());
  if (!enabled()) return torch::nn::utils::clip_grad_norm_(all, max_norm);
  // squared norms: replicated ones once, the expert shards summed over the EP group
  auto sq = [](const std::vector<torch::Tensor>& ps) {
    torch::Tensor s = torch::zeros({}, torch::kFloat64);
    for (const auto& p : ps)
      if (p.grad().defined()) s += p.grad().detach().to(torch::kFloat64).pow(2).sum().to(torch::kCPU);
    return s;
  };
  torch::Tensor expert_sq = sq(experts_);
  ep_->all_reduce(expert_sq, ReduceOp::kSum);
  const double norm = std::sqrt((sq(dense_) + expert_sq).item<double>());
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    torch::NoGradGuard no_grad;
    for (auto& p : all)
      if (p.grad().defined()) p.grad().mul_(coef);
  }
  return norm;
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
