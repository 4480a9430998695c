// moetrain eval ([FILE] --checkpoint PATH | [FILE] --hf DIR) [--tokens FILE | --text FILE]:
// scores a model. With --tokens / --text the whole file is one sequence scored like
// transformers' `labels=input_ids` (mean next-token loss over positions 1…n−1); with
// neither, FILE's validation split is scored exactly as the trainer's evaluation does
// (train.eval_batches global batches of seq_len windows). Human line, then one JSON
// object as the last stdout line.
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "app/model_source.h"
#include "data/data_error.h"
#include "data/dataset.h"
#include "data/meta.h"
#include "models/lm_loss.h"
#include "trainer/balance.h"
#include "trainer/evaluate.h"

namespace moetrain {

namespace {

namespace fs = std::filesystem;

// Whitespace-separated decimal token ids.
std::vector<int64_t> read_token_text(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UsageError(fmt::format("cannot open token file '{}'", path));
  std::vector<int64_t> ids;
  std::string word;
  while (in >> word) {
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(word.c_str(), &end, 10);
    if (*end != '\0' || errno == ERANGE || v < 0)
      throw UsageError(fmt::format("{}: token {} is '{}', not a non-negative integer id", path, ids.size(), word));
    ids.push_back(v);
  }
  return ids;
}

// A token file of `data prepare` (train.bin / val.bin): its width comes from the meta.json beside it.
std::vector<int64_t> read_token_bin(const std::string& path) {
  const std::string dir = fs::path(path).parent_path().string();
  DataMeta meta;
  try {
    meta = read_data_meta(dir.empty() ? "." : dir);
  } catch (const DataError& e) {
    throw UsageError(fmt::format("{}: a .bin token file is read with the meta.json of its directory: {}", path, e.what()));
  }
  const int64_t width = token_dtype_size(meta.dtype);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(fmt::format("cannot open token file '{}'", path));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() % static_cast<size_t>(width) != 0)
    throw UsageError(fmt::format("{}: {} bytes is not a whole number of {} tokens (truncated?)", path, bytes.size(),
                                 meta.dtype));
  std::vector<int64_t> ids(bytes.size() / static_cast<size_t>(width));
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < ids.size(); ++i) {
    uint64_t v = 0;  // little-endian
    for (int64_t b = width - 1; b >= 0; --b) v = (v << 8) | p[i * static_cast<size_t>(width) + static_cast<size_t>(b)];
    ids[i] = static_cast<int64_t>(v);
  }
  return ids;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(fmt::format("cannot open text file '{}'", path));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// One sequence, labels = input ids: mean loss of positions 0..n-2 predicting ids 1..n-1.
double score_sequence(ModelSource& src, const std::vector<int64_t>& ids, torch::Device device, int64_t chunk) {
  const ModelConfig& cfg = src.model->cfg;
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n < 2) throw UsageError(fmt::format("need at least 2 tokens to score, found {}", n));
  if (n > cfg.max_position_embeddings)
    throw UsageError(fmt::format("{} tokens exceed the model's max_position_embeddings ({}); score a shorter file, or "
                                 "a validation split in windows with FILE and neither --tokens nor --text",
                                 n, cfg.max_position_embeddings));
  for (int64_t id : ids)
    if (id >= cfg.vocab_size)
      throw UsageError(fmt::format("token id {} is outside the model's vocabulary ({})", id, cfg.vocab_size));
  torch::NoGradGuard no_grad;
  torch::Tensor input = torch::tensor(ids, torch::kInt64).view({1, n}).to(device);
  ForwardOut out = src.model->forward(input);
  torch::Tensor hidden = out.hidden.index({0, torch::indexing::Slice(0, n - 1)});
  torch::Tensor targets = input.index({0, torch::indexing::Slice(1, n)});
  return chunked_cross_entropy(hidden, src.model->head->weight, targets, chunk).item<double>();
}

}  // namespace

