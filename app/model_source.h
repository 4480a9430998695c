// defines: ModelSource, load_model_source, source_tokenizer — the model a command
// runs (eval, generate): a moetrain checkpoint (`[FILE] --checkpoint PATH`) or a
// Hugging Face DeepseekV3 directory (`[FILE] --hf DIR`), with the experiment whose
// data and evaluation settings go with it.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "data/tokenizer.h"
#include "models/transformer.h"
#include "trainer/experiment_config.h"

namespace moetrain {

struct ModelSource {
  Transformer model{nullptr};                  // on the requested device, eval mode
  std::optional<ExperimentConfig> experiment;  // FILE (+ --set), else the checkpoint's config.yaml; none for --hf alone
  std::string name;                            // the step directory or HF directory loaded
  std::string hf_dir;                          // set for --hf
};

// Exactly one of checkpoint / hf_dir is non-empty (UsageError otherwise). A checkpoint is a step
// directory or a checkpoint root (its newest complete step); its MANIFEST is verified and its
// config.yaml builds the model, whose weights must match exactly. With FILE, FILE's model section
// must equal the checkpoint's (a different model is almost surely the wrong checkpoint). Bad
// checkpoints, directories and configs are UsageErrors (exit 2) naming the reason.
ModelSource load_model_source(const std::string& file, const std::vector<std::string>& sets,
                              const std::string& checkpoint, const std::string& hf_dir, torch::Device device);

// The tokenizer that goes with the model: the experiment's data.dir (meta.json), else
// HF_DIR/tokenizer.model. UsageError when there is none.
std::unique_ptr<Tokenizer> source_tokenizer(const ModelSource& source);

}  // namespace moetrain
