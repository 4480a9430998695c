// defines: CheckpointError, TrainingState, LossSpikeDetector, save_checkpoint,
// load_checkpoint, load_model_weights, resolve_resume, resolve_checkpoint_arg,
// find_latest_checkpoint, write_manifest, verify_manifest,
// checkpoint_dir_name, set_checkpoint_fault_hook, StopSignals — crash-safe
// checkpoints of a training run and resuming from them (reliability.md §1, §2).
//
// Layout: checkpoint.dir/step-<8 digits>/ holds
//   model.safetensors      every named parameter and buffer under its moetrain name, in its dtype
//                          (router biases are fp32 buffers)
//   optimizer.safetensors  AdamW state keyed by parameter name: exp_avg.<name>, exp_avg_sq.<name>,
//                          step.<name> (int64 scalar); a parameter that never had a gradient has none
//     or, ZeRO-1 (distributed.zero_stage 1): optimizer-zero-<r>-of-<W>.safetensors for r = 0..W-1,
//                          each rank's fragments exp_avg.<name>[b:e], ... (trainer/zero.h)
//   rng.safetensors        cpu: the torch CPU generator state (uint8); cuda: the CUDA one when training on CUDA
//   state.json             step, tokens, data-loader cursor, skip counters, loss-spike window,
//                          config hash, moetrain version, format version
//   config.yaml            config_to_yaml of the run
//   MANIFEST               "<fnv1a64 hex> <size> <file>" per file above (expert shards included)
// Expert parallelism (trainer/expert_parallel.h) moves the routed-expert tensors
// (*.experts.w13/w2) and their AdamW state out of model / optimizer.safetensors into one
// file pair per shard, named by the global expert range [A, B) they hold:
//   experts-AAAAA-BBBBB.safetensors            the shard's rows of every expert tensor
//   optimizer-experts-AAAAA-BBBBB.safetensors  exp_avg.<name>, exp_avg_sq.<name>, step.<name>
// Loading assembles whatever expert rows the model holds from whichever files cover them
// (unsharded model.safetensors counts as [0, E)), so any ep_size / world size resumes any
// checkpoint, and export / eval (one process, every expert) read all shards.
// No pickle anywhere: tensors are safetensors, the rest JSON / YAML / text.
//
// Commit protocol (one writer): everything goes into checkpoint.dir/.tmp-step-N-<pid>/, each file
// and the directory are fsynced, the directory is renamed to step-N (an existing step-N is first
// moved aside to a dot-name and deleted after), the parent is fsynced, and only then is
// checkpoint.dir/latest rewritten (temp file + fsync + rename + fsync). `latest` is the commit
// point that resume trusts first. Older step-* are pruned after that, keeping keep_last.
// Directories whose names start with '.' are never checkpoints; stale .tmp-* of a crashed writer
// are removed by the next save.
//
// Resume (`--resume auto|PATH`):
//   auto  resume from `latest` when it names a step-* whose MANIFEST verifies; otherwise (missing,
//         garbage, dangling, damaged) warn and take the highest step-* that verifies. When
//         checkpoint.dir holds no step-* at all (or does not exist) this is a fresh start — the
//         torchrun --max-restarts pattern, where the first launch has nothing to resume. When
//         step-* exist but none verifies it is an error: never a silent fresh start.
//   PATH  a step directory (has MANIFEST) or a checkpoint.dir (resolved like auto, but one
//         must be found). Anything else is an error.
// Loading verifies every MANIFEST checksum (a damaged file is named), rejects a checkpoint whose
// model section or balance.strategy differs from the config (key-by-key diff) or whose tensor
// shapes / dtypes disagree with the model, then restores model, optimizer, RNG and counters.
#pragma once

#include <csignal>
#include <cstdint>
#include <deque>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "data/dataset.h"
#include "models/transformer.h"
#include "trainer/experiment_config.h"

namespace moetrain {

// A checkpoint that cannot be resumed: missing, damaged, or incompatible with the config.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Loss > factor × the max of the last `window` finite step losses → a spike (Megatron's
// --check-for-spiky-loss). Non-fatal; the window is checkpointed so a resumed run flags the
// same steps.
class LossSpikeDetector {
 public:
  explicit LossSpikeDetector(double factor, size_t window = 100) : factor_(factor), window_(window) {}
  // Records `loss` (non-finite losses are not recorded) and says whether it was a spike.
  bool observe(double loss);
  std::vector<double> recent() const { return {recent_.begin(), recent_.end()}; }
  void restore(const std::vector<double>& recent);

