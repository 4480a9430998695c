#include "trainer/train_step.h"

#include <limits>

#include "models/autocast.h"
#include "trainer/evaluate.h"

namespace moetrain {


std::vector<double> StepLosses::means(int64_t accum) const {
  torch::Tensor all = torch::stack({lm, aux, seq_aux, z, mtp}).to(torch::kCPU);
  std::vector<double> out(5);
  for (int64_t i = 0; i < 5; ++i) out[static_cast<size_t>(i)] = all[i].item<double>() / static_cast<double>(accum);
  return out;
}

StepLosses forward_backward(Transformer& model, Balancer& balancer, const std::function<Batch(int64_t)>& micro_batch,
                            const ForwardBackwardOptions& options) {
  const torch::Device device = model->embed->weight.device();
  auto zero = [&] { return torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat64).device(device)); };
  StepLosses sums{zero(), zero(), zero(), zero(), zero(), torch::Tensor()};
  for (int64_t m = 0; m < options.accum; ++m) {
    Batch batch = micro_batch(m);
    torch::Tensor loss, lm, mtp;
    BalanceLosses bl;
    ForwardOut out;
    {
      Bf16AutocastGuard autocast(options.bf16_autocast);
      const torch::Tensor targets = batch.targets.to(device);
      out = model->forward(batch.inputs.to(device), /*with_mtp=*/true);  // + the MTP modules when D > 0
      lm = lm_head_loss(model, out.hidden, targets, kLossChunkTokens, options.bf16_logits);
      if (options.poison_loss) lm = lm + std::numeric_limits<double>::quiet_NaN();
      bl = balancer.losses(out.routing, options.seq_len);
      loss = lm + bl.total();
      if (!out.mtp_hidden.empty()) {  // eq. 25: λ · mean over depths of L^k_MTP
        mtp = torch::stack(mtp_head_losses(model, out, targets, kLossChunkTokens, options.bf16_logits)).mean();
        loss = options.mtp_weight_device.defined() ? loss + options.mtp_weight_device * mtp
                                                   : loss + options.mtp_weight * mtp;
      }
      loss = loss / static_cast<double>(options.accum);
    }
    const bool last = m + 1 == options.accum;
    if (last && options.reducer) options.reducer->prepare();
    if (last && options.norm_tracker) options.norm_tracker->prepare();
    // (test-only: a NaN in the first parameter's gradient as it accumulates, so it also reaches
    // the other ranks through the reduction)
    torch::Tensor poisoned = options.poison_grad && last ? model->parameters().front() : torch::Tensor();
    unsigned poison_hook = 0;
    if (poisoned.defined())
      poison_hook = poisoned.register_hook([](torch::Tensor g) { return g * std::numeric_limits<double>::quiet_NaN(); });
    loss.backward();
    if (poisoned.defined()) poisoned.remove_hook(poison_hook);
    balancer.accumulate(out.routing);  // training forward passes only (MTP MoE layers included)
    if (mtp.defined()) sums.mtp += mtp.detach().to(torch::kFloat64);
    // float64 sums of the fp32 scalars: the same numbers as adding their .item()s on the host
    sums.lm += lm.detach().to(torch::kFloat64);
    sums.aux += bl.aux.detach().to(torch::kFloat64);
    sums.seq_aux += bl.seq_aux.detach().to(torch::kFloat64);
    sums.z += bl.z.detach().to(torch::kFloat64);
  }
  if (options.reducer) options.reducer->finish();
  if (options.norm_tracker) sums.grad_norm = options.norm_tracker->finish();
  return sums;
}

}  // namespace moetrain
