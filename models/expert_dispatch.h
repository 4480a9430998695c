// defines: ExpertDispatch, ExpertDispatcher, LocalExpertDispatcher — where the MoE
// layer's expert-sorted rows are computed. models/ holds only this interface and the
// single-process default; expert parallelism over c10d implements it in
// trainer/expert_parallel.h (an all-to-all of the rows to the ranks that own their
// experts, and back), so the model code stays single-device.
//
// Contract: the routed experts are split into size() equal contiguous shards; this
// process holds shard index() = experts [index()·E/size(), (index()+1)·E/size()).
// dispatch() takes this process's rows sorted by GLOBAL expert (counts [E]) and returns
// the rows its own experts must run, grouped by LOCAL expert (counts [E/size()]);
// combine() takes the experts' outputs in that order and returns them in the order of
// dispatch()'s input. Both are differentiable in the rows.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

namespace moetrain {

struct ExpertDispatch {
  torch::Tensor rows;    // [M_local, D] rows of this process's experts, grouped by local expert
  torch::Tensor counts;  // [E_local] int64 rows per local expert
  // What combine() needs to send the outputs back (unused by the local dispatcher):
  std::vector<int64_t> send_splits;  // rows this process sent to each shard
  std::vector<int64_t> recv_splits;  // rows it received from each shard
  torch::Tensor regroup;             // [M_local] int64: received row (source-major) of each local row
  torch::Tensor restore;             // [M_local] int64: its inverse, local row of each received row
};

class ExpertDispatcher {
 public:
  virtual ~ExpertDispatcher() = default;
  virtual int64_t size() const = 0;   // expert shards (expert-parallel ranks)
  virtual int64_t index() const = 0;  // the shard this process holds
  // rows: [M, D] sorted by global expert, counts: [E] int64 (sum M)
  virtual ExpertDispatch dispatch(const torch::Tensor& rows, const torch::Tensor& counts) = 0;
  // out: [M_local, D] the local experts' outputs for d.rows -> [M, D] in dispatch()'s input order
  virtual torch::Tensor combine(const torch::Tensor& out, const ExpertDispatch& d) = 0;
};

// One process holds every expert: dispatch and combine pass the rows through.
class LocalExpertDispatcher : public ExpertDispatcher {
 public:
  int64_t size() const override { return 1; }
  int64_t index() const override { return 0; }
  ExpertDispatch dispatch(const torch::Tensor& rows, const torch::Tensor& counts) override {
    ExpertDispatch d;
    d.rows = rows;
    d.counts = counts;
    return d;
  }
  torch::Tensor combine(const torch::Tensor& out, const ExpertDispatch&) override { return out; }
};

}  // namespace moetrain