 private:
  double factor_;
  size_t window_;
  std::deque<double> recent_;
};

// Everything of the loop that is not a tensor. Balancer counts are zero at step boundaries and
// the biases live in the model, so the balancer needs nothing here.
struct TrainingState {
  int64_t step = 0;  // optimizer steps done (= the lr schedule position)
  DataLoaderState data;
  int64_t skipped_steps = 0;
  int64_t consecutive_skips = 0;
  std::vector<double> recent_losses;  // LossSpikeDetector window
};

// "step-00000042"
std::string checkpoint_dir_name(int64_t step);

// The routed experts [first, first + count) of every MoE layer that this process holds;
// count 0: all of them, in model.safetensors (no expert parallelism).
struct ExpertShard {
  int64_t first = 0;
  int64_t count = 0;
};

// Expert-parallel saves (several writers, one commit; trainer/expert_parallel.cpp):
// the shared temporary directory of step `step` (job: an id every rank agrees on),
std::string checkpoint_temp_dir(const std::string& root, int64_t step, int64_t job);
// created by rank 0 alone (after removing a crashed writer's .tmp-step-*),
void begin_checkpoint(const std::string& root, const std::string& tmp);
// where each shard's first replica writes its experts-*/optimizer-experts-* pair (fsynced),
void save_expert_shard(const std::string& tmp, Transformer& model, torch::optim::AdamW& optimizer,
                       const ExpertShard& shard);
// before rank 0's save_checkpoint(..., shard, job) writes the rest into it and commits.

// Test-only: called at each stage of save_checkpoint with the stage name and the path it concerns,
// so tests can simulate a crash by throwing (and, at "model.safetensors", by truncating the file).
// Stages in order: "model.safetensors" (file written), "optimizer.safetensors", "before_manifest",
// "before_rename" (path = temp dir), "before_latest" (path = final dir), "before_prune".
// A throw leaves the temp directory behind, as a crash would. Pass nullptr to clear.
using CheckpointFaultHook = std::function<void(const char* stage, const std::string& path)>;
void set_checkpoint_fault_hook(CheckpointFaultHook hook);

class ZeroAdamW;
class ProcessGroup;

// Writes and commits checkpoint.dir/step-<state.step>/ and prunes to keep_last; returns its path.
// Refuses (std::runtime_error) when any parameter or buffer is non-finite. With shard.count > 0
// the expert tensors are left out (their shard files must already be in the temp directory of
// `job`, see above).
std::string save_checkpoint(const ExperimentConfig& cfg, Transformer& model, torch::optim::AdamW& optimizer,
                            const TrainingState& state, const ExpertShard& shard = {}, int64_t job = 0);

// ZeRO-1: a collective save. Every rank calls it and writes its optimizer shard
// (optimizer-zero-<rank>-of-<world>.safetensors, trainer/zero.h) into the temporary directory
// rank 0 prepared; rank 0 writes everything else and commits after a barrier, so the MANIFEST
// covers every shard. Returns the path on rank 0, "" elsewhere.
std::string save_checkpoint(const ExperimentConfig& cfg, Transformer& model, ZeroAdamW& optimizer,
                            const TrainingState& state, ProcessGroup& pg);

// Writes ckpt_dir/MANIFEST (fsynced) over the checkpoint files in ckpt_dir, which must all exist.
// save_checkpoint's step before the rename; tests use it to make hand-built checkpoints valid.
void write_manifest(const std::string& ckpt_dir);

// Throws CheckpointError naming the first file that is missing, has the wrong size or checksum.
void verify_manifest(const std::string& ckpt_dir);

// The newest complete checkpoint under `root` (see "Resume" above), or "" when root holds no
// step-* at all. Throws CheckpointError when step-* exist but none verifies.
std::string find_latest_checkpoint(const std::string& root);

// `resume` = "" (no resume) | "auto" | PATH → the step directory to load, or "" for a fresh start.
std::string resolve_resume(const std::string& checkpoint_root, const std::string& resume);

// A checkpoint named on the command line (export, eval, generate): a step directory (has a
// MANIFEST) or a checkpoint root (its newest complete checkpoint, as `--resume auto` picks it).
// Returns the step directory after verifying its MANIFEST; throws CheckpointError otherwise.
std::string resolve_checkpoint_arg(const std::string& path);

// Loads only the weights of the verified checkpoint `ckpt_dir` into `model` (on its device):
// the model.safetensors tensor set must be exactly the model's parameters and buffers, with equal
// shapes and dtypes; otherwise CheckpointError lists the differences and nothing is copied.
void load_model_weights(const std::string& ckpt_dir, Transformer& model);

// Verifies and loads `ckpt_dir` into model (on its device), optimizer and the global RNGs.
// Throws CheckpointError (damage, incompatibility). Either optimizer loads either kind of
// checkpoint: a ZeRO-1 one written at any world size (its shards re-assembled) or a
// replicated one (optimizer.safetensors), with or without expert shard files. An
// expert-parallel model holds experts [shard.first, +its rows) (see ExpertShard) and loads
// with torch::optim::AdamW (ZeRO-1 together with ep_size > 1 is refused by validate_config).
TrainingState load_checkpoint(const std::string& ckpt_dir, const ExperimentConfig& cfg, Transformer& model,
                              torch::optim::AdamW& optimizer, const ExpertShard& shard = {});
TrainingState load_checkpoint(const std::string& ckpt_dir, const ExperimentConfig& cfg, Transformer& model,
                              ZeroAdamW& optimizer);

// Installs SIGINT/SIGTERM (stop: finish the step, save, return) and SIGUSR1 (save at the next
// step boundary, continue) handlers that only set flags; restores the previous handlers on
// destruction. One instance at a time.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  bool stop_requested() const;
  bool take_save_request();  // true once per SIGUSR1

 private:
  struct sigaction old_int_{}, old_term_{}, old_usr1_{};
};

}  // namespace moetrain
