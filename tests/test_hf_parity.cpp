// Parity with Hugging Face transformers' DeepseekV3ForCausalLM: for each case,
// tests/python/make_hf_reference.py builds a small random model (fp32, CPU, eager
// attention), saves it with save_pretrained and records its logits and loss on a
// fixed batch; moetrain loads config.json + weights through io/hf and must give
// the same logits (max abs error <= 1e-4) — and, for the MTP case, the same logits
// of transformers' MtpLayer (the module its speculative decoding uses) for depth 1;
// then moetrain exports the model
// (save_hf_checkpoint) and transformers must load it and agree too. Needs MOETRAIN_PYTHON with torch and
// transformers 5.17; fails (does not skip) without them.
#include <gtest/gtest.h>

#include <cmath>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ostream>
#include <sstream>
#include <string>

#include <torch/torch.h>

#include "io/hf.h"
#include "io/safetensors.h"
#include "models/transformer.h"
#include "test_paths.h"
#include "test_util.h"

namespace moetrain {
namespace {

namespace fs = std::filesystem;

constexpr double kLogitTol = 1e-4;

using moetrain::testing::TempDir;

// Runs `cmd` through the shell; returns its exit status, stdout+stderr in *output.
int run_command(const std::string& cmd, std::string* output) {
  const moetrain::testing::RunResult r = moetrain::testing::run_capture(cmd);
  *output = r.output;
  return r.exit_code;
}

std::string quoted(const std::string& s) { return moetrain::testing::shell_quoted(s); }

struct ParityCase {
  std::string name;
  std::string config;  // JSON overrides of the script's tiny DeepseekV3Config
  std::string args;    // extra script arguments
};

// For gtest's test listing (otherwise a hex dump of the struct).
void PrintTo(const ParityCase& c, std::ostream* os) { *os << c.name; }

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

class HfParity : public ::testing::TestWithParam<ParityCase> {
 protected:
  static void SetUpTestSuite() {
    std::string out;
    const std::string cmd = quoted(MOETRAIN_PYTHON) +
                            " -c 'import torch, safetensors, transformers; print(transformers.__version__)'";
    python_ok_ = run_command(cmd, &out) == 0;
    python_msg_ = out;
  }
  static bool python_ok_;
  static std::string python_msg_;
};
bool HfParity::python_ok_ = false;
std::string HfParity::python_msg_;

TEST_P(HfParity, LogitsMatchTransformers) {
  ASSERT_TRUE(python_ok_) << "MOETRAIN_PYTHON (" << MOETRAIN_PYTHON
                          << ") cannot import torch, safetensors and transformers; the parity tests need "
                             "them (scripts/setup.sh's virtualenv, or -DMOETRAIN_PYTHON=...):\n"
                          << python_msg_;
  const ParityCase& c = GetParam();
  torch::manual_seed(0);
  TempDir dir("MOETRAIN_KEEP_HF_PARITY");
  const std::string overrides = (fs::path(dir.path()) / "overrides.json").string();
  std::ofstream(overrides) << c.config;
  const std::string script = quoted(std::string(MOETRAIN_SOURCE_DIR) + "/tests/python/make_hf_reference.py");
  const std::string cmd = quoted(MOETRAIN_PYTHON) + " " + script + " --out " + quoted(dir.path()) + " --config @" + quoted(overrides) + " " + c.args;
  std::string out;
  const int rc = run_command(cmd, &out);
  ASSERT_EQ(rc, 0) << cmd << "\n" << out;

  const ModelConfig cfg = load_hf_config(dir.path());
  Transformer model(cfg);
  const int64_t loaded = load_hf_weights(dir.path(), *model, cfg);
  model->eval();
  torch::NoGradGuard no_grad;

  const SafetensorsFile ref = read_safetensors((fs::path(dir.path()) / "reference.safetensors").string());
  const torch::Tensor ids = ref.at("input_ids");
  const bool mtp = cfg.num_nextn_predict_layers > 0;
  const ForwardOut fwd = model->forward(ids, /*with_mtp=*/mtp);
  const torch::Tensor logits = model->logits(fwd.hidden);
  const torch::Tensor ref_logits = ref.at("logits");
  ASSERT_EQ(logits.sizes(), ref_logits.sizes());
  const double err = max_abs_diff(logits, ref_logits);

  // HF's loss: mean cross-entropy of logits[:, :-1] against input_ids[:, 1:].
  const int64_t T = ids.size(1), V = logits.size(-1);
  const torch::Tensor loss = torch::nn::functional::cross_entropy(
      logits.narrow(1, 0, T - 1).reshape({-1, V}), ids.narrow(1, 1, T - 1).reshape({-1}));
  const double loss_err = std::abs(loss.item<double>() - ref.at("loss").item<double>());

  // Per-layer hidden states (hidden.0 = embeddings, hidden.k = after layer k-1, the
  // last after the final norm), to say where a mismatch starts.
  std::string per_layer;
  {
    RotaryEmbedding rope(cfg);
    torch::Tensor h = model->embed(ids);
    const RopeTables tables = rope.tables(T, h.device(), torch::kFloat);
    std::vector<RoutingStats> routing;
    per_layer += " emb " + std::to_string(max_abs_diff(h, ref.at("hidden.0")));
    for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
      h = model->layer(i).forward(h, tables, routing);
      const std::string key = "hidden." + std::to_string(i + 1);
      const torch::Tensor got = i + 1 < cfg.num_hidden_layers ? h : model->norm(h);
      per_layer += " L" + std::to_string(i) + (model->layer(i).is_moe() ? "(moe) " : "(dense) ") +
                   std::to_string(max_abs_diff(got, ref.at(key)));
    }
  }

