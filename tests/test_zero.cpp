// ZeRO-1 (trainer/zero.h, distributed.zero_stage: 1) on the CPU over Gloo: the shard layout,
// the sharded AdamW against the replicated one (two ranks as threads), 2 and 4 ranks of
// `moetrain launch` training what one process trains, and sharded checkpoints resuming at
// another world size (4 ranks, 1 process, stage 0) or rejected when a shard is missing.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "test_paths.h"
#include "dist_test_util.h"
#include "test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/distributed.h"
#include "trainer/experiment_config.h"
#include "trainer/master_weights.h"
#include "trainer/optim.h"
#include "trainer/trainer.h"
#include "trainer/zero.h"

using namespace moetrain;
using moetrain::testing::run_capture;
using moetrain::testing::debug_cli;
using moetrain::testing::debug_config_path;
using moetrain::testing::launch_tiny_sets;
using moetrain::testing::run_ranks;
using moetrain::testing::train_records;
using moetrain::testing::write_sentence_corpus;
using moetrain::testing::TempDir;

namespace {

// --- the layout -------------------------------------------------------------------------

TEST(ZeroLayout, EvenShardsAndParameterFragments) {
  // 5 + 3 + 0 + 7 = 15 elements over 4 ranks: S = 4, the last shard padded by one
  ZeroShardLayout l = zero_shard_layout({5, 3, 0, 7}, 4);
  EXPECT_EQ(l.numel, 15);
  EXPECT_EQ(l.shard_numel, 4);
  EXPECT_EQ(l.offsets, (std::vector<int64_t>{0, 5, 8, 8}));
  auto f0 = l.fragments(0), f1 = l.fragments(1), f2 = l.fragments(2), f3 = l.fragments(3);
  ASSERT_EQ(f0.size(), 1u);
  EXPECT_EQ(f0[0].param, 0);
  EXPECT_EQ(f0[0].begin, 0);
  EXPECT_EQ(f0[0].end, 4);
  EXPECT_EQ(f0[0].shard_offset, 0);
  ASSERT_EQ(f1.size(), 2u);  // the tail of parameter 0, all of parameter 1
  EXPECT_EQ(f1[0].param, 0);
  EXPECT_EQ(f1[0].begin, 4);
  EXPECT_EQ(f1[0].end, 5);
  EXPECT_EQ(f1[0].shard_offset, 0);
  EXPECT_EQ(f1[1].param, 1);
  EXPECT_EQ(f1[1].begin, 0);
  EXPECT_EQ(f1[1].end, 3);
  EXPECT_EQ(f1[1].shard_offset, 1);
  ASSERT_EQ(f2.size(), 1u);  // the empty parameter 2 has no fragment anywhere
  EXPECT_EQ(f2[0].param, 3);
  EXPECT_EQ(f2[0].begin, 0);
  EXPECT_EQ(f2[0].end, 4);
  ASSERT_EQ(f3.size(), 1u);
  EXPECT_EQ(f3[0].param, 3);
  EXPECT_EQ(f3[0].begin, 4);
  EXPECT_EQ(f3[0].end, 7);
  EXPECT_EQ(f3[0].shard_offset, 0);

  // every element of every parameter is owned exactly once, for several world sizes
  for (int64_t world : {1, 2, 3, 4, 7, 16, 40}) {
    std::vector<int64_t> numels{17, 1, 64, 0, 33, 5};
    ZeroShardLayout lw = zero_shard_layout(numels, world);
    EXPECT_GE(lw.shard_numel * world, lw.numel);
    EXPECT_LT(lw.shard_numel * world - lw.numel, world);
    std::vector<std::vector<int>> owned(numels.size());
    for (size_t i = 0; i < numels.size(); ++i) owned[i].assign(static_cast<size_t>(numels[i]), 0);
    for (int64_t r = 0; r < world; ++r)
      for (const auto& f : lw.fragments(r)) {
        EXPECT_LE(f.shard_offset + (f.end - f.begin), lw.shard_numel);
        EXPECT_EQ(r * lw.shard_numel + f.shard_offset, lw.offsets[f.param] + f.begin) << "flat position";
        for (int64_t e = f.begin; e < f.end; ++e) ++owned[f.param][e];
      }
    for (size_t i = 0; i < numels.size(); ++i)
      for (int c : owned[i]) EXPECT_EQ(c, 1) << "world " << world << " parameter " << i;
  }
  EXPECT_EQ(zero_shard_file_name(1, 4), "optimizer-zero-00001-of-00004.safetensors");
}

// --- the optimizer against AdamW, two ranks as threads -------------------------------------

TEST(ZeroCollectives, ReduceScatterAndAllGather) {
  constexpr int kWorld = 3;
  std::vector<torch::Tensor> shards(kWorld), gathered(kWorld), shards64(kWorld);
  const std::string errors = run_ranks(kWorld, [&](int64_t, ProcessGroup& pg) {
    const auto r = static_cast<size_t>(pg.rank());
    const double k = static_cast<double>(pg.rank() + 1);
    shards[r] = torch::empty({4});
    pg.reduce_scatter(shards[r], torch::arange(12, torch::kFloat) * k);  // Σ k = 6
    shards64[r] = torch::empty({2}, torch::kFloat64);
    pg.reduce_scatter(shards64[r], torch::ones({6}, torch::kFloat64) * k);
    gathered[r] = torch::empty({kWorld * 2});
    pg.all_gather(gathered[r], torch::full({2}, k));
  });
  ASSERT_EQ(errors, "");
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_TRUE(torch::equal(shards[r], torch::arange(4 * r, 4 * r + 4, torch::kFloat) * 6)) << r << shards[r];
    EXPECT_TRUE(torch::equal(shards64[r], torch::full({2}, 6.0, torch::kFloat64))) << r;
    EXPECT_TRUE(torch::equal(gathered[r], torch::tensor({1.f, 1.f, 2.f, 2.f, 3.f, 3.f}))) << r << gathered[r];
  }
  // world size 1: copies
  ProcessGroup one(DistEnv{}, "gloo", std::chrono::seconds(1));
  torch::Tensor s = torch::empty({3});
  one.reduce_scatter(s, torch::arange(3, torch::kFloat));
  EXPECT_TRUE(torch::equal(s, torch::arange(3, torch::kFloat)));
}

