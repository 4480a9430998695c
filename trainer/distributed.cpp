#include "trainer/distributed.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>

#include <fmt/format.h>

#if defined(MOETRAIN_WITH_GLOO)
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

namespace moetrain {

namespace {

// An integer environment variable in [lo, hi]; `fallback` when unset.
int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (!v) return fallback;
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*v == '\0' || *end != '\0' || errno == ERANGE)
    throw DistError(fmt::format("environment variable {}='{}' is not an integer", name, v));
  if (x < lo || x > hi)
    throw DistError(fmt::format("environment variable {}={} is out of range [{}, {}]", name, x, lo, hi));
  return x;
}

}  // namespace

DistEnv DistEnv::from_env() {
  DistEnv e;
  e.world_size = env_int("WORLD_SIZE", 1, 1, 1 << 20);
  e.rank = env_int("RANK", 0, 0, 1 << 20);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0, 1 << 20);
  e.master_port = env_int("MASTER_PORT", e.master_port, 1, 65535);
  if (const char* a = std::getenv("MASTER_ADDR")) {
    if (*a == '\0') throw DistError("environment variable MASTER_ADDR is empty");
    e.master_addr = a;
  }
  if (const char* a = std::getenv("TORCHELASTIC_USE_AGENT_STORE")) e.agent_store = std::string(a) == "True";
  e.restart_count = env_int("TORCHELASTIC_RESTART_COUNT", 0, 0, 1 << 30);
  if (e.rank >= e.world_size)
    throw DistError(fmt::format("environment: RANK={} must be below WORLD_SIZE={}", e.rank, e.world_size));
  return e;
}

#if defined(MOETRAIN_WITH_GLOO)

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
  c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> opts;  // new_group reuses them
  int64_t rank = 0;

  // Gloo failures (a dead or hung peer: gloo::IoException after the timeout) become
  // DistErrors that say which rank saw them and during what.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
    try {
      work->wait();
    } catch (const c10::Error& e) {
      throw DistError(fmt::format("rank {}: {} failed: {}", rank, what, e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw DistError(fmt::format("rank {}: {} failed (a peer died or timed out?): {}", rank, what, e.what()));
    }
  }
};

ProcessGroup::ProcessGroup(const DistEnv& env, const std::string& backend, std::chrono::seconds timeout) : env_(env) {
  if (env.world_size == 1) return;
  if (backend == "nccl")
    throw DistError("distributed.backend nccl: this moetrain was built without NCCL; use distributed.backend=gloo");
  impl_ = std::make_unique<Impl>();
  impl_->rank = env.rank;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(env.master_port);
    so.isServer = env.rank == 0 && !env.agent_store;
    so.numWorkers = static_cast<std::size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    impl_->store = c10::make_intrusive<c10d::PrefixStore>(fmt::format("moetrain/attempt_{}", env.restart_count), tcp);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(env.master_addr));
    opts->threads = 2;
    impl_->opts = opts;
    impl_->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, static_cast<int>(env.rank),
                                                              static_cast<int>(env.world_size), opts);
  } catch (const std::exception& e) {
    throw DistError(fmt::format("rank {} of {}: cannot join the process group at {}:{}: {}", env.rank, env.world_size,
                                env.master_addr, env.master_port, e.what()));
  }
}

void ProcessGroup::all_reduce(const std::vector<torch::Tensor>& tensors, ReduceOp op) {
  if (!impl_) return;
  c10d::AllreduceOptions ao;
  ao.reduceOp = op == ReduceOp::kMax ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  for (const auto& t : tensors) {
    // Gloo wants contiguous host tensors: stage anything else and copy the result back.
    torch::Tensor host = t.device().is_cpu() && t.is_contiguous() ? t : t.to(torch::kCPU).contiguous();
    std::vector<at::Tensor> v{host};
    impl_->wait(impl_->gloo->allreduce(v, ao), "all_reduce");
    if (!host.is_same(t)) t.copy_(host);
  }
}

void ProcessGroup::broadcast(const std::vector<torch::Tensor>& tensors, int64_t root) {
  if (!impl_) return;
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  for (const auto& t : tensors) {
    torch::Tensor host = t.device().is_cpu() && t.is_contiguous() ? t : t.to(torch::kCPU).contiguous();
    std::vector<at::Tensor> v{host};
    impl_->wait(impl_->gloo->broadcast(v, bo), "broadcast");
    if (!host.is_same(t)) t.copy_(host);
  }
}

void ProcessGroup::barrier() {
  if (!impl_) return;
  impl_->wait(impl_->gloo->barrier(), "barrier");
}

// --- expert parallelism: sub-groups and all-to-all ---------------------------------------

