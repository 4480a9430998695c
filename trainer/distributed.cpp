#include "trainer/distributed.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <exception>
#include <functional>
#include <iostream>
#include <map>

#include <fmt/format.h>

#if defined(MOETRAIN_WITH_GLOO) || defined(MOETRAIN_WITH_NCCL)
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#if defined(MOETRAIN_WITH_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(MOETRAIN_WITH_NCCL)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
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

std::string dist_backend(const std::string& backend, const std::string& device) {
  if (backend != "auto") return backend;
  return device == "cuda" ? "nccl" : "gloo";
}

struct PendingCollective::State {
  std::function<void()> wait;  // waits for the work and copies a staged result back
};
PendingCollective::PendingCollective() = default;
PendingCollective::PendingCollective(PendingCollective&&) noexcept = default;
PendingCollective& PendingCollective::operator=(PendingCollective&&) noexcept = default;
PendingCollective::~PendingCollective() = default;
void PendingCollective::wait() {
  if (!state_) return;
  auto s = std::move(state_);  // once: a second wait() is a no-op
  s->wait();
}

#if defined(MOETRAIN_WITH_GLOO) || defined(MOETRAIN_WITH_NCCL)

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;  // ProcessGroupGloo or ProcessGroupNCCL
  torch::Device device = torch::kCPU;         // where the collectives run: CPU (Gloo) or cuda:LOCAL_RANK (NCCL)
  std::string kind;                           // "gloo" | "nccl": new_group builds the same kind
  std::chrono::milliseconds timeout{0};
  std::string host;                           // Gloo's device hostname (MASTER_ADDR)
  int64_t rank = 0;

  // Failures (a dead or hung peer: gloo::IoException after the timeout, an NCCL error)
  // become DistErrors that say which rank saw them and during what.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
    try {
      work->wait();
    } catch (const c10::Error& e) {
      throw DistError(fmt::format("rank {}: {} failed: {}", rank, what, e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw DistError(fmt::format("rank {}: {} failed (a peer died or timed out?): {}", rank, what, e.what()));
    }
  }
  // `t` itself when the backend can use it (contiguous, on its device), else a staged copy.
  // NCCL work is ordered on the current CUDA stream after wait(), so no host sync is needed.
  torch::Tensor stage(const torch::Tensor& t) const {
    if (t.device() == device && t.is_contiguous()) return t;
    return t.to(device).contiguous();
  }
  // A c10d backend of this kind (on this device) over `st`, as rank `r` of `size`: the
  // world group's and every new_group's.
  c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& st, int64_t r,
                                                 int64_t size) const {
#if defined(MOETRAIN_WITH_GLOO)
    if (kind == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      opts->threads = 2;
      return c10::make_intrusive<c10d::ProcessGroupGloo>(st, static_cast<int>(r), static_cast<int>(size), opts);
    }
#endif
#if defined(MOETRAIN_WITH_NCCL)
    if (kind == "nccl") {
      // NCCL_* environment variables (NCCL_NVLS_ENABLE=0, ...) are NCCL's own: left as they are.
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      return c10::make_intrusive<c10d::ProcessGroupNCCL>(st, static_cast<int>(r), static_cast<int>(size), opts);
    }
#endif
    throw DistError(fmt::format("distributed.backend '{}': not built into this moetrain", kind));
  }
};

ProcessGroup::ProcessGroup(const DistEnv& env, const std::string& backend, std::chrono::seconds timeout)
    : env_(env), backend_(backend) {
  if (env.world_size == 1) return;
#if !defined(MOETRAIN_WITH_NCCL)
  if (backend == "nccl")
    throw DistError("distributed.backend nccl: this moetrain was built without NCCL (needs a CUDA LibTorch and nccl.h); "
                    "use distributed.backend=gloo");
#endif
#if !defined(MOETRAIN_WITH_GLOO)
  if (backend == "gloo")
    throw DistError("distributed.backend gloo: this moetrain was built without the gloo headers "
                    "(Debian: apt-get install libgloo-dev, then reconfigure); use distributed.backend=nccl on CUDA");
#endif
  if (backend != "gloo" && backend != "nccl")
    throw DistError(fmt::format("distributed.backend '{}': expected gloo or nccl", backend));
  impl_ = std::make_unique<Impl>();
  impl_->rank = env.rank;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(env.master_port);
    so.isServer = env.rank == 0 && !env.agent_store;
    if (so.isServer && env.master_listen_fd >= 0) so.masterListenFd = env.master_listen_fd;
    so.numWorkers = static_cast<std::size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    impl_->store = c10::make_intrusive<c10d::PrefixStore>(fmt::format("moetrain/attempt_{}", env.restart_count), tcp);
    impl_->kind = backend;
    impl_->timeout = timeout;
    impl_->host = env.master_addr;
#if defined(MOETRAIN_WITH_NCCL)
    if (backend == "nccl") {
      const int64_t n = torch::cuda::device_count();
      if (n == 0) throw DistError("distributed.backend nccl needs a CUDA device; none is visible");
      const auto index = static_cast<c10::DeviceIndex>(env.local_rank % n);
      impl_->device = torch::Device(torch::kCUDA, index);
      c10::cuda::set_device(index);  // NCCL communicators (and barrier) use the current device
    }
#endif
    impl_->backend = impl_->make_backend(impl_->store, env.rank, env.world_size);
  } catch (const DistError&) {
    throw;
  } catch (const std::exception& e) {
    throw DistError(fmt::format("rank {} of {}: cannot join the {} process group at {}:{}: {}", env.rank,
                                env.world_size, backend, env.master_addr, env.master_port, e.what()));
  }
}