// Parameters of a toy model: 2-D (decayed) and 1-D (not), sizes that straddle shards. It
// seeds the global generator: call it before run_ranks, never from the rank threads (they
// would race on the generator and draw different values).
std::vector<std::pair<std::string, torch::Tensor>> toy_params() {
  torch::manual_seed(3);
  return {{"w1", torch::randn({7, 5}).requires_grad_()},
          {"norm", torch::randn({5}).requires_grad_()},
          {"w2", torch::randn({3, 11}).requires_grad_()},
          {"unused", torch::randn({4}).requires_grad_()},   // never a gradient: no state, no decay
          {"sometimes", torch::randn({2, 3}).requires_grad_()}};  // a gradient on rank 0 only
}

// Rank r's gradient of parameter i at step s (deterministic).
torch::Tensor toy_grad(const torch::Tensor& p, int64_t rank, int64_t i, int64_t s) {
  return torch::sin(torch::arange(p.numel(), torch::kFloat) * (0.3 + 0.1 * static_cast<double>(i)) +
                    static_cast<double>(s + 7 * rank))
      .view(p.sizes());
}

OptimConfig toy_optim() {
  OptimConfig o;
  o.lr = 0.05;
  o.weight_decay = 0.1;
  o.betas = {0.9, 0.95};
  o.eps = 1e-8;
  return o;
}

// Rank `rank`'s gradients at step s in each parameter's dtype ("unused" never has one,
// "sometimes" only on rank 0).
void set_toy_grads(std::vector<std::pair<std::string, torch::Tensor>>& params, int64_t rank, int64_t s) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto& [name, p] = params[i];
    if (name == "unused" || (name == "sometimes" && rank == 1)) continue;
    p.mutable_grad() = toy_grad(p, rank, static_cast<int64_t>(i), s).to(p.scalar_type());
  }
}

// The reference's gradients: the two ranks' average as the reduction computes it (summed in
// each parameter's dtype, zeros where rank 1 has none, halved: exact in bf16 too).
void set_toy_mean_grads(std::vector<std::pair<std::string, torch::Tensor>>& params, int64_t s) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto& [name, p] = params[i];
    if (name == "unused") continue;
    const auto dtype = p.scalar_type();
    torch::Tensor g = toy_grad(p, 0, static_cast<int64_t>(i), s).to(dtype);
    if (name != "sometimes") g = g + toy_grad(p, 1, static_cast<int64_t>(i), s).to(dtype);
    p.mutable_grad() = g / 2.0;
  }
}

