// moetrain eval (--hf DIR | FILE --checkpoint PATH) --tokens FILE: scores one
// token sequence like transformers' `labels=input_ids` (mean next-token loss over
// positions 1…n−1). Human line, then one JSON object as the last stdout line.
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "io/hf.h"
#include "models/lm_loss.h"
#include "models/transformer.h"

namespace moetrain {

namespace {

// Whitespace-separated decimal token ids. (`.bin` token files arrive with `data prepare`.)
torch::Tensor read_token_text(const std::string& path) {
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
  if (ids.size() < 2) throw UsageError(fmt::format("{}: need at least 2 tokens to score, found {}", path, ids.size()));
  return torch::tensor(ids, torch::kInt64);
}

}  // namespace

int cmd_eval(int argc, char** argv) {
  ArgParser args("eval", "--hf DIR --tokens FILE [--device cpu|cuda]",
                 "Score a token sequence: mean next-token cross-entropy over positions 1..n-1 of the whole\n"
                 "file as one sequence (transformers' labels=input_ids), and its perplexity.\n"
                 "The last stdout line is one JSON object with loss, ppl, tokens.");
  args.option("hf", "DIR", "a Hugging Face DeepseekV3 directory (config.json + *.safetensors)");
  args.option("tokens", "FILE", "whitespace-separated token ids");
  args.option("device", "DEV", "cpu or cuda", "cpu");
  args.option("chunk", "N", "rows of logits computed at a time", "1024");
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    if (!args.given("hf")) throw UsageError("moetrain eval: --hf DIR is required (--checkpoint arrives with checkpoints)");
    if (!args.given("tokens")) throw UsageError("moetrain eval: --tokens FILE is required");
    torch::Device device(args.get("device") == "cuda" ? torch::kCUDA : torch::kCPU);

    ModelConfig cfg = load_hf_config(args.get("hf"));
    torch::Tensor ids = read_token_text(args.get("tokens"));
    int64_t max_id = ids.max().item<int64_t>();
    if (max_id >= cfg.vocab_size)
      throw UsageError(fmt::format("{}: token id {} is outside the model's vocabulary ({})", args.get("tokens"), max_id,
                                   cfg.vocab_size));

    Transformer model(cfg);
    load_hf_weights(args.get("hf"), *model, cfg);
    model->to(device);
    model->eval();
    torch::NoGradGuard no_grad;

    const int64_t n = ids.size(0);
    torch::Tensor input = ids.view({1, n}).to(device);
    ForwardOut out = model->forward(input);
    // position i predicts token i+1: score hidden[0..n-2] against ids[1..n-1]
    torch::Tensor hidden = out.hidden.index({0, torch::indexing::Slice(0, n - 1)});
    torch::Tensor targets = input.index({0, torch::indexing::Slice(1, n)});
    double loss = chunked_cross_entropy(hidden, model->head->weight, targets, std::stoll(args.get("chunk")))
                      .item<double>();
    double ppl = std::exp(loss);
    std::cout << fmt::format("eval {}: {} tokens, loss {:.6f}, perplexity {:.4f}\n", args.get("hf"), n - 1, loss, ppl);
    nlohmann::json j = {{"loss", loss}, {"ppl", ppl}, {"tokens", n - 1}, {"input_tokens", n}};
    std::cout << j.dump() << "\n";
    return 0;
  });
}

}  // namespace moetrain
