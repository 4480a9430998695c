// defines: ExperimentConfig and its section structs (BalanceConfig, OptimConfig,
// TrainConfig, CheckpointConfig, LoggingConfig, DistributedConfig),
// load_experiment_config, config_to_yaml, config_hash.
//
// This is the one place that reads YAML into config structs. Every key of every
// section is listed once, in visit_config() (experiment_config.cpp), which drives
// both reading (strict: unknown keys, wrong types and out-of-range values are
// errors with file:line:col) and writing (`moetrain config show`).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/data_config.h"
#include "models/model_config.h"
#include "trainer/config_tree.h"

namespace moetrain {

struct BalanceConfig {
  std::vector<std::string> strategy{"loss_free"};  // any of loss_free, aux_loss, seq_aux_loss, z_loss; [] = none
  double bias_update_rate = 1e-3;                  // γ
  std::string bias_update = "sign";                // sign | proportional
  bool bias_center = false;                        // subtract the mean update (torchtitan) or not (Megatron, OLMo-core)
  std::optional<int64_t> bias_freeze_step;         // γ = 0 from this optimizer step on
  std::optional<int64_t> bias_freeze_tokens;       // γ = 0 once this many tokens were seen
  double aux_loss_coef = 1e-3;                     // α of the batch-level (Switch) loss
  double seq_aux_loss_coef = 1e-4;                 // α of DeepSeek-V3's sequence-wise loss
  double z_loss_coef = 1e-3;                       // ST-MoE router z-loss

  bool has(const std::string& s) const;
};

struct OptimConfig {
  double lr = 1e-3;
  double min_lr = 1e-4;
  std::vector<double> betas{0.9, 0.95};
  double weight_decay = 0.1;  // ≥2-D weights only
  double eps = 1e-8;
  double grad_clip = 1.0;     // global norm; 0 disables
  std::string schedule = "cosine";  // cosine | constant | multistep
  int64_t warmup_steps = 100;
  std::vector<int64_t> milestones;  // multistep: steps where lr *= multistep_factor
  double multistep_factor = 0.316;  // DeepSeek-V2's decay
  // fp32 | bf16: how AdamW stores the moments of the bf16-stored weights (train.param_dtype
  // bf16; replicated or ZeRO-1). bf16 is DeepSeek-V3's choice (§3.3.2): fp32 arithmetic,
  // bf16 storage — 8 bytes a parameter less and a faster optimizer step (bench/NOTES.md).
  std::string moment_dtype = "fp32";
  // fp32 | split: how the replicated optimizer keeps the fp32 masters of the bf16-stored weights.
  // split: the bf16 weight itself plus a 16-bit remainder (the master's low bits, exact but for
  // exact rounding ties) — 2 bytes a parameter instead of 4 and 18 bytes of optimizer traffic
  // instead of 20 (trainer/master_weights.h; bench/NOTES.md 55).
  std::string master_storage = "fp32";
};

struct TrainConfig {
  int64_t steps = 1000;
  int64_t global_batch = 16;  // sequences per optimizer step, over all ranks
  int64_t micro_batch = 16;   // sequences per rank per micro-step
  int64_t seq_len = 256;
  int64_t seed = 1234;
  std::string device = "cpu";  // cpu | cuda
  std::string dtype = "fp32";  // fp32 | bf16 (autocast, fp32 master weights; CUDA)
  // fp32 | bf16: how the model stores its weight matrices (every trainable parameter with
  // ≥ 2 dims). bf16: the optimizer keeps their fp32 masters (trainer/master_weights.h, sharded
  // under ZeRO-1) and their gradients are bf16 (accumulated and reduced in bf16); needs dtype bf16.
  std::string param_dtype = "fp32";
  // fp32 | bf16: how the LM head stores its logits under dtype bf16 (models/lm_loss.h). bf16 is
  // what HF transformers, torchtitan and Megatron-LM do (the head's GEMM writes bf16, the loss
  // reads it into fp32): half the bytes of every [chunk, vocab] pass. Evaluation keeps fp32.
  std::string logits_dtype = "fp32";
  // none | full: recompute every decoder layer in the backward (models/checkpointing.h)
  std::string activation_checkpointing = "none";
  // Capture the step's forward + backward as one CUDA graph and replay it (trainer/cuda_graph.h):
  // device cuda, one process, the replicated optimizer.
  bool cuda_graph = false;
  int64_t eval_every = 100;    // 0: only at the end
  int64_t eval_batches = 8;
  double mtp_loss_weight = 0.3;  // λ of the MTP loss (eq. 25); with num_nextn_predict_layers > 0
  // A step schedule like DeepSeek-V3's (0.3 for the first 10T tokens, then 0.1): from
  // optimizer step mtp_loss_weight_switch_step on (0-based), λ = mtp_loss_weight_after.
  std::optional<int64_t> mtp_loss_weight_switch_step;  // null: λ constant
  double mtp_loss_weight_after = 0.1;
  int64_t threads = 0;           // CPU intra-op threads; 0 = LibTorch's default
};

struct CheckpointConfig {
  std::string dir = "runs/default/checkpoints";
  int64_t every = 0;  // optimizer steps between saves; 0 = only at the end
  int64_t keep_last = 2;
  std::string nonfinite_policy = "skip";  // skip | abort
  int64_t max_consecutive_skips = 5;
  double spike_factor = 10.0;  // loss > factor × recent max → warning (Megatron's 10)
};

struct LoggingConfig {
  std::string dir = "runs/default";
  int64_t every = 10;
};

struct DistributedConfig {
  std::string backend = "auto";  // auto | nccl | gloo
  int64_t ep_size = 1;
  int64_t timeout_s = 600;
  int64_t zero_stage = 0;  // 0: replicated AdamW; 1: AdamW moments sharded over data-parallel ranks (trainer/zero.h)
  // Replicated data parallel: all-reduce gradient buckets during the backward (trainer/grad_reducer.h)
  // rather than after it (false: ProcessGroup::average_gradients, the reference twin).
  bool overlap_grad_reduce = true;
  int64_t bucket_mb = 25;  // gradient bucket size of that all-reduce, MiB (DDP's bucket_cap_mb)
};

struct ExperimentConfig {
  ModelConfig model;
  BalanceConfig balance;
  OptimConfig optim;
  TrainConfig train;
  DataConfig data;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  DistributedConfig distributed;
};

// λ of the MTP loss at optimizer step `step` (0-based).
double mtp_loss_weight_at(const TrainConfig& t, int64_t step);

// Loads FILE (resolving `base:`), applies `--set` overrides in order, binds and
// validates. Throws ConfigErrors listing every problem found.
ExperimentConfig load_experiment_config(const std::string& path,
                                        const std::vector<std::string>& overrides = {});

// Binds an already-merged tree (tests, ablation variants).
ExperimentConfig bind_experiment_config(const ConfigNode& root);

// Cross-field rules; returns (dotted key, message) pairs.
std::vector<std::pair<std::string, std::string>> validate_config(const ExperimentConfig& cfg);

// The resolved config as YAML that load_experiment_config reads back unchanged.
std::string config_to_yaml(const ExperimentConfig& cfg);

// FNV-1a 64 of config_to_yaml, as 16 hex digits (stored in checkpoints).
std::string config_hash(const ExperimentConfig& cfg);

}  // namespace moetrain