std::unique_ptr<ProcessGroup> ProcessGroup::new_group(const std::vector<int64_t>& ranks, const std::string& name) {
  auto it = std::find(ranks.begin(), ranks.end(), env_.rank);
  if (it == ranks.end()) throw DistError(fmt::format("rank {}: new_group {}: not a member", env_.rank, name));
  std::unique_ptr<ProcessGroup> g(new ProcessGroup());
  g->env_ = env_;
  g->env_.rank = it - ranks.begin();
  g->env_.world_size = static_cast<int64_t>(ranks.size());
  if (ranks.size() == 1 || !impl_) return g;
  g->impl_ = std::make_unique<Impl>();
  g->impl_->rank = env_.rank;  // errors name the global rank
  g->impl_->opts = impl_->opts;
  try {
    g->impl_->store = c10::make_intrusive<c10d::PrefixStore>(name, impl_->store);
    g->impl_->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        g->impl_->store, static_cast<int>(g->env_.rank), static_cast<int>(ranks.size()), impl_->opts);
  } catch (const std::exception& e) {
    throw DistError(fmt::format("rank {}: cannot create process group {}: {}", env_.rank, name, e.what()));
  }
  return g;
}

torch::Tensor ProcessGroup::all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                                       const std::vector<int64_t>& recv_splits) {
  if (!impl_) return input.clone();
  int64_t rows = 0;
  for (int64_t n : recv_splits) rows += n;
  std::vector<int64_t> shape = input.sizes().vec();
  shape[0] = rows;
  torch::Tensor in = input.to(torch::kCPU).contiguous();
  torch::Tensor out = torch::empty(shape, in.options());
  std::vector<int64_t> out_splits = recv_splits, in_splits = send_splits;  // c10d wants non-const
  impl_->wait(impl_->gloo->alltoall_base(out, in, out_splits, in_splits), "all_to_all");
  return out.to(input.device());
}

#else  // built without Gloo: only world size 1

struct ProcessGroup::Impl {};

ProcessGroup::ProcessGroup(const DistEnv& env, const std::string& backend, std::chrono::seconds) : env_(env) {
  if (env.world_size == 1) return;
  throw DistError(fmt::format(
      "WORLD_SIZE={} but this moetrain was built without a distributed backend (distributed.backend {}): "
      "install the gloo headers (Debian: apt-get install libgloo-dev) and reconfigure",
      env.world_size, backend));
}
void ProcessGroup::all_reduce(const std::vector<torch::Tensor>&, ReduceOp) {}
void ProcessGroup::broadcast(const std::vector<torch::Tensor>&, int64_t) {}
void ProcessGroup::barrier() {}
std::unique_ptr<ProcessGroup> ProcessGroup::new_group(const std::vector<int64_t>& ranks, const std::string&) {
  std::unique_ptr<ProcessGroup> g(new ProcessGroup());
  g->env_ = env_;
  g->env_.rank = 0;
  g->env_.world_size = static_cast<int64_t>(ranks.size());
  return g;
}
torch::Tensor ProcessGroup::all_to_all(const torch::Tensor& input, const std::vector<int64_t>&,
                                       const std::vector<int64_t>&) {
  return input.clone();
}

#endif

ProcessGroup::~ProcessGroup() = default;

void ProcessGroup::average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (!impl_) return;
  // Which parameters have a gradient on any rank: those are averaged (zeros where missing).
  auto has = torch::zeros({static_cast<int64_t>(params.size())}, torch::kUInt8);
  auto* h = has.data_ptr<uint8_t>();
  for (size_t i = 0; i < params.size(); ++i) h[i] = params[i].grad().defined() ? 1 : 0;
  all_reduce(has, ReduceOp::kMax);
  std::vector<torch::Tensor> grads;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!h[i]) continue;
    torch::Tensor p = params[i];
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    grads.push_back(p.grad());
  }
  // Buckets per dtype in parameter order (the same order on every rank).
  std::map<c10::ScalarType, std::vector<torch::Tensor>> by_dtype;
  for (const auto& g : grads) by_dtype[g.scalar_type()].push_back(g);
  for (auto& [dtype, list] : by_dtype) {
    size_t begin = 0;
    while (begin < list.size()) {
      size_t end = begin;
      size_t bytes = 0;
      while (end < list.size() && (end == begin || bytes + list[end].nbytes() <= static_cast<size_t>(bucket_bytes)))
        bytes += list[end++].nbytes();
      std::vector<torch::Tensor> flat;
      for (size_t i = begin; i < end; ++i) flat.push_back(list[i].reshape(-1));
      torch::Tensor bucket = torch::cat(flat);
      all_reduce(bucket, ReduceOp::kSum);
      bucket.div_(static_cast<double>(env_.world_size));
      int64_t off = 0;
      for (size_t i = begin; i < end; ++i) {
        const int64_t n = list[i].numel();
        list[i].copy_(bucket.slice(0, off, off + n).view_as(list[i]));
        off += n;
      }
      begin = end;
    }
  }
}

}  // namespace moetrain