  // The script's routing lines: how often group limiting and the -inf mask matter.
  std::string routing;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);)
    if (line.rfind("  layer", 0) == 0) routing += "            routing" + line.substr(1) + "\n";
  std::printf("[hf parity] %-16s max|dlogits| %.3e  |dloss| %.3e  (%lld HF tensors; logits max %.2f)\n"
              "            max|dh| per layer:%s\n%s",
              c.name.c_str(), err, loss_err, static_cast<long long>(loaded), ref_logits.abs().max().item<double>(),
              per_layer.c_str(), routing.c_str());
  EXPECT_LE(err, kLogitTol) << "case " << c.name;
  EXPECT_LE(loss_err, kLogitTol) << "case " << c.name;
  if (mtp) {
    // Depth 1: position i reads h_i and Emb(t_{i+1}) and predicts t_{i+2}.
    const double mtp_err = max_abs_diff(model->logits(fwd.mtp_hidden[0]), ref.at("mtp_logits"));
    std::printf("[hf parity] %-16s MTP depth 1 vs transformers' MtpLayer: max|dlogits| %.3e\n", c.name.c_str(), mtp_err);
    EXPECT_LE(mtp_err, kLogitTol) << "case " << c.name;
    // transformers builds no MTP module in DeepseekV3ForCausalLM and would report the
    // exported MTP layer as unexpected keys (it only ignores layer 61): the export
    // direction is covered by tests/test_hf_loader.cpp (HfMtp.SaveThenLoadIsExact).
    return;
  }

  // The export direction: moetrain writes the model back (save_hf_checkpoint) and
  // transformers' from_pretrained must load it with no missing or unexpected
  // tensors and give the same logits.
  const std::string exported = (fs::path(dir.path()) / "exported").string();
  save_hf_checkpoint(exported, *model, cfg);
  const std::string check = quoted(MOETRAIN_PYTHON) + " " + script + " --load " + quoted(exported) +
                            " --input " + quoted((fs::path(dir.path()) / "reference.safetensors").string());
  ASSERT_EQ(run_command(check, &out), 0) << check << "\n" << out;
  const double export_err =
      max_abs_diff(read_safetensors((fs::path(exported) / "logits.safetensors").string()).at("logits"), ref_logits);
  std::printf("[hf parity] %-16s exported, reloaded by transformers: max|dlogits| %.3e\n", c.name.c_str(),
              export_err);
  EXPECT_LE(export_err, kLogitTol) << "case " << c.name;
}

