// defines: GradReducer — data-parallel gradient averaging overlapped with the backward pass
// (what DDP's Reducer does, torch/csrc/distributed/c10d/reducer.cpp, cut to moetrain's needs).
//
// The parameters are packed, in reverse registration order (about the order in which the
// backward produces their gradients), into flat buckets of one dtype of about bucket_bytes.
// Armed for the last backward of a step (prepare()), a hook that runs after each parameter's
// gradient accumulation copies the gradient, divided by the world size, into its bucket;
// when a bucket is complete its all-reduce starts while the backward goes on. Buckets start
// in index order, the same on every rank, as collectives on one group must. finish() starts
// what is left, waits, and points every .grad at its slice of the averaged bucket.
//
// The result equals ProcessGroup::average_gradients: a gradient missing on some ranks (an
// expert no token reached there) counts as zeros there; one missing on every rank stays
// undefined (AdamW skips it), as in a single process. Deciding that is finish()'s one host
// sync: a MAX all-reduce of "had a gradient" flags, after every bucket started.
// A gradient that accumulates again after its bucket started (a second accumulation in the
// same backward, e.g. a nested backward of reentrant checkpointing touching a parameter also
// used outside it) marks the bucket, which finish() reduces again, so the result stays exact.
//
// Memory: the buckets are one more copy of the gradients while the backward runs (DDP's
// default, gradient_as_bucket_view=False); after finish() the gradients ARE bucket slices.
// Zeroing the gradients by setting them to none (Module::zero_grad's default) frees the
// step's own gradient tensors; zeroing in place works too (prepare() unties them first).
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
  struct Slot {  // one parameter's place in its bucket
    torch::Tensor param;
    size_t bucket = 0;
    int64_t offset = 0, numel = 0;
    bool ready = false;  // its gradient was copied in during this step's armed backward
  };
  struct Bucket {
    std::vector<size_t> slots;
    torch::ScalarType dtype;
    int64_t numel = 0;
    torch::Tensor flat;  // [numel], allocated at the first prepare()
    size_t pending = 0;  // slots not ready yet
    bool started = false, dirty = false;
    PendingCollective work;
  };

  void on_gradient(size_t slot, const torch::Tensor& param);  // the hook's body
  void copy_in(Slot& s);                                       // the gradient / world → its bucket slice
  void start_ready_buckets();                                  // in order, while complete
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