void ProcessGroup::all_reduce(const std::vector<torch::Tensor>& tensors, ReduceOp op) {
  if (!impl_) return;
  c10d::AllreduceOptions ao;
  ao.reduceOp = op == ReduceOp::kMax ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  for (const auto& t : tensors) {
    torch::Tensor staged = impl_->stage(t);
    std::vector<at::Tensor> v{staged};
    impl_->wait(impl_->backend->allreduce(v, ao), "all_reduce");
    if (!staged.is_same(t)) t.copy_(staged);
  }
}

PendingCollective ProcessGroup::all_reduce_mean_async(const std::vector<torch::Tensor>& tensors) {
  PendingCollective pending;
  if (!impl_ || tensors.empty()) return pending;
  for (const auto& t : tensors)
    TORCH_CHECK(t.device() == impl_->device && t.is_contiguous() && t.scalar_type() == tensors.front().scalar_type(),
                "all_reduce_mean_async: tensors must be contiguous, of one dtype, on ", impl_->device);
  const bool nccl = impl_->kind == "nccl";
  c10d::AllreduceCoalescedOptions ao;
  ao.reduceOp = nccl ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;  // Gloo has no AVG
  std::vector<at::Tensor> v = tensors;
  c10::intrusive_ptr<c10d::Work> work = impl_->backend->allreduce_coalesced(v, ao);
  pending.state_ = std::make_unique<PendingCollective::State>();
  pending.state_->wait = [impl = impl_.get(), work, v, nccl, world = env_.world_size] {
    impl->wait(work, "all_reduce");
    if (!nccl)
      for (const auto& t : v) t.div_(static_cast<double>(world));
  };
  return pending;
}

void ProcessGroup::broadcast(const std::vector<torch::Tensor>& tensors, int64_t root) {
  if (!impl_) return;
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  for (const auto& t : tensors) {
    torch::Tensor staged = impl_->stage(t);
    std::vector<at::Tensor> v{staged};
    impl_->wait(impl_->backend->broadcast(v, bo), "broadcast");
    if (!staged.is_same(t)) t.copy_(staged);
  }
}

void ProcessGroup::barrier() {
  if (!impl_) return;
  impl_->wait(impl_->backend->barrier(), "barrier");
}

// --- sharded-optimizer collectives (ZeRO-1) --------------------------------------------

void ProcessGroup::reduce_scatter(const torch::Tensor& shard, const torch::Tensor& full) {
  TORCH_CHECK(full.numel() == shard.numel() * env_.world_size, "reduce_scatter: full has ", full.numel(),
              " elements, expected world size × ", shard.numel());
  if (!impl_) {
    shard.copy_(full.reshape(-1));
    return;
  }
  torch::Tensor in = impl_->stage(full.reshape(-1)), out = impl_->stage(shard);
  c10d::ReduceScatterOptions ro;
  ro.reduceOp = c10d::ReduceOp::SUM;
  // Both backends implement _reduce_scatter_base (reduce_scatter_tensor) on flat tensors in
  // torch 2.11 (Gloo on CPU tensors: ProcessGroupGloo.hpp declares it).
  impl_->wait(impl_->backend->_reduce_scatter_base(out, in, ro), "reduce_scatter");
  if (out.data_ptr() != shard.data_ptr()) shard.copy_(out);
}