// The script's defaults: vocab 128, D 64, 3 layers (first dense), 4 heads,
// q_lora 32, kv_lora 32, nope 16, rope 8, v 16, 8 experts in 4 groups, 2 groups
// kept, top-2, 1 shared, routed_scaling_factor 2.5, norm_topk_prob, bias ~ U(-1.5, 0.5).
const ParityCase kCases[] = {
    // (a) group-limited routing; the second draws biases whose biased scores are
    // mostly negative, so masking dropped groups with -inf (not 0) changes choices.
    {"group_limited", R"({"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": true})", ""},
    {"negative_bias", R"({"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3})",
     "--bias-low=-2.0 --bias-high=0.0 --std 0.15 --seed 1"},
    // (b) plain q projection.
    {"q_lora_null", R"({"q_lora_rank": null})", "--seed 2"},
    // (c), (d) dense prefixes.
    {"dense_first_2", R"({"first_k_dense_replace": 2, "num_hidden_layers": 4})", "--seed 3"},
    {"dense_first_0", R"({"first_k_dense_replace": 0})", "--seed 4"},
    // (e) sharded checkpoint (model.safetensors.index.json + 5 shards).
    {"sharded", R"({})", "--max-shard-size 200KB --seed 5"},
    // transformers' fused expert layout (save_original_format=False).
    {"fused_experts", R"({})", "--fused-experts --seed 6"},
    // No groups, no normalization, several shared experts, top-3.
    {"ungrouped", R"({"n_group": 1, "topk_group": 1, "norm_topk_prob": false, "routed_scaling_factor": 1.0,
                      "n_shared_experts": 2, "num_experts_per_tok": 3})", "--seed 7"},
    // YaRN with mscale != mscale_all_dim (cos/sin attention factor != 1) and a
    // softmax mscale^2.
    {"yarn", R"({"max_position_embeddings": 256, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                 "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                 "mscale": 1.0, "mscale_all_dim": 0.707}})", "--seed 8 --seq 16"},
    // YaRN without mscale (HF's None: cos/sin scaled by mscale(factor)), theta 50000.
    {"yarn_no_mscale", R"({"max_position_embeddings": 512, "rope_parameters": {"rope_type": "yarn",
                           "rope_theta": 50000.0, "factor": 16.0, "original_max_position_embeddings": 32,
                           "mscale_all_dim": 1.0}})", "--seed 9"},
    // DeepSeek-V3's released form: legacy `rope_scaling` of type yarn, s = 40, β 32/1,
    // mscale = mscale_all_dim = 1 (softmax scale × 1.3689²), over 40 positions > the
    // original 16 (RoPE dims 8: frequencies on both sides of the ramp).
    {"yarn_v3_legacy", R"({"max_position_embeddings": 640, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn",
                           "factor": 40.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                           "mscale": 1.0, "mscale_all_dim": 1.0}})", "--seed 10 --seq 40"},
    // One MTP module (MoE block, layer index L = 3) against transformers' MtpLayer.
    {"mtp", R"({})", "--mtp --seed 12"},
    {"mtp_q_lora_null", R"({"q_lora_rank": null, "n_group": 1, "topk_group": 1})", "--mtp --seed 13 --seq 9"},
};

// `moetrain eval --hf DIR --tokens FILE` scores one sequence like transformers'
// labels=input_ids: mean next-token cross-entropy over positions 1..n-1.
TEST(HfEval, CommandMatchesTransformersLoss) {
  TempDir dir;
  const std::string script = quoted(std::string(MOETRAIN_SOURCE_DIR) + "/tests/python/make_hf_reference.py");
  const std::string overrides = (fs::path(dir.path()) / "overrides.json").string();
  std::ofstream(overrides) << "{}";
  std::string out;
  ASSERT_EQ(run_command(quoted(MOETRAIN_PYTHON) + " " + script + " --out " + quoted(dir.path()) + " --config @" +
                            quoted(overrides) + " --seed 11",
                        &out),
            0)
      << out;
  const SafetensorsFile ref = read_safetensors((fs::path(dir.path()) / "reference.safetensors").string());
  const torch::Tensor ids = ref.at("input_ids")[0];            // [T]
  const torch::Tensor logits = ref.at("logits")[0].to(torch::kDouble);  // [T, V]
  const int64_t n = ids.size(0);
  const double expected =
      torch::nn::functional::cross_entropy(logits.slice(0, 0, n - 1), ids.slice(0, 1, n)).item<double>();
  const std::string tokens = (fs::path(dir.path()) / "tokens.txt").string();
  {
    std::ofstream f(tokens);
    for (int64_t i = 0; i < n; ++i) f << ids[i].item<int64_t>() << (i + 1 < n ? " " : "\n");
  }
  ASSERT_EQ(run_command(quoted(MOETRAIN_BINARY) + " eval --hf " + quoted(dir.path()) + " --tokens " + quoted(tokens),
                        &out),
            0)
      << out;
  const std::string last = out.substr(out.rfind('{'));
  const auto j = nlohmann::json::parse(last);
  EXPECT_NEAR(j["loss"].get<double>(), expected, 1e-4) << out;
  EXPECT_EQ(j["tokens"].get<int64_t>(), n - 1);
  EXPECT_NEAR(j["ppl"].get<double>(), std::exp(expected), 1e-3 * std::exp(expected));
}

INSTANTIATE_TEST_SUITE_P(Cases, HfParity, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<ParityCase>& info) { return info.param.name; });

}  // namespace
}  // namespace moetrain
