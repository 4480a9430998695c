// defines: GradNormTracker, norm_in_backward_enabled — the global gradient norm for clipping,
// summed during the last backward of a step as each parameter's gradient becomes final, on a
// side CUDA stream beside the backward's own kernels.
//
// After the backward, ExpertParallel::grad_norm reads every gradient once more (2.5 GB at
// bench-1b, 0.55 ms alone on the GPU, between the backward and AdamW). An experiment, off by
// default (norm_in_backward_enabled): measured, the step did not get faster (bench/NOTES.md 57).
// Here a hook after each parameter's gradient accumulation (the GradReducer's hook point)
// queues that gradient's per-chunk Σ g² (models/kernels/sum_squares.h) on a side stream, into
// the parameter's slice of one fp32 buffer laid out as sum_of_squares_fused lays out its
// partials; finish() joins the side stream and adds the buffer. Same chunks, same order: with
// every gradient defined the result is bit-equal to ExpertParallel::grad_norm's. What it saves
// is the pass over the gradients after the backward; what is left there is the last
// gradients' share (the first layers', the embedding's) and one small sum.
//
// Armed (prepare()) for the last micro-step's backward only: a gradient is final after that
// backward's accumulation into it. A hook that runs twice for one parameter in that backward
// (a parameter used twice in a nested backward) queues its sum again after the second
// accumulation, which overwrites the first. A parameter with a gradient that the armed
// backward did not touch (earlier micro-steps only) is summed in finish(); one without a
// gradient counts as zeros. Each gradient read on the side stream is held until finish()
// joins it, so the allocator cannot reuse its memory during the backward (after the join the
// current stream is past the read; later work forks from it).
//
// Under CUDA-graph capture (trainer/cuda_graph.h) the side-stream work is captured as a fork
// and join of the graph; the buffer lives outside the graph's pool and the norm is one of the
// graph's outputs. One process only: under data parallelism the norm is that of the averaged
// gradients, which exist after the reduction, and a parameter takes one post-accumulation hook
// (GradReducer's). The norm stays on the device: no host sync.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <torch/torch.h>

namespace moetrain {

// MOETRAIN_NORM_IN_BACKWARD=1: the trainer and the bench use a GradNormTracker on CUDA in one
// process; unset or "0": the norm after the backward, the default — the step measured no faster
// with the tracker (bench/NOTES.md 57: the side stream's reads delay the persistent GEMMs as
// much as they save). Read once.
bool norm_in_backward_enabled();

class GradNormTracker;

// A tracker over `params` where it applies: CUDA parameters, one process (no data, expert or
// ZeRO parallelism: one_process), norm_in_backward_enabled(); null otherwise.
std::unique_ptr<GradNormTracker> norm_tracker_for(const std::vector<torch::Tensor>& params, bool one_process);

class GradNormTracker {
 public:
  // Hooks every parameter of `params` (all on one device; a parameter takes one
  // post-accumulation hook: one already hooked, e.g. by a GradReducer, is refused). The order
  // is the order of the chunks in the buffer: pass ExpertParallel's replicated_params() for
  // results bit-equal to its grad_norm().
  explicit GradNormTracker(const std::vector<torch::Tensor>& params);
  ~GradNormTracker();  // removes the hooks
  GradNormTracker(const GradNormTracker&) = delete;
  GradNormTracker& operator=(const GradNormTracker&) = delete;

  // The next backward is the last of this step: zero the buffer (on the current stream, after
  // any side-stream sum left by a backward that threw before finish()) and sum each gradient
  // as it becomes final.
  void prepare();
  // After that backward: sums what the hooks did not, joins the side stream into the current
  // one, -> ‖g‖₂ over all gradients, a 0-dim fp64 tensor on the parameters' device.
  torch::Tensor finish();

  // Hook runs of the last armed backward (tests: every parameter's sum was queued there).
  int64_t summed_in_backward();

 private:
  struct Hook;
  struct Slot {
    torch::Tensor param;
    torch::Tensor partials;  // its chunks' slice of buffer_
    bool summed = false;     // queued by the armed backward
  };
  struct Streams;  // CUDA: the side stream and the gradients it reads

  void on_gradient(size_t slot);
  void sum_slot(Slot& s);  // on the current stream
  void join_side_stream();  // the current stream waits for the side stream; its reads released

  std::vector<Slot> slots_;
  torch::Tensor buffer_;  // fp32 [Σ chunks] on the parameters' device
  std::unique_ptr<Streams> streams_;
  std::mutex mutex_;  // hooks run on the autograd engine's device thread
  bool armed_ = false;
  int64_t summed_in_backward_ = 0;
};

}  // namespace moetrain
