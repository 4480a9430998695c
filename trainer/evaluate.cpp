#include "trainer/evaluate.h"

#include "models/autocast.h"
#include "trainer/balance.h"

namespace moetrain {

EvalResult evaluate(Transformer& model, const DataLoader& loader, const ExperimentConfig& cfg, torch::Device device) {
  torch::NoGradGuard no_grad;
  // bf16 weights (train.param_dtype bf16) only run under autocast; fp32 ones are evaluated in fp32
  Bf16AutocastGuard autocast(cfg.train.param_dtype == "bf16" && device.is_cuda());
  const int64_t accum = loader.accumulation_steps(1);
  const int64_t n_moe = cfg.model.num_moe_layers();
  torch::Tensor counts = torch::zeros({n_moe, cfg.model.n_routed_experts}, torch::kInt64);
  double loss_sum = 0.0;
  int64_t n = 0;
  EvalResult r;
  for (int64_t b = 0; b < cfg.train.eval_batches; ++b) {
    for (int64_t m = 0; m < accum; ++m) {
      Batch batch = loader.val_micro_batch(b, m, 0, 1);
      ForwardOut out = model->forward(batch.inputs.to(device));
      loss_sum += lm_head_loss(model, out.hidden, batch.targets.to(device), kLossChunkTokens).item<double>();
      r.tokens += batch.targets.numel();
      ++n;
      for (int64_t l = 0; l < n_moe; ++l) counts[l] += out.routing[static_cast<size_t>(l)].counts.to(torch::kCPU);
    }
  }
  r.loss = loss_sum / static_cast<double>(n);
  for (int64_t l = 0; l < n_moe; ++l) r.maxvio_layers.push_back(max_violation(counts[l]));
  return r;
}

}  // namespace moetrain
