// defines: GradReducer — data-parallel gradient averaging overlapped with the backward pass
// (what DDP's Reducer does, torch/csrc/distributed/c10d/reducer.cpp, cut to moetrain's needs).
//
// The parameters are grouped, in reverse registration order (about the order in which the
// backward produces their gradients), into buckets of one dtype of about bucket_bytes of
// gradients. Armed for the last backward of a step (prepare()), a hook that runs after each
// parameter's gradient accumulation marks it ready; when every gradient of a bucket is ready,
// one grouped all-reduce averages them in place (ProcessGroup::all_reduce_mean_async: NCCL's
// AVG over the gradient tensors themselves: no copy into a flat buffer, no division pass, no
// memory beyond the gradients) while the backward goes on. Buckets start in the order of
// their last gradient (so a bucket of one dtype spanning the whole model, like the fp32
// norm weights among bf16 matrices, does not hold back the others), the same on every rank,
// as collectives on one group must. finish() starts the rest and waits.
//
// The result equals ProcessGroup::average_gradients: a gradient missing on some ranks (an
// expert no token reached there) counts as zeros there; one missing on every rank stays
// undefined (AdamW skips it), as in a single process. Deciding that is finish()'s one host
// sync: a MAX all-reduce of "had a gradient" flags, after every bucket started.
// A gradient that would accumulate again after its bucket started (a parameter used both
// inside and outside a nested backward, e.g. reentrant checkpointing of a module it is
// shared with) is refused with an error, as DDP refuses it: its all-reduce reads that very
// tensor. No moetrain model does this; distributed.overlap_grad_reduce: false reduces after
// the backward instead.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <torch/torch.h>

#include "trainer/distributed.h"

namespace moetrain {

class GradReducer {
 public:
  // Hooks every parameter in `params` (all must require grad and live on one device). With
  // world size 1 nothing is hooked and prepare()/finish() do nothing.
  GradReducer(const std::vector<torch::Tensor>& params, ProcessGroup& pg, int64_t bucket_bytes = 25 << 20);
  ~GradReducer();  // removes the hooks
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // The next backward is the last of this step: reduce gradients as they become ready.
  void prepare();
  // After that backward: reduces what is left, waits; .grad = the average over the ranks.
  void finish();

  int64_t bucket_count() const { return static_cast<int64_t>(buckets_.size()); }
  // Buckets whose all-reduce started during the backward (before finish()) in the last step:
  // how much of the communication could overlap.
  int64_t overlapped_buckets() const { return overlapped_; }

 private:
  struct Hook;
  struct Slot {  // one parameter
    torch::Tensor param;
    size_t bucket = 0;
    bool ready = false;   // its gradient is complete (the armed backward accumulated it)
    bool filled = false;  // no gradient on this rank: zeros stand in for the all-reduce
  };
  struct Bucket {
    std::vector<size_t> slots;
    int64_t bytes = 0;
    size_t pending = 0;  // slots not ready yet
    bool started = false;
    PendingCollective work;
  };

  void on_gradient(size_t slot);  // the hook's body
  void start_ready_buckets();     // in order, while complete
  void start(Bucket& b);

  ProcessGroup& pg_;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  size_t next_ = 0;  // the next bucket to start
  bool armed_ = false;
  int64_t overlapped_ = 0;
  std::mutex mutex_;  // the hooks run on the autograd engine's device thread
};

}  // namespace moetrain