void ProcessGroup::all_gather(const torch::Tensor& full, const torch::Tensor& shard) {
  TORCH_CHECK(full.numel() == shard.numel() * env_.world_size, "all_gather: full has ", full.numel(),
              " elements, expected world size × ", shard.numel());
  TORCH_CHECK(full.is_contiguous(), "all_gather: full must be contiguous");
  if (!impl_) {
    full.view(-1).copy_(shard.reshape(-1));
    return;
  }
  torch::Tensor in = impl_->stage(shard.reshape(-1)), out = impl_->stage(full.view(-1));
  impl_->wait(impl_->backend->_allgather_base(out, in), "all_gather");
  if (out.data_ptr() != full.data_ptr()) full.view(-1).copy_(out);
}

ProcessGroup::~ProcessGroup() {
  if (!impl_ || backend_ != "nccl") return;
  // NCCL communicators are torn down explicitly (as destroy_process_group does); while an
  // exception unwinds (a peer may be dead, pending work may never finish) they are aborted.
  try {
    if (std::uncaught_exceptions() > 0)
      impl_->backend->abort();
    else
      impl_->backend->shutdown();
  } catch (const std::exception& e) {
    std::cerr << fmt::format("rank {}: NCCL shutdown: {}\n", env_.rank, e.what());
  }
}

// --- expert parallelism: sub-groups and all-to-all ---------------------------------------

std::unique_ptr<ProcessGroup> ProcessGroup::new_group(const std::vector<int64_t>& ranks, const std::string& name) {
  auto it = std::find(ranks.begin(), ranks.end(), env_.rank);
  if (it == ranks.end()) throw DistError(fmt::format("rank {}: new_group {}: not a member", env_.rank, name));
  std::unique_ptr<ProcessGroup> g(new ProcessGroup());
  g->env_ = env_;
  g->env_.rank = it - ranks.begin();
  g->env_.world_size = static_cast<int64_t>(ranks.size());
  g->backend_ = backend_;
  if (ranks.size() == 1 || !impl_) return g;
  g->impl_ = std::make_unique<Impl>();
  g->impl_->rank = env_.rank;  // errors name the global rank
  g->impl_->device = impl_->device;
  g->impl_->kind = impl_->kind;
  g->impl_->timeout = impl_->timeout;
  g->impl_->host = impl_->host;
  try {
    // Its own c10d group of the same kind (ProcessGroupGloo / ProcessGroupNCCL) over this
    // group's store under the prefix `name`.
    g->impl_->store = c10::make_intrusive<c10d::PrefixStore>(name, impl_->store);
    g->impl_->backend = g->impl_->make_backend(g->impl_->store, g->env_.rank, g->env_.world_size);
  } catch (const DistError&) {
    throw;
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
  // Staged to the backend's device: host memory for Gloo, cuda:LOCAL_RANK for NCCL.
  torch::Tensor in = impl_->stage(input);
  torch::Tensor out = torch::empty(shape, in.options());
  std::vector<int64_t> out_splits = recv_splits, in_splits = send_splits;  // c10d wants non-const
  impl_->wait(impl_->backend->alltoall_base(out, in, out_splits, in_splits), "all_to_all");
  return out.device() == input.device() ? out : out.to(input.device());
}

#else  // built without any distributed backend: only world size 1

struct ProcessGroup::Impl {};

ProcessGroup::ProcessGroup(const DistEnv& env, const std::string& backend, std::chrono::seconds)
    : env_(env), backend_(backend) {
  if (env.world_size == 1) return;
  throw DistError(fmt::format(
      "WORLD_SIZE={} but this moetrain was built without a distributed backend (distributed.backend {}): "
      "install the gloo headers (Debian: apt-get install libgloo-dev) or build with a CUDA LibTorch and nccl.h, "
      "and reconfigure",
      env.world_size, backend));
}
void ProcessGroup::all_reduce(const std::vector<torch::Tensor>&, ReduceOp) {}
PendingCollective ProcessGroup::all_reduce_mean_async(const std::vector<torch::Tensor>&) { return {}; }
void ProcessGroup::broadcast(const std::vector<torch::Tensor>&, int64_t) {}
void ProcessGroup::barrier() {}
void ProcessGroup::reduce_scatter(const torch::Tensor& shard, const torch::Tensor& full) { shard.copy_(full.reshape(-1)); }
void ProcessGroup::all_gather(const torch::Tensor& full, const torch::Tensor& shard) { full.view(-1).copy_(shard.reshape(-1)); }
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

ProcessGroup::~ProcessGroup() = default;

#endif

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
