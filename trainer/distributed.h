// defines: DistEnv, DistError, ReduceOp, ProcessGroup — the data-parallel
// plumbing of the trainer: who am I (the torchrun variables) and the blocking
// collectives the training loop needs.
//
// The environment is torchrun's (and `moetrain launch`'s): RANK, WORLD_SIZE,
// LOCAL_RANK, MASTER_ADDR, MASTER_PORT. None set = one process. ProcessGroup
// wraps c10d (TCPStore rendezvous hosted by rank 0 + ProcessGroupGloo or
// ProcessGroupNCCL); the c10d headers stay in distributed.cpp. With world size 1
// every collective is a no-op and no c10d object exists, so single-process
// training pays nothing.
// Each backend is optional at build time: Gloo needs the gloo headers (Debian's
// libgloo-dev; CMake defines MOETRAIN_WITH_GLOO), NCCL a CUDA LibTorch and nccl.h
// (the wheel's nvidia-nccl package; MOETRAIN_WITH_NCCL). Gloo runs on host tensors
// (device tensors are staged through host memory); NCCL on the CUDA tensors of the
// rank's device, cuda:LOCAL_RANK (host tensors are staged through it).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace moetrain {

// Bad launch environment or a failed collective (the message names the rank).
class DistError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct DistEnv {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  // Under torchrun the elastic agent already hosts the TCPStore at MASTER_PORT
  // (TORCHELASTIC_USE_AGENT_STORE=True): every rank joins it as a client, under a key
  // prefix per restart (TORCHELASTIC_RESTART_COUNT) so a restarted job never reads stale keys.
  bool agent_store = false;
  int64_t restart_count = 0;
  // A socket already listening on master_port that rank 0's store takes over (-1: rank 0 binds
  // master_port itself). In-process tests hold their port this way from the moment they pick
  // it, so no other test's store or connection can take it in between.
  int master_listen_fd = -1;

  // Reads the torchrun variables; unset ones keep the single-process defaults.
  // Throws DistError on a malformed or inconsistent value (WORLD_SIZE=abc, RANK >= WORLD_SIZE).
  static DistEnv from_env();
  bool distributed() const { return world_size > 1; }
};

enum class ReduceOp { kSum, kMax };

// A collective in flight (ProcessGroup::all_reduce_async). wait() makes its result visible to
// what follows: with NCCL it orders the current CUDA stream after the collective (no host
// wait), with Gloo it blocks until the collective is done. Move-only; an empty one (world
// size 1) is already done.
class PendingCollective {
 public:
  PendingCollective();
  PendingCollective(PendingCollective&&) noexcept;
  PendingCollective& operator=(PendingCollective&&) noexcept;
  ~PendingCollective();
  void wait();

 private:
  friend class ProcessGroup;
  struct State;
  std::unique_ptr<State> state_;
};

// distributed.backend → the backend to build: auto = nccl when train.device is cuda, else gloo.
std::string dist_backend(const std::string& backend, const std::string& device);

class ProcessGroup {
 public:
  // backend: gloo | nccl (resolve "auto" with dist_backend first). NCCL uses (and makes
  // current) cuda:(LOCAL_RANK mod the visible devices). A backend this moetrain was built
  // without is a DistError. Blocks until all world_size ranks joined (or timeout).
  // World size 1: nothing happens.
  ProcessGroup(const DistEnv& env, const std::string& backend, std::chrono::seconds timeout);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int64_t rank() const { return env_.rank; }
  const std::string& backend() const { return backend_; }
  int64_t world_size() const { return env_.world_size; }
  bool is_main() const { return env_.rank == 0; }

  // In place, on every rank; each tensor is reduced on its own (any dtype, any device:
  // non-CPU tensors are staged through host memory for Gloo).
  void all_reduce(const std::vector<torch::Tensor>& tensors, ReduceOp op = ReduceOp::kSum);
  void all_reduce(const torch::Tensor& tensor, ReduceOp op = ReduceOp::kSum) { all_reduce(std::vector{tensor}, op); }
  // Starts averaging `tensors` (contiguous, one dtype, on the backend's device) over the ranks
  // in place and returns at once (the backward goes on while it runs: trainer/grad_reducer.h);
  // they must stay alive and untouched until wait(). NCCL: one grouped call with ncclAvg (no
  // pass of ours over the data); Gloo: one coalesced SUM, divided by the world size at wait().
  PendingCollective all_reduce_mean_async(const std::vector<torch::Tensor>& tensors);
  // Every rank's tensors become root's.
  void broadcast(const std::vector<torch::Tensor>& tensors, int64_t root = 0);
  void barrier();

  // Data-parallel gradient averaging: grads of the same dtype are flattened into
  // buckets of about bucket_bytes, each summed with one all-reduce, divided by the
  // world size and copied back. A parameter whose gradient is undefined on some
  // ranks (an expert no token reached there) counts as zeros there; one undefined
  // on every rank stays undefined, as in a single process (AdamW skips it).
  void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = 25 << 20);

  // --- sharded-optimizer collectives (ZeRO-1, trainer/zero.h) ------------------------
  // Flat, contiguous tensors of one dtype, equal chunks per rank (rank r owns elements
  // [r·n, (r+1)·n) of the full tensor, n = shard.numel()). World size 1: a copy.
  // reduce_scatter: shard = chunk `rank` of the SUM over ranks of `full` (full.numel() = world·n).
  void reduce_scatter(const torch::Tensor& shard, const torch::Tensor& full);
  // all_gather: full = the ranks' shards concatenated in rank order.
  void all_gather(const torch::Tensor& full, const torch::Tensor& shard);
  // --- end of the sharded-optimizer collectives --------------------------------------
  // --- expert parallelism (trainer/expert_parallel.h) ------------------------------------
  // A sub-group of this group's ranks `ranks` (ascending), which every one of them, and only
  // they, must create, in the same order of new_group calls on every rank: a c10d group of
  // its own over this group's store under the prefix `name` (unique per group). Its rank()
  // is this process's index in `ranks`; with one member it is a no-op group.
  std::unique_ptr<ProcessGroup> new_group(const std::vector<int64_t>& ranks, const std::string& name);
  // Rows along dim 0: send_splits[r] consecutive rows of `input` go to rank r and
  // recv_splits[r] rows come from it, in rank order -> [sum recv_splits, ...] (c10d
  // alltoall_base; non-CPU tensors are staged through host memory for Gloo). Not
  // differentiable (trainer/expert_parallel.h wraps it). World size 1: a copy of input.
  torch::Tensor all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_splits,
                           const std::vector<int64_t>& recv_splits);

 private:
  ProcessGroup() = default;  // new_group's
  struct Impl;
  DistEnv env_;
  std::string backend_;
  std::unique_ptr<Impl> impl_;  // null when world_size == 1
};

}  // namespace moetrain
