// train.param_dtype bf16 (trainer/master_weights.h) on the CPU: ParamSwap keeps the
// parameters' identity; MasterWeights steps exactly like AdamW on fp32 copies fed the same
// (bf16) gradients, clipping included, and leaves the params the bf16 rounding of the
// masters; a checkpoint saved inside expose() holds the fp32 masters and loads back into an
// fp32 model exactly. (The ZeRO-1 sharding of the masters: tests/test_zero.cpp; whole bf16
// runs on a GPU: tests/test_dist_cuda.cpp.)
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "io/safetensors.h"
#include "models/kernels/master_adamw_kernels.h"
#include "models/transformer.h"
#include "test_paths.h"
#include "test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/experiment_config.h"
#include "trainer/master_weights.h"
#include "trainer/optim.h"

using namespace moetrain;
using moetrain::testing::TempDir;

namespace {

// Two matrices and a norm, as the model has them; fp32 until MasterWeights casts them.
struct Toy : torch::nn::Module {
  Toy() {
    torch::manual_seed(5);
    w1 = register_parameter("w1", torch::randn({7, 5}));
    norm = register_parameter("norm", torch::randn({5}));
    w2 = register_parameter("w2", torch::randn({3, 11}));
  }
  torch::Tensor w1, norm, w2;
};

OptimConfig toy_optim() {
  OptimConfig o;
  o.lr = 0.05;
  o.weight_decay = 0.1;
  o.betas = {0.9, 0.95};
  return o;
}

torch::Tensor toy_grad(const torch::Tensor& p, int64_t i, int64_t s) {
  return torch::cos(torch::arange(p.numel(), torch::kFloat) * (0.2 + 0.1 * static_cast<double>(i)) + static_cast<double>(s))
      .view(p.sizes());
}

TEST(ParamSwap, SwapsDataKeepsIdentityAndRestores) {
  Toy toy;
  const auto* impl = toy.w1.unsafeGetTensorImpl();
  const torch::Tensor before = toy.w1.detach().clone();
  const torch::Tensor other = torch::full({7, 5}, 2.0, torch::kDouble);
  {
    ParamSwap swap({toy.w1}, {other});
    EXPECT_EQ(toy.w1.unsafeGetTensorImpl(), impl);
    EXPECT_EQ(toy.w1.scalar_type(), torch::kDouble);
    EXPECT_TRUE(torch::equal(toy.w1.detach(), other));
    EXPECT_TRUE(toy.w1.requires_grad());
  }
  EXPECT_EQ(toy.w1.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(toy.w1.detach(), before));
  EXPECT_THROW(ParamSwap({toy.w1}, {torch::zeros({5, 7})}), c10::Error);
}

TEST(MasterWeights, CastsMatricesOnlyAndKeepsTheirFp32Values) {
  Toy toy;
  const torch::Tensor w1 = toy.w1.detach().clone(), norm = toy.norm.detach().clone();
  MasterWeights masters(bf16_weight_params(toy));
  EXPECT_EQ(toy.w1.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(toy.w2.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(toy.norm.scalar_type(), torch::kFloat) << "1-D norm weights stay fp32";
  ASSERT_EQ(masters.masters().size(), 2u);
  EXPECT_TRUE(torch::equal(masters.masters()[0], w1));
  EXPECT_TRUE(torch::equal(toy.w1.detach(), w1.to(torch::kBFloat16)));
  EXPECT_TRUE(torch::equal(toy.norm.detach(), norm));
  EXPECT_EQ(masters.bytes(), (7 * 5 + 3 * 11) * 4);
}

// The twin: torch AdamW (build_optimizer's groups) on fp32 copies, given the bf16 gradients
// upcast, clipped by the same global norm.
// A step-1 checkpoint saved inside expose(), as the trainer saves one (the fp32 masters).
std::string save_inside_expose(const ExperimentConfig& cfg, Transformer& model, FusedAdamW& opt,
                               const MasterWeights& masters) {
  TrainingState state;
  state.step = 1;
  const auto swap = masters.expose();
  return save_checkpoint(cfg, model, opt, state);
}

TEST(MasterWeights, StepsLikeAdamWOnFp32Copies) {
  constexpr double kClip = 2.0;
  Toy toy, ref;  // same seed: same values
  MasterWeights masters(bf16_weight_params(toy));
  auto opt = build_optimizer(toy, toy_optim());
  auto ref_opt = build_optimizer(ref, toy_optim());
  std::vector<torch::Tensor> ps = toy.parameters(), rs = ref.parameters();
  for (int s = 0; s < 5; ++s) {
    opt->zero_grad();
    ref_opt->zero_grad();
    torch::Tensor w1_grad;
    for (size_t i = 0; i < ps.size(); ++i) {
      if (s == 0 && i == 2) continue;  // w2 has no gradient in the first step: no state, no decay
      const torch::Tensor g = toy_grad(ps[i], static_cast<int64_t>(i), s).to(ps[i].scalar_type()).clone();
      ps[i].mutable_grad() = g;
      if (i == 0) w1_grad = g.clone();
      rs[i].mutable_grad() = g.to(torch::kFloat).clone();  // the CPU clip divides in place
    }
    opt->clip_next_step(grad_norm(ps), kClip);  // the norm of the bf16 gradients, fp32-accumulated
    ref_opt->clip_next_step(grad_norm(rs), kClip);
    masters.step(*opt);
    ref_opt->step();
    // the bf16 gradients stay with their parameters, untouched (a captured backward rewrites them)
    ASSERT_TRUE(toy.w1.grad().defined());
    EXPECT_TRUE(torch::equal(toy.w1.grad(), w1_grad));
  }
  EXPECT_TRUE(torch::allclose(masters.masters()[0], ref.w1.detach(), 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(masters.masters()[1], ref.w2.detach(), 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(toy.norm.detach(), ref.norm.detach(), 1e-6, 1e-7));
  EXPECT_TRUE(torch::equal(toy.w1.detach(), masters.masters()[0].to(torch::kBFloat16)));
  EXPECT_TRUE(torch::equal(toy.w2.detach(), masters.masters()[1].to(torch::kBFloat16)));
  EXPECT_EQ(toy.w1.scalar_type(), torch::kBFloat16);
  // the optimizer state is fp32 and keyed by the model's own parameters
  const auto& st = static_cast<torch::optim::AdamWParamState&>(*opt->state().at(toy.w1.unsafeGetTensorImpl()));
  EXPECT_EQ(st.exp_avg().scalar_type(), torch::kFloat);
  EXPECT_EQ(st.step(), 5);
}

// optim.master_storage split: the fp32 master as its bf16 weight (round to nearest even) and
// an int16 remainder. Exact for every value but the exact ties rounded down (stored one ulp
// lower, still rounding to the same weight): random values over 2⁻¹³⁰..2¹²⁰, ±0, subnormals,
// ties both ways, values rounding up across a power of two. The ATen codec agrees with the
// kernel's (master_adamw_kernels.h) bit for bit.
TEST(MasterWeights, SplitMasterRemainderJoinsBackExactly) {
  torch::manual_seed(9);
  std::vector<uint32_t> bits;
  const torch::Tensor random = torch::randint(0, 1LL << 32, {20000}, torch::kLong);
  for (int64_t i = 0; i < random.numel(); ++i) {
    const auto b = static_cast<uint32_t>(random[i].item<int64_t>());
    if (((b >> 23) & 0xff) < 0xf8) bits.push_back(b);  // finite, below 2¹²⁰ (no bf16 overflow)
  }
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t b : {0x00000000u, 0x00000001u, 0x007fffffu, 0x3f800000u, 0x3f808000u, 0x3f818000u, 0x3f7fffffu,
                       0x3f7f8000u, 0x3f7f8001u, 0x3f80ffffu, 0x40ff8000u})
      bits.push_back(b | sign);
  }
  const auto n = static_cast<int64_t>(bits.size());
  torch::Tensor as_int = torch::empty({n}, torch::kInt32);
  for (int64_t i = 0; i < n; ++i) as_int[i] = static_cast<int32_t>(bits[static_cast<size_t>(i)]);
  const torch::Tensor m = as_int.view(torch::kFloat);
  const torch::Tensor w = m.to(torch::kBFloat16);
  const torch::Tensor lo = split_master_remainder(m);
  ASSERT_EQ(lo.scalar_type(), torch::kInt16);
  const torch::Tensor joined = join_split_master(w, lo);
  int64_t ties_down = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = bits[static_cast<size_t>(i)];
    const auto w_bits = static_cast<uint16_t>(w.view(torch::kInt16)[i].item<int16_t>());
    const auto l = lo[i].item<int16_t>();
    EXPECT_EQ(l, kernels::split_master_lo(b, w_bits)) << std::hex << b;
    const auto got = static_cast<uint32_t>(joined.view(torch::kInt32)[i].item<int32_t>());
    EXPECT_EQ(got, kernels::join_master_bits(w_bits, l)) << std::hex << b;
    const bool tie_down = b - (static_cast<uint32_t>(w_bits) << 16) == 0x8000u;
    ties_down += tie_down;
    EXPECT_EQ(got, tie_down ? b - 1 : b) << std::hex << b;  // exact, or one ulp lower at a tie
    // the joined master rounds to the same weight
    EXPECT_EQ(joined[i].to(torch::kBFloat16).view(torch::kInt16).item<int16_t>(), static_cast<int16_t>(w_bits));
  }
  EXPECT_GE(ties_down, 2);  // 0x3f808000 and its negative: 1.0 + half an ulp rounds to even 1.0
}

// A split-master run steps like an fp32-master run: the same weights and masters after five
// steps (the reference path here; the fused kernel against it: tests/test_cuda_paths.cpp).
TEST(MasterWeights, SplitMastersStepLikeFp32Masters) {
  Toy toy, ref;
  MasterWeights masters(bf16_weight_params(toy), torch::kBFloat16, /*split=*/true);
  MasterWeights ref_masters(bf16_weight_params(ref), torch::kBFloat16);
  EXPECT_EQ(masters.bytes() * 2, ref_masters.bytes());
  auto opt = build_optimizer(toy, toy_optim());
  auto ref_opt = build_optimizer(ref, toy_optim());
  std::vector<torch::Tensor> ps = toy.parameters(), rs = ref.parameters();
  for (int s = 0; s < 5; ++s) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const torch::Tensor g = toy_grad(ps[i], static_cast<int64_t>(i), s).to(ps[i].scalar_type());
      ps[i].mutable_grad() = g.clone();
      rs[i].mutable_grad() = g.clone();
    }
    masters.step(*opt, /*fused=*/false);
    ref_masters.step(*ref_opt, /*fused=*/false);
  }
  const auto got = masters.masters(), want = ref_masters.masters();
  for (size_t k = 0; k < 2; ++k) {
    // one ulp apart at most, where a tie was rounded down on the way (none expected here)
    EXPECT_LE((got[k].view(torch::kInt32) - want[k].view(torch::kInt32)).abs().max().item<int32_t>(), 1) << k;
    EXPECT_TRUE(torch::equal(ps[k == 0 ? 0 : 2], rs[k == 0 ? 0 : 2])) << k;  // the bf16 weights
  }
  EXPECT_TRUE(torch::equal(toy.norm, ref.norm));
  {
    const auto swap = masters.expose();  // checkpoints see the joined fp32 masters
    EXPECT_EQ(toy.w1.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::equal(toy.w1.detach(), got[0]));
  }
  EXPECT_EQ(toy.w1.scalar_type(), torch::kBFloat16);
}

