// defines: StepLosses, forward_backward — the forward and backward half of one
// optimizer step, shared by the training loop (trainer.cpp) and `moetrain bench`:
// every micro-batch of the global batch goes through the model and its MTP modules
// (bf16 autocast on CUDA when asked), the LM loss + λ·MTP loss + the balance losses,
// scaled by 1/accum, are back-propagated (gradients accumulate), and the balancer counts the training
// routing. The loss terms stay on the device: the caller syncs once, when it
// needs the numbers.
#pragma once

#include <cstdint>
#include <functional>

#include <torch/torch.h>

#include "data/dataset.h"
#include "models/transformer.h"
#include "trainer/balance.h"
#include "trainer/grad_norm_tracker.h"
#include "trainer/grad_reducer.h"

namespace moetrain {

// Sums over the micro-steps (divide by accum for the means), float64 scalars on the device, detached.
// mtp is the unweighted mean over MTP depths (0 without MTP modules), comparable with lm.
struct StepLosses {
  torch::Tensor lm, aux, seq_aux, z, mtp;
  // With ForwardBackwardOptions::norm_tracker: ‖g‖₂ of the step's gradients (0-dim fp64 on the
  // device, summed during the backward); undefined otherwise (ExpertParallel::grad_norm).
  torch::Tensor grad_norm;
  // [lm, aux, seq_aux, z, mtp] means on the CPU: the one host sync of a step.
  std::vector<double> means(int64_t accum) const;
};

struct ForwardBackwardOptions {
  int64_t accum = 1;           // micro-steps of this global batch
  int64_t seq_len = 0;         // for the sequence-wise balance loss
  bool bf16_autocast = false;  // CUDA: bf16 matmuls over fp32 master weights
  bool bf16_logits = false;    // with bf16_autocast: the LM head's logits stored in bf16 (train.logits_dtype)
  double mtp_weight = 0.0;     // λ of the MTP loss this step (train.mtp_loss_weight, scheduled)
  // When defined (a 0-dim fp32 tensor on the device), λ is read from it instead: a captured
  // step (trainer/cuda_graph.h) keeps the schedule by refilling it before each replay.
  torch::Tensor mtp_weight_device;
  bool poison_loss = false;    // test-only fault injection: the LM loss becomes NaN before backward
  bool poison_grad = false;    // test-only: the first parameter's gradient becomes NaN (before any reduction)
  // Data parallel: averages the gradients over the ranks during the last micro-step's
  // backward (trainer/grad_reducer.h); null = the caller reduces them (or one process).
  GradReducer* reducer = nullptr;
  // One process: sums the gradient norm during the last micro-step's backward into
  // StepLosses::grad_norm (trainer/grad_norm_tracker.h); null = the caller computes it after.
  GradNormTracker* norm_tracker = nullptr;
};

// micro_batch(m) is micro-batch m (CPU or device tensors). Gradients are ADDED to the
// parameters' .grad (zero them first); with options.reducer they are the average over the
// ranks on return.
StepLosses forward_backward(Transformer& model, Balancer& balancer, const std::function<Batch(int64_t)>& micro_batch,
                            const ForwardBackwardOptions& options);

}  // namespace moetrain
