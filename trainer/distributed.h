// defines: DistEnv, DistError, ReduceOp, ProcessGroup — the data-parallel
// plumbing of the trainer: who am I (the torchrun variables) and the blocking
// collectives the training loop needs.
//
// The environment is torchrun's (and `moetrain launch`'s): RANK, WORLD_SIZE,
// LOCAL_RANK, MASTER_ADDR, MASTER_PORT. None set = one process. ProcessGroup
// wraps c10d (TCPStore rendezvous hosted by rank 0 + ProcessGroupGloo); the c10d
// headers stay in distributed.cpp. With world size 1 every collective is a no-op
// and no c10d object exists, so single-process training pays nothing.
// Gloo needs the gloo headers at build time (Debian's libgloo-dev; CMake defines
// MOETRAIN_WITH_GLOO when it finds them); NCCL is not wired in yet.
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

  // Reads the torchrun variables; unset ones keep the single-process defaults.
  // Throws DistError on a malformed or inconsistent value (WORLD_SIZE=abc, RANK >= WORLD_SIZE).
  static DistEnv from_env();
  bool distributed() const { return world_size > 1; }
};

enum class ReduceOp { kSum, kMax };

class ProcessGroup {
 public:
  // backend: auto | gloo | nccl (auto = gloo; nccl is refused until it is built in).
  // Blocks until all world_size ranks joined (or timeout). World size 1: nothing happens.
  ProcessGroup(const DistEnv& env, const std::string& backend, std::chrono::seconds timeout);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int64_t rank() const { return env_.rank; }
  int64_t world_size() const { return env_.world_size; }
  bool is_main() const { return env_.rank == 0; }

  // In place, on every rank; each tensor is reduced on its own (any dtype, any device:
  // non-CPU tensors are staged through host memory for Gloo).
  void all_reduce(const std::vector<torch::Tensor>& tensors, ReduceOp op = ReduceOp::kSum);
  void all_reduce(const torch::Tensor& tensor, ReduceOp op = ReduceOp::kSum) { all_reduce(std::vector{tensor}, op); }
  // Every rank's tensors become root's.
  void broadcast(const std::vector<torch::Tensor>& tensors, int64_t root = 0);
  void barrier();

  // Data-parallel gradient averaging: grads of the same dtype are flattened into
  // buckets of about bucket_bytes, each summed with one all-reduce, divided by the
  // world size and copied back. A parameter whose gradient is undefined on some
  // ranks (an expert no token reached there) counts as zeros there; one undefined
  // on every rank stays undefined, as in a single process (AdamW skips it).
  void average_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes = 25 << 20);

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
  std::unique_ptr<Impl> impl_;  // null when world_size == 1
};

}  // namespace moetrain