TEST(ZeroAdamW, TwoRanksStepLikeReplicatedAdamW) {
  constexpr int kSteps = 4;
  const double kClip = 1.5;
  // the reference: one process, averaged gradients, torch AdamW groups as build_optimizer makes them
  auto ref = toy_params();
  torch::nn::Module holder;
  for (auto& [n, p] : ref) holder.register_parameter(n, p);
  auto adamw = build_optimizer(holder, toy_optim());
  std::vector<double> ref_norms;
  for (int s = 0; s < kSteps; ++s) {
    adamw->zero_grad();
    set_toy_mean_grads(ref, s);
    ref_norms.push_back(torch::nn::utils::clip_grad_norm_(holder.parameters(), kClip));
    adamw->step();
  }

  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> params(2);
  std::vector<std::vector<double>> norms(2);
  std::vector<std::vector<int64_t>> steps(2);
  std::vector<int64_t> state_bytes(2);
  for (auto& p : params) p = toy_params();
  const std::string errors = run_ranks(2, [&](int64_t, ProcessGroup& pg) {
    const int64_t rank = pg.rank();
    auto& mine = params[static_cast<size_t>(rank)];
    ZeroAdamW opt(mine, toy_optim(), pg);
    for (int s = 0; s < kSteps; ++s) {
      set_toy_grads(mine, rank, s);
      opt.reduce_gradients();
      norms[static_cast<size_t>(rank)].push_back(opt.clip_grad_norm(kClip));
      opt.step();
    }
    steps[static_cast<size_t>(rank)] = opt.steps();
    state_bytes[static_cast<size_t>(rank)] = opt.state_bytes();
  });
  ASSERT_EQ(errors, "");
  for (int rank = 0; rank < 2; ++rank) {
    for (int s = 0; s < kSteps; ++s) EXPECT_NEAR(norms[rank][s], ref_norms[s], 1e-5 * ref_norms[s]) << "step " << s;
    EXPECT_EQ(steps[rank], (std::vector<int64_t>{kSteps, kSteps, kSteps, 0, kSteps}));
    for (size_t i = 0; i < ref.size(); ++i) {
      const auto& a = ref[i].second;
      const auto& b = params[rank][i].second;
      const double err = (a - b).abs().max().item<double>();
      EXPECT_LT(err, 1e-6) << ref[i].first << " on rank " << rank;
    }
    EXPECT_TRUE(torch::equal(params[rank][3].second, ref[3].second)) << "an unused parameter is not decayed";
  }
  // 35 + 5 + 33 + 4 + 6 = 83 elements: S = 42 per rank, 3 buffers (grad, exp_avg, exp_avg_sq)
  EXPECT_EQ(state_bytes[0], 3 * 42 * 4);
}

// train.param_dtype bf16: the matrices' fp32 masters sharded with the moments, bf16 gradients
// reduce-scattered, bf16 weights all-gathered — against the replicated MasterWeights fed the
// bf16 sum of the two ranks' gradients (what the reduce-scatter computes), halved.
// moments: optim.moment_dtype (bf16: both sides round the same fp32 arithmetic's moments).
void bf16_weights_shard_the_masters_like_replicated_masters(const std::string& moments) {
  constexpr int kSteps = 4;
  const double kClip = 1.5;
  OptimConfig optim = toy_optim();
  optim.moment_dtype = moments;
  const auto moment_dtype = moments == "bf16" ? torch::kBFloat16 : torch::kFloat;
  auto ref = toy_params();
  torch::nn::Module holder;
  for (auto& [n, p] : ref) holder.register_parameter(n, p);
  auto adamw = build_optimizer(holder, optim);
  MasterWeights ref_masters(bf16_weight_params(holder), moment_dtype);  // w1, w2, sometimes
  for (int s = 0; s < kSteps; ++s) {
    adamw->zero_grad();
    set_toy_mean_grads(ref, s);
    adamw->clip_next_step(grad_norm(holder.parameters()), kClip);
    ref_masters.step(*adamw);
  }

  std::vector<std::vector<torch::Tensor>> full(2), bf16(2);
  std::vector<int64_t> state_bytes(2);
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> params = {toy_params(), toy_params()};
  const std::string errors = run_ranks(2, [&](int64_t, ProcessGroup& pg) {
    const int64_t rank = pg.rank();
    auto& mine = params[static_cast<size_t>(rank)];
    ZeroAdamW opt(mine, optim, pg, /*bf16_weights=*/true);
    opt.use_bf16_params();
    for (int s = 0; s < kSteps; ++s) {
      set_toy_grads(mine, rank, s);
      opt.reduce_gradients();
      opt.clip_grad_norm(kClip);
      opt.step();
    }
    for (const auto& [n, p] : mine) bf16[static_cast<size_t>(rank)].push_back(p.detach().clone());
    const auto swap = opt.expose_masters();
    for (const auto& [n, p] : mine) full[static_cast<size_t>(rank)].push_back(p.detach().clone());
    state_bytes[static_cast<size_t>(rank)] = opt.state_bytes();
  });
  ASSERT_EQ(errors, "");
  const std::vector<size_t> matrices = {0, 2, 4};
  for (int rank = 0; rank < 2; ++rank) {
    for (size_t k = 0; k < matrices.size(); ++k) {
      const size_t i = matrices[k];
      EXPECT_EQ(bf16[rank][i].scalar_type(), torch::kBFloat16) << ref[i].first;
      EXPECT_EQ(full[rank][i].scalar_type(), torch::kFloat) << ref[i].first << ": exposed as the fp32 master";
      // bf16 moments: an fp32 ulp between the reduce-scattered and the summed gradients can
      // flip a moment's rounding, moving that element's update by ≈ lr · 2^-8
      const double tol = moments == "bf16" ? 1e-3 : 1e-5;
      EXPECT_TRUE(torch::allclose(full[rank][i], ref_masters.masters()[k], tol, tol / 10)) << ref[i].first << " rank " << rank;
      EXPECT_TRUE(torch::equal(bf16[rank][i], full[rank][i].to(torch::kBFloat16))) << ref[i].first;
    }
    EXPECT_TRUE(torch::allclose(full[rank][1], ref[1].second.detach(), 1e-5, 1e-6)) << "the fp32 norm";
    EXPECT_TRUE(torch::equal(full[rank][3], ref[3].second.detach())) << "an unused parameter is not decayed";
  }
  // matrices 35 + 33 + 6 = 74 elements: S = 37 per rank, 4 buffers (grad, exp_avg, exp_avg_sq,
  // master; the moments 2 bytes each in bf16); norms 5 + 4 = 9: S = 5, 3 buffers
  const int64_t moment_bytes = moments == "bf16" ? 2 : 4;
  EXPECT_EQ(state_bytes[0], (2 * 37 + 3 * 5) * 4 + 2 * 37 * moment_bytes);
}