// optim.moment_dtype bf16: the same fp32 AdamW arithmetic, only the stored moments rounded —
// so it matches an fp32-moment run whose moments are rounded to bf16 after every step, bit
// for bit (CUDA's fused kernel against this path: tests/test_cuda_paths.cpp).
TEST(MasterWeights, Bf16MomentsKeepFp32ArithmeticAndRoundTheStorage) {
  Toy toy, ref;
  MasterWeights masters(bf16_weight_params(toy), torch::kBFloat16), ref_masters(bf16_weight_params(ref));
  auto opt = build_optimizer(toy, toy_optim());
  auto ref_opt = build_optimizer(ref, toy_optim());
  std::vector<torch::Tensor> ps = toy.parameters(), rs = ref.parameters();
  auto state_of = [](FusedAdamW& o, const torch::Tensor& p) -> torch::optim::AdamWParamState& {
    return static_cast<torch::optim::AdamWParamState&>(*o.state().at(p.unsafeGetTensorImpl()));
  };
  for (int s = 0; s < 5; ++s) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const torch::Tensor g = toy_grad(ps[i], static_cast<int64_t>(i), s).to(ps[i].scalar_type());
      ps[i].mutable_grad() = g.clone();
      rs[i].mutable_grad() = g.clone();
    }
    masters.step(*opt);
    ref_masters.step(*ref_opt);
    for (const auto& p : {ref.w1, ref.w2}) {  // the reference's moments, rounded as bf16 storage would
      auto& st = state_of(*ref_opt, p);
      st.exp_avg(st.exp_avg().to(torch::kBFloat16).to(torch::kFloat));
      st.exp_avg_sq(st.exp_avg_sq().to(torch::kBFloat16).to(torch::kFloat));
    }
  }
  for (size_t k = 0; k < 2; ++k) {
    const torch::Tensor& p = k == 0 ? toy.w1 : toy.w2;
    const torch::Tensor& r = k == 0 ? ref.w1 : ref.w2;
    EXPECT_TRUE(torch::equal(masters.masters()[k], ref_masters.masters()[k])) << k;
    const auto &st = state_of(*opt, p), &rt = state_of(*ref_opt, r);
    EXPECT_EQ(st.exp_avg().scalar_type(), torch::kBFloat16);
    EXPECT_EQ(st.exp_avg_sq().scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::equal(st.exp_avg().to(torch::kFloat), rt.exp_avg())) << k;
    EXPECT_TRUE(torch::equal(st.exp_avg_sq().to(torch::kFloat), rt.exp_avg_sq())) << k;
  }
  // the fp32 norm keeps fp32 moments
  EXPECT_EQ(state_of(*opt, toy.norm).exp_avg().scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(toy.norm.detach(), ref.norm.detach()));
}

