// Strict YAML configs: malformed inputs each produce their specific message with
// file:line:col; base: inheritance, --set overrides and the YAML round trip.
#include <gtest/gtest.h>

#include <map>

#include "test_paths.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

using namespace moetrain;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;

namespace {

struct BadCase {
  const char* name;
  std::map<std::string, std::string> files;  // first entry "main.yaml" is loaded
  std::vector<std::string> overrides;
  std::vector<std::string> expect;  // substrings of the error text ("@" → the temp dir)
};

std::string load_error(const TempDir& dir, const BadCase& c) {
  for (const auto& [name, text] : c.files) write_file(dir.path() / name, text);
  try {
    load_experiment_config(dir.file("main.yaml"), c.overrides);
  } catch (const ConfigErrors& e) {
    return e.what();
  }
  return "<no error>";
}

const BadCase kBadCases[] = {
    {"typo_key", {{"main.yaml", "optim:\n  wamup_steps: 3\n"}}, {},
     {"main.yaml:2:3: optim.wamup_steps: unknown key (did you mean 'warmup_steps'?)"}},
    {"several_unknown_keys", {{"main.yaml", "model:\n  hiden_size: 3\n  num_layers: 2\ntrain:\n  stepz: 3\n"}}, {},
     {"main.yaml:2:3: model.hiden_size: unknown key (did you mean 'hidden_size'?)",
      "main.yaml:3:3: model.num_layers: unknown key", "main.yaml:5:3: train.stepz: unknown key (did you mean 'steps'?)"}},
    {"unknown_section", {{"main.yaml", "trian:\n  steps: 3\n"}}, {},
     {"main.yaml:1:1: trian: unknown section (did you mean 'train'?)"}},
    {"duplicate_key", {{"main.yaml", "train:\n  steps: 1\n  seed: 2\n  steps: 2\n"}}, {},
     {"main.yaml:4:3: duplicate key 'steps' (first defined at line 2)"}},
    {"wrong_type", {{"main.yaml", "train:\n  steps: abc\n"}}, {},
     {"main.yaml:2:10: train.steps: expected an integer, found 'abc'"}},
    {"float_for_int", {{"main.yaml", "train:\n  steps: 10.5\n"}}, {}, {"train.steps: expected an integer, found '10.5'"}},
    {"leading_zero_int", {{"main.yaml", "optim:\n  warmup_steps: 010\n"}}, {},
     {"optim.warmup_steps: expected an integer, found '010'"}},
    {"nan", {{"main.yaml", "optim:\n  lr: .nan\n"}}, {}, {"main.yaml:2:7: optim.lr: expected a finite number, found '.nan'"}},
    {"inf", {{"main.yaml", "model:\n  rope_theta: .inf\n"}}, {}, {"model.rope_theta: expected a finite number, found '.inf'"}},
    {"quoted_number", {{"main.yaml", "optim:\n  lr: \"1e-3\"\n"}}, {}, {"optim.lr: expected a number > 0, found '1e-3'"}},
    {"out_of_range", {{"main.yaml", "optim:\n  lr: -1.0\n"}}, {}, {"optim.lr: expected a number > 0, found -1.0"}},
    {"list_for_map", {{"main.yaml", "model: [1, 2]\n"}}, {}, {"main.yaml:1:8: model: expected a map of keys, found a list"}},
    {"map_for_scalar", {{"main.yaml", "train:\n  steps:\n    a: 1\n"}}, {}, {"train.steps: expected an integer, found a map"}},
    {"bad_bool", {{"main.yaml", "model:\n  norm_topk_prob: yes\n"}}, {},
     {"model.norm_topk_prob: expected true or false, found 'yes'"}},
    {"bad_choice", {{"main.yaml", "optim:\n  schedule: cosin\n"}}, {},
     {"optim.schedule: expected one of cosine|constant|multistep, found 'cosin' (did you mean 'cosine'?)"}},
    {"bad_strategy", {{"main.yaml", "balance:\n  strategy: [loss_fre]\n"}}, {},
     {"main.yaml:2:14: balance.strategy[0]: expected one of loss_free|aux_loss|seq_aux_loss|z_loss, found 'loss_fre'"}},
    {"topk_gt_experts", {{"main.yaml", "model:\n  n_routed_experts: 4\n  num_experts_per_tok: 6\n"}}, {},
     {"main.yaml:3:24: model.num_experts_per_tok: num_experts_per_tok (6) must be <= n_routed_experts (4)"}},
    {"experts_not_divisible_by_groups", {{"main.yaml", "model:\n  n_routed_experts: 10\n  n_group: 4\n"}}, {},
     {"model.n_group: n_routed_experts (10) must be divisible by n_group (4)"}},
    {"topk_group_gt_groups", {{"main.yaml", "model:\n  n_group: 2\n  topk_group: 3\n"}}, {},
     {"main.yaml:3:15: model.topk_group: topk_group (3) must be <= n_group (2)"}},
    {"head_dim_zero", {{"main.yaml", "model:\n  qk_nope_head_dim: 0\n"}}, {},
     {"model.qk_nope_head_dim: expected an integer >= 1, found 0"}},
    {"odd_rope_dim", {{"main.yaml", "model:\n  qk_rope_head_dim: 15\n"}}, {}, {"qk_rope_head_dim (15) must be even"}},
    {"warmup_gt_steps", {{"main.yaml", "train:\n  steps: 10\noptim:\n  warmup_steps: 20\n"}}, {},
     {"main.yaml:4:17: optim.warmup_steps: warmup_steps (20) must be <= train.steps (10)"}},
    {"default_breaks_rule", {{"main.yaml", "train:\n  steps: 10\n"}}, {},
     {"main.yaml: optim.warmup_steps: warmup_steps (100) must be <= train.steps (10) (the key is not set: its default applies)"}},
    {"batch_not_divisible", {{"main.yaml", "train:\n  global_batch: 10\n  micro_batch: 4\n"}}, {},
     {"train.global_batch: global_batch (10) must be divisible by micro_batch (4)"}},
    {"keep_last_one", {{"main.yaml", "checkpoint:\n  keep_last: 1\n"}}, {},
     {"checkpoint.keep_last: expected an integer >= 2, found 1"}},
    {"unknown_set_key", {{"main.yaml", "train:\n  steps: 10\n"}}, {"optim.lrr=1e-3"},
     {"--set 'optim.lrr=1e-3': optim.lrr: unknown key (did you mean 'lr'?)"}},
    {"bad_set_value", {{"main.yaml", "train:\n  steps: 10\n"}}, {"train.steps=ten"},
     {"--set 'train.steps=ten': train.steps: expected an integer, found 'ten'"}},
    {"malformed_set", {{"main.yaml", ""}}, {"trainsteps"}, {"--set 'trainsteps': expected section.key=value"}},
    {"missing_base", {{"main.yaml", "base: nope.yaml\n"}}, {}, {"main.yaml:1:7: base: base config", "nope.yaml' not found"}},
    {"cyclic_base", {{"main.yaml", "base: a.yaml\n"}, {"a.yaml", "base: b.yaml\n"}, {"b.yaml", "base: a.yaml\n"}}, {},
     {"b.yaml:1:7: base: `base:` inheritance cycle"}},
    {"yaml_syntax", {{"main.yaml", "train:\n  steps: [1, 2\n"}}, {}, {"main.yaml:", "YAML syntax error"}},
    {"alias", {{"main.yaml", "train: &t\n  steps: 3\noptim: *t\n"}}, {}, {"anchors (&name) are not supported"}},
    {"bf16_on_cpu", {{"main.yaml", "train:\n  dtype: bf16\n"}}, {}, {"train.dtype: bf16 autocast is for device cuda"}},
    {"cuda_graph_on_cpu", {{"main.yaml", "train:\n  cuda_graph: true\n"}}, {}, {"train.cuda_graph: CUDA graphs need train.device: cuda"}},
    {"bf16_moments_fp32_weights", {{"main.yaml", "optim:\n  moment_dtype: bf16\n"}}, {},
     {"optim.moment_dtype: bf16 moments are kept for bf16-stored weights"}},
    {"moment_dtype_unknown", {{"main.yaml", "optim:\n  moment_dtype: fp16\n"}}, {}, {"optim.moment_dtype"}},
    {"bf16_logits_fp32_compute", {{"main.yaml", "train:\n  logits_dtype: bf16\n"}}, {},
     {"train.logits_dtype: bf16 logits come from the bf16 head GEMM"}},
    {"logits_dtype_unknown", {{"main.yaml", "train:\n  logits_dtype: fp8\n"}}, {},
     {"main.yaml:2:17: train.logits_dtype: expected one of fp32|bf16, found 'fp8'"}},
    {"split_masters_fp32_weights", {{"main.yaml", "optim:\n  master_storage: split\n"}}, {},
     {"optim.master_storage: split masters are for bf16-stored weights with the replicated optimizer"}},
    {"cuda_graph_zero", {{"main.yaml", "train:\n  device: cuda\n  cuda_graph: true\ndistributed:\n  zero_stage: 1\n"}}, {},
     {"train.cuda_graph: CUDA graphs are for one process with the replicated optimizer"}},
};

class MalformedConfig : public ::testing::TestWithParam<BadCase> {};

TEST_P(MalformedConfig, ProducesItsSpecificMessage) {
  TempDir dir;
  const BadCase& c = GetParam();
  std::string err = load_error(dir, c);
  for (const auto& expected : c.expect) EXPECT_NE(err.find(expected), std::string::npos) << "expected: " << expected << "\ngot:\n" << err;
}

INSTANTIATE_TEST_SUITE_P(Table, MalformedConfig, ::testing::ValuesIn(kBadCases),
                         [](const ::testing::TestParamInfo<BadCase>& info) { return std::string(info.param.name); });

TEST(Config, ReportsEveryErrorAtOnce) {
  TempDir dir;
  write_file(dir.path() / "main.yaml", "model:\n  hiden_size: 3\ntrain:\n  steps: abc\n  seed: .nan\n");
  try {
    load_experiment_config(dir.file("main.yaml"));
    FAIL() << "no error";
  } catch (const ConfigErrors& e) {
    EXPECT_EQ(e.errors().size(), 3u) << e.what();
  }
}

TEST(Config, DefaultsWhenEmpty) {
  TempDir dir;
  write_file(dir.path() / "main.yaml", "");
  ExperimentConfig c = load_experiment_config(dir.file("main.yaml"));
  EXPECT_EQ(c.model.hidden_size, ModelConfig{}.hidden_size);
  EXPECT_EQ(c.balance.strategy, std::vector<std::string>{"loss_free"});
}

TEST(Config, BaseDeepMergesMapsAndReplacesLists) {
  TempDir dir;
  write_file(dir.path() / "sub/base.yaml",
             "model:\n  hidden_size: 64\n  num_hidden_layers: 3\nbalance:\n  strategy: [loss_free, z_loss]\n");
  write_file(dir.path() / "main.yaml", "base: sub/base.yaml\nmodel:\n  hidden_size: 96\nbalance:\n  strategy: [aux_loss]\n");
  ExperimentConfig c = load_experiment_config(dir.file("main.yaml"));
  EXPECT_EQ(c.model.hidden_size, 96);       // overridden
  EXPECT_EQ(c.model.num_hidden_layers, 3);  // inherited through the deep merge
  EXPECT_EQ(c.balance.strategy, std::vector<std::string>{"aux_loss"});  // lists replace
}

TEST(Config, ErrorsInABaseNameTheBaseFile) {
  TempDir dir;
  write_file(dir.path() / "base.yaml", "train:\n  stepz: 3\n");
  write_file(dir.path() / "main.yaml", "base: base.yaml\n");
  try {
    load_experiment_config(dir.file("main.yaml"));
    FAIL();
  } catch (const ConfigErrors& e) {
    EXPECT_NE(std::string(e.what()).find("base.yaml:2:3: train.stepz"), std::string::npos) << e.what();
  }
}

TEST(Config, SetOverridesScalarsAndLists) {
  TempDir dir;
  write_file(dir.path() / "main.yaml", "train:\n  steps: 10\noptim:\n  warmup_steps: 2\n");
  ExperimentConfig c = load_experiment_config(
      dir.file("main.yaml"),
      {"train.steps=20", "balance.strategy=loss_free,seq_aux_loss", "optim.lr=3e-4", "balance.bias_freeze_step=5"});
  EXPECT_EQ(c.train.steps, 20);
  EXPECT_EQ(c.balance.strategy, (std::vector<std::string>{"loss_free", "seq_aux_loss"}));
  EXPECT_DOUBLE_EQ(c.optim.lr, 3e-4);
  ASSERT_TRUE(c.balance.bias_freeze_step.has_value());
  EXPECT_EQ(*c.balance.bias_freeze_step, 5);
  ExperimentConfig none = load_experiment_config(dir.file("main.yaml"), {"balance.strategy="});
  EXPECT_TRUE(none.balance.strategy.empty());
}

TEST(Config, YamlRoundTripIsExact) {
  for (const char* name : {"debug", "tiny", "bench-1b", "deepseek-v3-671b"}) {
    std::string path = std::string(MOETRAIN_SOURCE_DIR) + "/configs/" + name + ".yaml";
    ExperimentConfig a = load_experiment_config(path);
    TempDir dir;
    write_file(dir.path() / "resolved.yaml", config_to_yaml(a));
    ExperimentConfig b = load_experiment_config(dir.file("resolved.yaml"));
    EXPECT_EQ(config_to_yaml(a), config_to_yaml(b)) << name;
    EXPECT_EQ(config_hash(a), config_hash(b)) << name;
  }
}

TEST(Config, RopeScalingNullOrYarn) {
  TempDir dir;
  write_file(dir.path() / "main.yaml",
             "model:\n  max_position_embeddings: 8192\n  rope_scaling:\n    type: yarn\n    factor: 4.0\n"
             "    original_max_position_embeddings: 2048\n");
  ExperimentConfig c = load_experiment_config(dir.file("main.yaml"));
  EXPECT_TRUE(c.model.rope_scaling.enabled);
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 4.0);
  write_file(dir.path() / "null.yaml", "model:\n  rope_scaling: null\n");
  EXPECT_FALSE(load_experiment_config(dir.file("null.yaml")).model.rope_scaling.enabled);
}

}  // namespace
