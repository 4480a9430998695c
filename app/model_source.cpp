#include "app/model_source.h"

#include <filesystem>

#include <fmt/format.h>

#include "app/cli.h"
#include "data/data_error.h"
#include "io/hf.h"
#include "trainer/checkpoint.h"

namespace moetrain {

namespace {

namespace fs = std::filesystem;

// The model section alone, as config.yaml writes it: equal strings ⇔ equal models.
std::string model_yaml(const ModelConfig& m) {
  ExperimentConfig only_model;
  only_model.model = m;
  return config_to_yaml(only_model);
}

}  // namespace

ModelSource load_model_source(const std::string& file, const std::vector<std::string>& sets,
                              const std::string& checkpoint, const std::string& hf_dir, torch::Device device) {
  if (checkpoint.empty() == hf_dir.empty())
    throw UsageError("give exactly one model: --checkpoint PATH (a moetrain checkpoint) or --hf DIR");
  ModelSource src;
  if (!file.empty()) src.experiment = load_experiment_config(file, sets);
  ModelConfig cfg;
  try {
    if (!checkpoint.empty()) {
      src.name = resolve_checkpoint_arg(checkpoint);
      ExperimentConfig saved = load_experiment_config(src.name + "/config.yaml");
      if (src.experiment && model_yaml(src.experiment->model) != model_yaml(saved.model))
        throw UsageError(fmt::format("the model section of {} differs from the one in {}/config.yaml: evaluate with "
                                     "that checkpoint's own experiment file, or leave FILE out",
                                     file, src.name));
      if (!src.experiment) src.experiment = saved;
      cfg = saved.model;
      src.model = Transformer(cfg);
      load_model_weights(src.name, src.model);
    } else {
      src.name = src.hf_dir = hf_dir;
      cfg = load_hf_config(hf_dir);
      if (src.experiment && src.experiment->model.vocab_size != cfg.vocab_size)
        throw UsageError(fmt::format("{} has vocab_size {}, {} has {}: the data of FILE does not fit this model", hf_dir,
                                     cfg.vocab_size, file, src.experiment->model.vocab_size));
      src.model = Transformer(cfg);
      load_hf_weights(hf_dir, *src.model, cfg);
    }
  } catch (const CheckpointError& e) {
    throw UsageError(e.what());
  }
  src.model->to(device);
  src.model->eval();
  return src;
}

std::unique_ptr<Tokenizer> source_tokenizer(const ModelSource& source) {
  if (source.experiment) {
    try {
      return load_tokenizer(source.experiment->data.dir);
    } catch (const DataError& e) {
      if (source.hf_dir.empty()) throw UsageError(e.what());
    }
  }
  const fs::path sp = fs::path(source.hf_dir) / "tokenizer.model";
  if (!source.hf_dir.empty() && fs::is_regular_file(sp)) return std::make_unique<SentencePieceTokenizer>(sp.string());
  throw UsageError(fmt::format("no tokenizer for {}: give the experiment FILE whose data.dir holds it (run `moetrain "
                               "data prepare FILE`), or use --tokens with token ids",
                               source.name));
}

}  // namespace moetrain