TEST(ZeroAdamW, Bf16WeightsShardTheMastersLikeReplicatedMasters) {
  bf16_weights_shard_the_masters_like_replicated_masters("fp32");
}

TEST(ZeroAdamW, Bf16MomentsShardLikeReplicatedBf16Moments) {
  bf16_weights_shard_the_masters_like_replicated_masters("bf16");
}

// --- training through `moetrain launch` --------------------------------------------------------

// The tiny launched model (tests/dist_test_util.h) with clipping and the given ZeRO stage.
std::vector<std::string> tiny_sets(const TempDir& dir, const std::string& run, int steps, int zero_stage) {
  std::vector<std::string> sets = launch_tiny_sets(dir, run, steps);
  sets.insert(sets.end(), {"optim.grad_clip=0.5", "distributed.zero_stage=" + std::to_string(zero_stage), "checkpoint.keep_last=5"});
  return sets;
}

// Steps [first, first + n) of `one` against the n records of `many` (losses to float rounding,
// biases identical for the first two compared steps, then within a few γ).
void expect_same_training(const std::vector<nlohmann::json>& one, const std::vector<nlohmann::json>& many,
                          size_t first = 0) {
  ASSERT_GT(one.size(), first);
  ASSERT_EQ(many.size(), one.size() - first);
  double max_rel = 0;
  for (size_t k = 0; k < many.size(); ++k) {
    const auto& a = one[first + k];
    const auto& b = many[k];
    ASSERT_EQ(a["step"], b["step"]);
    const double la = a["loss"], lb = b["loss"];
    max_rel = std::max(max_rel, std::abs(la - lb) / std::abs(la));
    EXPECT_NEAR(la, lb, 1e-5 * std::abs(la)) << "step " << a["step"];
    EXPECT_NEAR(a["grad_norm"].get<double>(), b["grad_norm"].get<double>(), 1e-4 * a["grad_norm"].get<double>())
        << "step " << a["step"];
    const auto ba = a["bias"][0].get<std::vector<double>>(), bb = b["bias"][0].get<std::vector<double>>();
    ASSERT_EQ(ba.size(), bb.size());
    for (size_t e = 0; e < ba.size(); ++e) {
      if (k < 2)
        EXPECT_EQ(ba[e], bb[e]) << "step " << a["step"] << " expert " << e;
      else
        EXPECT_NEAR(ba[e], bb[e], 4e-3) << "step " << a["step"] << " expert " << e;
    }
  }
  std::cerr << "max relative loss difference " << max_rel << "\n";
}

