// defines: checkpointed_layer_forward — activation checkpointing of one decoder layer
// (torch.utils.checkpoint's reentrant form): the forward runs without keeping any of the
// layer's activations, only its input; the backward runs the layer again with gradients
// on and back-propagates through the recomputation. Costs one more forward of the layer;
// saves everything the layer would have kept for its backward (attention, experts, norms).
//
// An MoE layer's routing comes out as outputs of the checkpoint: logits and scores stay
// differentiable (the balance losses back-propagate into the router through the
// recomputation), topk_idx / topk_weight / counts are plain values. The recomputation
// routes identically: same input, deterministic kernels, and the router bias changes
// only after the optimizer step.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "models/decoder_layer.h"

namespace moetrain {

// Same result as layer.forward(x, rope, routing) (values, routing and all gradients).
torch::Tensor checkpointed_layer_forward(DecoderLayerImpl& layer, const torch::Tensor& x, const RopeTables& rope,
                                         std::vector<RoutingStats>& routing);

}  // namespace moetrain