// bf16 moments go into optimizer.safetensors as bf16; a resume (they load as fp32, exactly)
// converts them back at its first step and continues bit for bit.
TEST(MasterWeights, Bf16MomentsResumeExactly) {
  TempDir dir;
  ExperimentConfig cfg = load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml",
                                                {"checkpoint.dir=" + dir.file("ckpt"), "train.device=cpu"});
  auto grads_for = [](Transformer& m, double s) {
    for (auto p : m->parameters())
      p.mutable_grad() = (torch::sin(torch::arange(p.numel(), torch::kFloat) * 0.37 + s) * 1e-3).view(p.sizes()).to(p.scalar_type());
  };
  Transformer model(cfg.model);
  auto opt = build_optimizer(*model, cfg.optim);
  MasterWeights masters(bf16_weight_params(*model), torch::kBFloat16);
  grads_for(model, 0.0);
  masters.step(*opt);
  const std::string path = save_inside_expose(cfg, model, *opt, masters);
  const SafetensorsFile f = read_safetensors(path + "/optimizer.safetensors");
  EXPECT_EQ(f.at("exp_avg.layers.0.attn.wo.weight").scalar_type(), torch::kBFloat16);

  Transformer resumed(cfg.model);
  auto resumed_opt = build_optimizer(*resumed, cfg.optim);
  load_checkpoint(path, cfg, resumed, *resumed_opt);
  MasterWeights resumed_masters(bf16_weight_params(*resumed), torch::kBFloat16);
  grads_for(model, 1.0);
  grads_for(resumed, 1.0);
  masters.step(*opt);
  resumed_masters.step(*resumed_opt);
  for (size_t i = 0; i < masters.masters().size(); ++i)
    EXPECT_TRUE(torch::equal(resumed_masters.masters()[i], masters.masters()[i])) << i;
  const auto a = model->parameters(), b = resumed->parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    const auto& sa = static_cast<torch::optim::AdamWParamState&>(*opt->state().at(a[i].unsafeGetTensorImpl()));
    const auto& sb = static_cast<torch::optim::AdamWParamState&>(*resumed_opt->state().at(b[i].unsafeGetTensorImpl()));
    EXPECT_TRUE(torch::equal(sa.exp_avg(), sb.exp_avg())) << i;
    EXPECT_TRUE(torch::equal(sa.exp_avg_sq(), sb.exp_avg_sq())) << i;
  }
}

