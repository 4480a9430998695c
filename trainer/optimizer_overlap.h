// defines: OptimizerOverlap — train.overlap_optimizer: step t's optimizer update queued on a
// side stream, layer by layer, so it runs beside step t+1's forward instead of before it.
//
// Why: the fused master-weight AdamW reads and writes ≈ 20 bytes a parameter (≈ 6 ms on an
// H200 for bench-1b's 1.26B parameters) and ran alone on the GPU between two steps. Only layer
// i's forward needs layer i's new weights, so the update is cut into stages in the model's
// order and the forward waits for each stage just before it uses it (stage events; inside a
// captured step they become external event-wait nodes, so every replay waits for the update
// queued before it). The update of the embedding and layer 0 goes first; what is left of the
// update overlaps the forward's GEMMs.
//
// Stages of a Transformer with L decoder layers: 0 = the embedding and layer 0, i = layer i,
// L = the rest (final norm, head, MTP modules). The fp32 norm weights (all of them, tiny) are
// stepped in stage 0. Before anything other than the next forward reads the parameters
// (evaluation, checkpoints, the final sample) the caller joins. The gradients and the clip
// divisor the update reads are held for the side stream (the caching allocator's
// record_stream), so freeing them on the main stream cannot hand their memory out early.
// CUDA builds only; with no CUDA the constructor throws.
#pragma once

#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include <torch/torch.h>

#include "models/transformer.h"

namespace moetrain {

class OptimizerOverlap {
 public:
  // The stages of `model` (on a CUDA device); also sets model.before_stage to wait for them.
  explicit OptimizerOverlap(TransformerImpl& model);
  ~OptimizerOverlap();
  OptimizerOverlap(const OptimizerOverlap&) = delete;
  OptimizerOverlap& operator=(const OptimizerOverlap&) = delete;

  int64_t stages() const { return stages_; }
  // The stage whose forward first reads parameter p (stages() − 1 for those outside the
  // embedding and the decoder layers).
  int64_t stage_of(const torch::Tensor& p) const;

  // Queues an update: waits on the host for everything queued on the current stream so far
  // (the gradients, their norm and the clip; the trainer has already read the norm), then runs
  // `launch` with the side stream current; it calls finish_stage(s) after queuing stage s's work, in stage order. `used`:
  // tensors of the current stream that the update reads (gradients, the clip divisor).
  void update(const std::vector<torch::Tensor>& used, const std::function<void()>& launch);
  // Stage s's parameters are updated once the side stream reaches this point.
  void finish_stage(int64_t s);
  // The current stream waits for stage s of the last update (inside a stream capture: an
  // external event-wait node).
  void wait_stage(int64_t s) const;
  // The current stream waits for the whole last update.
  void join() const;

 private:
  struct State;
  int64_t stages_ = 0;
  std::unordered_map<const c10::TensorImpl*, int64_t> stage_;
  std::unique_ptr<State> state_;
  TransformerImpl* model_;
};

}  // namespace moetrain