class Zero : public moetrain::testing::LaunchedTraining {
 protected:
  void SetUp() override { prepare(tiny_sets(dir_, "prep", 8, 0)); }
};

TEST_F(Zero, TwoAndFourRanksTrainLikeOneProcess) {
  constexpr int kSteps = 5;
  train(load_experiment_config(debug_config_path(), tiny_sets(dir_, "single", kSteps, 0)));  // replicated, 1 process
  auto r = launch(2, tiny_sets(dir_, "z2", kSteps, 1));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_training(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("z2/metrics.jsonl")));
  r = launch(4, tiny_sets(dir_, "z4", kSteps, 1));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_training(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("z4/metrics.jsonl")));
  // one optimizer shard per rank in the checkpoint, listed in its MANIFEST
  const std::string ck = dir_.file("z4/ckpt/step-00000005");
  for (int rank = 0; rank < 4; ++rank) EXPECT_TRUE(std::filesystem::exists(ck + "/" + zero_shard_file_name(rank, 4)));
  EXPECT_FALSE(std::filesystem::exists(ck + "/optimizer.safetensors"));
  std::ifstream m(ck + "/MANIFEST");
  std::string manifest((std::istreambuf_iterator<char>(m)), std::istreambuf_iterator<char>());
  EXPECT_NE(manifest.find(zero_shard_file_name(3, 4)), std::string::npos) << manifest;
}

// A checkpoint written by 2 ZeRO ranks at step 3 resumes at 4 ranks, at 1 process (ZeRO and
// replicated) with the losses of the uninterrupted run; a missing shard is rejected.
TEST_F(Zero, CheckpointResumesAtAnotherWorldSize) {
  constexpr int kSteps = 6;
  train(load_experiment_config(debug_config_path(), tiny_sets(dir_, "single", kSteps, 0)));
  auto sets = tiny_sets(dir_, "z2", kSteps, 1);
  sets.push_back("checkpoint.every=3");
  auto r = launch(2, sets);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto single = train_records(dir_.file("single/metrics.jsonl"));
  expect_same_training(single, train_records(dir_.file("z2/metrics.jsonl")));
  const std::string ck = dir_.file("z2/ckpt/step-00000003");
  ASSERT_TRUE(std::filesystem::exists(ck + "/" + zero_shard_file_name(1, 2))) << r.output;

  r = launch(4, tiny_sets(dir_, "z4", kSteps, 1), " --resume " + ck);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_training(single, train_records(dir_.file("z4/metrics.jsonl")), 3);

  for (int stage : {1, 0}) {
    const std::string run = fmt::format("one{}", stage);
    TrainOptions opt;
    opt.resume = ck;
    TrainResult res = train(load_experiment_config(debug_config_path(), tiny_sets(dir_, run, kSteps, stage)), opt);
    EXPECT_EQ(res.resumed_step, 3);
    expect_same_training(single, train_records(dir_.file(run + "/metrics.jsonl")), 3);
  }

  // a shard gone: the checkpoint is incomplete, and the reason names the file
  std::filesystem::remove(ck + "/" + zero_shard_file_name(1, 2));
  try {
    verify_manifest(ck);
    FAIL() << "a checkpoint without its shard 1 verified";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(zero_shard_file_name(1, 2) + " is missing"), std::string::npos) << e.what();
  }
}

// `moetrain bench` under launch: data parallel with the replicated and the sharded optimizer.
TEST(ZeroBench, DataParallelBenchRunsBothStages) {
  for (int stage : {0, 1}) {
    auto r = run_capture(fmt::format(
        "OMP_NUM_THREADS=1 {} launch --nproc 2 -- bench {}/configs/debug.yaml --steps 2 --warmup 1 --set train.threads=1 "
        "--set train.global_batch=4 --set train.micro_batch=1 --set train.seq_len=16 --set distributed.zero_stage={} "
        "--set distributed.timeout_s=60",
        MOETRAIN_BINARY, MOETRAIN_SOURCE_DIR, stage));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto j = nlohmann::json::parse(r.output.substr(r.output.rfind('{')));
    EXPECT_EQ(j["world_size"], 2) << stage;
    EXPECT_EQ(j["zero_stage"], stage);
    EXPECT_EQ(j["tokens_per_step"], 64);
    EXPECT_NEAR(j["tokens_per_s_per_gpu"].get<double>(), j["tokens_per_s"].get<double>() / 2, 1e-6);
    EXPECT_TRUE(std::isfinite(j["loss"].get<double>()));
  }
}

}  // namespace