// A save inside expose() writes the fp32 masters; an fp32 model resumes them exactly, and
// casting again gives back the bf16 parameters.
TEST(MasterWeights, CheckpointHoldsTheMastersAndResumesThem) {
  TempDir dir;
  ExperimentConfig cfg = load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml",
                                                {"checkpoint.dir=" + dir.file("ckpt"), "train.device=cpu"});
  Transformer model(cfg.model);
  auto opt = build_optimizer(*model, cfg.optim);
  MasterWeights masters(bf16_weight_params(*model));
  const std::vector<torch::Tensor> params = bf16_weight_params(*model);
  // one step so the masters are off the bf16 grid and the optimizer has state
  for (auto p : model->parameters()) p.mutable_grad() = torch::ones_like(p) * 1e-3;
  masters.step(*opt);
  const std::string path = save_inside_expose(cfg, model, *opt, masters);
  EXPECT_EQ(params[0].scalar_type(), torch::kBFloat16) << "the swap ends with the save";
  const SafetensorsFile f = read_safetensors(path + "/model.safetensors");
  const auto named = model->named_parameters();
  size_t k = 0;
  for (const auto& item : named) {
    if (item.value().dim() < 2) continue;
    const torch::Tensor& saved = f.at(item.key());
    EXPECT_EQ(saved.scalar_type(), torch::kFloat) << item.key();
    EXPECT_TRUE(torch::equal(saved, masters.masters()[k])) << item.key();
    ++k;
  }
  ASSERT_EQ(k, masters.masters().size());

  Transformer resumed(cfg.model);
  auto resumed_opt = build_optimizer(*resumed, cfg.optim);
  load_checkpoint(path, cfg, resumed, *resumed_opt);
  MasterWeights resumed_masters(bf16_weight_params(*resumed));
  for (size_t i = 0; i < masters.masters().size(); ++i)
    EXPECT_TRUE(torch::equal(resumed_masters.masters()[i], masters.masters()[i])) << i;
  const std::vector<torch::Tensor> again = bf16_weight_params(*resumed);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(again[i].detach(), params[i].detach())) << i;
}

}  // namespace