int cmd_eval(int argc, char** argv) {
  ArgParser args("eval", "[FILE] (--checkpoint PATH | --hf DIR) [--tokens FILE | --text FILE] [--set KEY=VALUE]...",
                 "Score a model: a moetrain checkpoint (a step-* directory, or a checkpoint.dir whose newest complete\n"
                 "checkpoint is taken; its MANIFEST is verified and its config.yaml builds the model) or a Hugging\n"
                 "Face DeepseekV3 directory.\n"
                 "  --tokens FILE  whitespace-separated ids, or a .bin token file of `data prepare` (read with the\n"
                 "                 meta.json beside it): the whole file is one sequence, scored like transformers'\n"
                 "                 labels=input_ids (mean next-token loss over positions 1..n-1)\n"
                 "  --text FILE    the same after encoding the text with the experiment's tokenizer (data.dir), or\n"
                 "                 DIR/tokenizer.model for --hf\n"
                 "  neither        the validation split of FILE's data (for --checkpoint, FILE defaults to the\n"
                 "                 checkpoint's config.yaml), exactly as training evaluates it: train.eval_batches\n"
                 "                 global batches of seq_len windows read in a fixed order\n"
                 "The last stdout line is one JSON object with loss, ppl, tokens.");
  args.positional("FILE", "experiment config (YAML): data and evaluation settings", /*required=*/false);
  args.option("checkpoint", "PATH", "a moetrain checkpoint: step directory or checkpoint root");
  args.option("hf", "DIR", "a Hugging Face DeepseekV3 directory (config.json + *.safetensors)");
  args.option("tokens", "FILE", "token ids (text or .bin) scored as one sequence");
  args.option("text", "FILE", "text scored as one sequence");
  args.option("device", "DEV", "cpu or cuda", "cpu");
  args.option("chunk", "N", "rows of logits computed at a time (--tokens / --text)", "1024");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    if (args.given("tokens") && args.given("text")) throw UsageError("moetrain eval: give --tokens or --text, not both");
    const std::string device_name = args.get("device");
    if (device_name != "cpu" && device_name != "cuda")
      throw UsageError(fmt::format("moetrain eval: --device '{}' (expected cpu or cuda)", device_name));
    const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
    const std::string file = args.num_positional() > 0 ? args.pos(0) : "";

    ModelSource src = load_model_source(file, args.sets(), args.get("checkpoint"), args.get("hf"), device);
    nlohmann::json j;
    std::string what;
    if (args.given("tokens") || args.given("text")) {
      std::vector<int64_t> ids;
      if (args.given("tokens")) {
        what = args.get("tokens");
        ids = fs::path(what).extension() == ".bin" ? read_token_bin(what) : read_token_text(what);
      } else {
        what = args.get("text");
        ids = source_tokenizer(src)->encode(read_text_file(what));
      }
      const double loss = score_sequence(src, ids, device, std::stoll(args.get("chunk")));
      const int64_t n = static_cast<int64_t>(ids.size());
      j = {{"loss", loss}, {"ppl", std::exp(loss)}, {"tokens", n - 1}, {"input_tokens", n}};
    } else {
      if (!src.experiment)
        throw UsageError("moetrain eval: --hf DIR without --tokens / --text needs the experiment FILE whose "
                         "validation split to score");
      const ExperimentConfig& exp = *src.experiment;
      what = exp.data.dir + "/val.bin";
      EvalResult e;
      try {
        DataLoader loader(exp.data.dir, exp.train);
        e = evaluate(src.model, loader, exp, device);
      } catch (const DataError& err) {
        throw UsageError(err.what());
      }
      double maxvio = 0.0;
      for (double v : e.maxvio_layers) maxvio += v / static_cast<double>(e.maxvio_layers.size());
      j = {{"loss", e.loss},
           {"ppl", std::exp(e.loss)},
           {"tokens", e.tokens},
           {"maxvio_global", maxvio},
           {"maxvio_global_layers", e.maxvio_layers}};
    }
    j["model"] = src.name;
    j["input"] = what;
    std::cout << fmt::format("eval {} on {}: {} tokens, loss {:.6f}, perplexity {:.4f}\n", src.name, what,
                             j["tokens"].get<int64_t>(), j["loss"].get<double>(), j["ppl"].get<double>());
    std::cout << j.dump() << "\n";
    return 0;
  });
}

}  // namespace moetrain
