// The fast CUDA paths of training against their float64 CPU references (label cuda:
// needs a GPU), under bf16 autocast with fp32 master weights — how the trainer runs:
// the routed experts take at::_grouped_mm (no host-side counts) and agree with the
// per-expert loop; the chunked LM-head cross-entropy runs its matmuls in bf16, the
// backward too, and agrees with the fp64 loss and gradients; all within bf16 rounding.
// FusedAdamW (at::_fused_adamw_) follows torch::optim::AdamW step for step in fp32; the fused
// master-weight AdamW kernel (train.param_dtype bf16) follows its reference twin.
#include <gtest/gtest.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#ifdef MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "models/kernels/graph_memset_kernels.h"
#endif

#include "models/experts.h"
#include "models/linear.h"
#include "models/lm_loss.h"
#include "trainer/balance.h"
#include "trainer/cuda_graph.h"
#include "trainer/grad_norm_tracker.h"
#include "trainer/master_weights.h"
#include "trainer/optim.h"
#include "trainer/train_step.h"
#include "models/moe.h"
#include "models/rope.h"
#include "models/transformer.h"

namespace {

using namespace moetrain;

double rel_err(const torch::Tensor& got, const torch::Tensor& want) {
  const torch::Tensor g = got.to(torch::kCPU, torch::kDouble), w = want.to(torch::kCPU, torch::kDouble);
  return ((g - w).norm() / w.norm()).item<double>();
}

// The debug shape (a dense first layer, then MoE layers) on the GPU with bf16 matrices, as
// train.param_dtype: bf16 holds them.
Transformer bf16_debug_model(const ModelConfig& cfg, uint64_t seed) {
  torch::manual_seed(seed);
  Transformer model(cfg);
  model->to(torch::kCUDA);
  cast_params_to_bf16(bf16_weight_params(*model));
  return model;
}

struct Bf16Autocast {
  Bf16Autocast() {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
  }
  ~Bf16Autocast() {
    at::autocast::set_autocast_enabled(at::kCUDA, false);
    at::autocast::clear_cache();
  }
};

TEST(MoeCuda, GroupedMmUnderAutocastMatchesFp64Loop) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const int64_t E = 8, D = 64, I = 32, N = 512, K = 2;
  // the gates in the unpermute's sum, and inside the experts (on each row's SwiGLU output)
  for (GatePlacement gates : {GatePlacement::kInUnpermute, GatePlacement::kInsideExperts}) {
    const bool inside = gates == GatePlacement::kInsideExperts;
    torch::manual_seed(7);
    GroupedExperts fast(E, D, I, 0.05), ref(E, D, I, 0.05);
    {
      torch::NoGradGuard no_grad;
      ref->w13.copy_(fast->w13);
      ref->w2.copy_(fast->w2);
    }
    ref->to(torch::kDouble);
    fast->to(torch::kCUDA);  // fp32 master weights on the GPU

    const torch::Tensor x = torch::randn({N, D});
    const torch::Tensor idx = std::get<1>(torch::rand({N, E}).topk(K, 1));  // K distinct experts per token
    const torch::Tensor weight = torch::rand({N, K});
    const torch::Tensor grad_out = torch::randn({N, D});

    // reference: float64 per-expert loop on the CPU
    torch::Tensor x_ref = x.to(torch::kDouble).requires_grad_();
    torch::Tensor w_ref = weight.to(torch::kDouble).requires_grad_();
    torch::Tensor y_ref = moe_experts_reference(*ref, x_ref, idx, w_ref);
    (y_ref * grad_out.to(torch::kDouble)).sum().backward();

    // fast: sort → grouped GEMM → scatter under bf16 autocast
    torch::Tensor x_gpu = x.to(torch::kCUDA).requires_grad_();
    torch::Tensor w_gpu = weight.to(torch::kCUDA).requires_grad_();
    const torch::Tensor idx_gpu = idx.to(torch::kCUDA);
    const torch::Tensor counts = torch::zeros({E}, idx_gpu.options())
                                     .scatter_add_(0, idx_gpu.flatten(), torch::ones({N * K}, idx_gpu.options()));
    torch::Tensor y;
    {
      Bf16Autocast autocast;
      ASSERT_TRUE(fast->uses_grouped_mm(x_gpu));  // so kInsideExperts takes the inside path (local experts)
      y = moe_routed_experts(*fast, x_gpu, idx_gpu, w_gpu, counts, nullptr, {}, gates);
    }
    EXPECT_FALSE(fast->uses_grouped_mm(x_gpu)) << "fp32 without autocast keeps the exact loop";
    (y.to(torch::kFloat) * grad_out.to(torch::kCUDA)).sum().backward();

    EXPECT_LT(rel_err(y, y_ref), 1e-2) << inside;
    EXPECT_LT(rel_err(x_gpu.grad(), x_ref.grad()), 2e-2) << inside;
    EXPECT_LT(rel_err(w_gpu.grad(), w_ref.grad()), 2e-2) << inside;  // the gates' gradient
    for (auto [a, b] : {std::pair{fast->w13, ref->w13}, std::pair{fast->w2, ref->w2}}) {
      ASSERT_TRUE(a.grad().defined());
      EXPECT_EQ(a.grad().scalar_type(), torch::kFloat);  // gradients reach the fp32 master weights
      EXPECT_LT(rel_err(a.grad(), b.grad()), 2e-2) << inside;
    }
  }
}

// The experts' one-node grouped path (weight gradients on a second stream) against its twin,
// ATen's autograd over the same GEMMs and SwiGLU kernel on one stream: uneven groups, an empty
// one, the last one longest; output and all gradients (the rows' gates' too, when the SwiGLU
// output is gate-scaled) agree to bf16 rounding. The widths
// (D = I = 256) fit our weight-gradient kernel (taken with MOETRAIN_GROUPED_WGRAD=1 or on one
// stream; the 300-row group is then split in two chunks).
TEST(MoeCuda, GroupedSwiGLUNodeMatchesTheAutogradPath) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const int64_t E = 6, D = 256, I = 256;
  torch::manual_seed(11);
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  const torch::Tensor counts = torch::tensor({40, 0, 7, 129, 64, 300}, torch::kInt);
  const int64_t M = counts.sum().item<int64_t>();
  const torch::Tensor offs = counts.cumsum(0).to(torch::kInt).to(torch::kCUDA);
  const torch::Tensor x0 = torch::randn({M, D}, bf), w13_0 = torch::randn({E, 2 * I, D}, bf) * 0.1,
                      w2_0 = torch::randn({E, D, I}, bf) * 0.1, grad_y = torch::randn({M, D}, bf);
  const torch::Tensor gate0 = torch::rand({M}, bf.dtype(torch::kFloat));
  for (bool scaled : {false, true}) {  // with each row's gate on its SwiGLU output (models/moe.h)
    auto run = [&](bool fused) {
      torch::Tensor x = x0.clone().requires_grad_(), w13 = w13_0.clone().requires_grad_(),
                    w2 = w2_0.clone().requires_grad_(), gate = gate0.clone().requires_grad_();
      const torch::Tensor g = scaled ? gate : torch::Tensor();
      const torch::Tensor y = fused ? grouped_swiglu_experts(x, w13, w2, offs, g)
                                    : grouped_swiglu_experts_reference(x, w13, w2, offs, g);
      y.backward(grad_y);
      std::vector<torch::Tensor> out{y.detach(), x.grad(), w13.grad(), w2.grad()};
      if (scaled) out.push_back(gate.grad());
      return out;
    };
    const auto fused = run(true), ref = run(false);
    const char* names[] = {"y", "dx", "dw13", "dw2", "dgate"};
    for (size_t i = 0; i < fused.size(); ++i) {
      ASSERT_TRUE(fused[i].defined()) << names[i] << " scaled " << scaled;
      EXPECT_EQ(fused[i].sizes(), ref[i].sizes()) << names[i] << " scaled " << scaled;
      EXPECT_LT(rel_err(fused[i], ref[i]), 1e-2) << names[i] << " scaled " << scaled;
    }
    EXPECT_EQ(fused[3][1].abs().sum().item<float>(), 0.0f) << "an empty group's weight gradient is zero";
  }
}

// apply_linear's node (weight gradient on a second stream) against its twin torch::linear: bf16
// weights, and fp32 master weights under bf16 autocast (fp32 gradients); 3-D input.
TEST(LinearCuda, NodeMatchesTorchLinear) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(12);
  for (auto w_dtype : {torch::kBFloat16, torch::kFloat32}) {
    const auto opts = torch::TensorOptions().device(torch::kCUDA);
    const torch::Tensor x0 = torch::randn({3, 77, 96}, opts).to(torch::kBFloat16);
    const torch::Tensor w0 = (torch::randn({40, 96}, opts) * 0.1).to(w_dtype);
    const torch::Tensor grad_y = torch::randn({3, 77, 40}, opts).to(torch::kBFloat16);
    auto run = [&](bool node) {
      torch::Tensor x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
      torch::Tensor y;
      {
        Bf16Autocast autocast;
        y = node ? apply_linear(x, w) : torch::linear(x, w);
      }
      y.backward(grad_y);
      return std::vector<torch::Tensor>{y.detach(), x.grad(), w.grad()};
    };
    const auto got = run(true), want = run(false);
    EXPECT_EQ(got[0].scalar_type(), torch::kBFloat16);
    EXPECT_EQ(got[2].scalar_type(), w_dtype) << "the weight's gradient comes back in its dtype";
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].sizes(), want[i].sizes()) << i;
      EXPECT_LT(rel_err(got[i], want[i]), 1e-2) << i << " " << w_dtype;
    }
  }
}

// The stack hands each layer's last residual add on to the next norm (ResidualStream); with bf16
// weights the fused add-norm kernel does it. Its twin is the layer-by-layer value path: ATen's
// add, then the plain norm. Same roundings, so the hidden states and every gradient agree to
// bf16 noise (the MoE's atomically accumulated sums aside, they are bit-equal).
TEST(TransformerCuda, PendingResidualAddMatchesTheValuePath) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ModelConfig cfg;  // the debug shape
  Transformer model = bf16_debug_model(cfg, 21);
  const auto long_opts = torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA);
  const torch::Tensor tokens = torch::randint(cfg.vocab_size, {2, 33}, long_opts);
  const torch::Tensor grad_hidden = torch::randn({2, 33, cfg.hidden_size}, torch::kCUDA);
  auto run = [&](bool pending) {
    model->zero_grad();
    torch::Tensor hidden;
    {
      Bf16Autocast autocast;
      if (pending) {
        hidden = model->forward(tokens, /*with_mtp=*/false).hidden;
      } else {
        torch::Tensor h = model->embed(tokens);
        const RopeTables rope = RotaryEmbedding(cfg).tables(tokens.size(1), torch::kCUDA, torch::kFloat);
        std::vector<RoutingStats> routing;
        for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) h = model->layer(i).forward(h, rope, routing);
        hidden = model->norm(h);
      }
    }
    hidden.backward(grad_hidden.to(hidden.scalar_type()));
    std::vector<torch::Tensor> grads{hidden.detach().clone()};
    for (const auto& p : model->parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    return grads;
  };
  const auto want = run(false), got = run(true);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(got[0].scalar_type(), torch::kBFloat16);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].defined(), want[i].defined()) << i;
    if (got[i].defined()) {
      EXPECT_LT(rel_err(got[i], want[i]), 1e-2) << (i == 0 ? "hidden" : "gradient ") << i;
    }
  }
}

TEST(LmLossCuda, Bf16AutocastMatchesFp64) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const int64_t N = 300, D = 64, V = 1000;
  torch::manual_seed(11);
  const torch::Tensor hidden = torch::randn({N, D}), weight = 0.2 * torch::randn({V, D});
  torch::Tensor targets = torch::randint(V, {N}, torch::kLong);
  targets[5] = kIgnoreIndex;

  torch::Tensor h64 = hidden.to(torch::kDouble).requires_grad_(), w64 = weight.to(torch::kDouble).requires_grad_();
  const torch::Tensor ref = chunked_cross_entropy(h64, w64, targets, 128);
  ref.backward();

  torch::Tensor h = hidden.to(torch::kCUDA).requires_grad_(), w = weight.to(torch::kCUDA).requires_grad_();
  torch::Tensor loss;
  {
    Bf16Autocast autocast;
    loss = chunked_cross_entropy(h, w, targets.to(torch::kCUDA), 128);
  }
  loss.backward();  // outside autocast, as the trainer's backward
  EXPECT_EQ(loss.scalar_type(), torch::kFloat);
  EXPECT_LT(std::abs(loss.item<double>() - ref.item<double>()) / ref.item<double>(), 5e-3);
  EXPECT_EQ(h.grad().scalar_type(), torch::kFloat);
  EXPECT_EQ(w.grad().scalar_type(), torch::kFloat);
  EXPECT_LT(rel_err(h.grad(), h64.grad()), 2e-2);
  EXPECT_LT(rel_err(w.grad(), w64.grad()), 2e-2);

  // train.logits_dtype bf16: the head's GEMM writes bf16 logits, the loss reads them into fp32
  torch::Tensor hb = hidden.to(torch::kCUDA).requires_grad_(), wb = weight.to(torch::kCUDA).requires_grad_();
  torch::Tensor loss_b;
  {
    Bf16Autocast autocast;
    loss_b = chunked_cross_entropy(hb, wb, targets.to(torch::kCUDA), 128, kIgnoreIndex, /*bf16_logits=*/true);
  }
  loss_b.backward();
  EXPECT_EQ(loss_b.scalar_type(), torch::kFloat);
  EXPECT_NE(loss_b.item<double>(), loss.item<double>()) << "bf16 logits took the fp32 path";
  EXPECT_LT(std::abs(loss_b.item<double>() - ref.item<double>()) / ref.item<double>(), 5e-3);
  EXPECT_LT(rel_err(hb.grad(), h64.grad()), 2e-2);
  EXPECT_LT(rel_err(wb.grad(), w64.grad()), 2e-2);
  // fp32 (no autocast): the flag changes nothing
  torch::Tensor h32 = hidden.to(torch::kCUDA).requires_grad_();
  const torch::Tensor plain = chunked_cross_entropy(h32, weight.to(torch::kCUDA), targets.to(torch::kCUDA), 128);
  const torch::Tensor flagged =
      chunked_cross_entropy(hidden.to(torch::kCUDA), weight.to(torch::kCUDA), targets.to(torch::kCUDA), 128,
                            kIgnoreIndex, /*bf16_logits=*/true);
  EXPECT_EQ(plain.item<double>(), flagged.item<double>());
}

TEST(LmLossCuda, GradientsInTheForwardMatchTheRecomputingBackward) {
  // the fused path computes the head's gradients beside the loss and scales them in backward;
  // its twin recomputes the logits in backward. Same loss, same gradients (an upstream gradient
  // of 0.37: the forward's gradients are for 1 and scaled), fp32 and bf16 logits, bf16 and fp32
  // weights, an ignored target, a partial last chunk.
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const int64_t N = 300, D = 64, V = 1000;
  torch::manual_seed(12);
  const torch::Tensor hidden = torch::randn({N, D}, torch::kCUDA), weight = 0.2 * torch::randn({V, D}, torch::kCUDA);
  torch::Tensor targets = torch::randint(V, {N}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
  targets[7] = kIgnoreIndex;
  for (bool bf16_logits : {false, true})
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      std::vector<torch::Tensor> loss(2), dh(2), dw(2);
      for (int fwd = 0; fwd < 2; ++fwd) {
        // fresh leaves every pass (a .to() of the same dtype would alias `hidden` and accumulate)
        torch::Tensor h = hidden.to(dtype).clone().requires_grad_(), w = weight.to(dtype).clone().requires_grad_();
        {
          Bf16Autocast autocast;
          loss[fwd] = chunked_cross_entropy(h, w, targets, 128, kIgnoreIndex, bf16_logits, /*grads_in_forward=*/fwd == 1);
        }
        (0.37 * loss[fwd]).backward();
        dh[fwd] = h.grad();
        dw[fwd] = w.grad();
        ASSERT_EQ(dh[fwd].scalar_type(), dtype);
        ASSERT_EQ(dw[fwd].scalar_type(), dtype);
      }
      const std::string what = std::string("bf16 logits ") + (bf16_logits ? "on, " : "off, ") + c10::toString(dtype);
      EXPECT_EQ(loss[0].item<double>(), loss[1].item<double>()) << what;
      // the scale lands after the bf16 rounding of the unit gradient instead of before it (a lost
      // scale would be off by 1.7, a lost chunk by ≈ 0.3)
      EXPECT_LT(rel_err(dh[1], dh[0]), 1e-2) << what;
      EXPECT_LT(rel_err(dw[1], dw[0]), 1e-2) << what;
    }
  // no backward to follow (evaluation): the loss alone, the same value
  torch::Tensor h = hidden.clone().requires_grad_(), w = weight.clone().requires_grad_();  // hidden: no grad
  Bf16Autocast autocast;
  const double with_grad = chunked_cross_entropy(h, w, targets, 128).item<double>();
  torch::NoGradGuard no_grad;
  EXPECT_EQ(chunked_cross_entropy(h, w, targets, 128).item<double>(), with_grad);
}

TEST(FusedAdamWCuda, FollowsAdamWReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(3);
  const std::vector<std::vector<int64_t>> shapes = {{64, 32}, {8, 4, 16}, {32}};
  std::vector<torch::Tensor> fast, ref;
  for (const auto& s : shapes) {
    torch::Tensor t = torch::randn(s, torch::TensorOptions().device(torch::kCUDA));
    fast.push_back(t.clone().requires_grad_());
    ref.push_back(t.clone().requires_grad_());
  }
  auto groups = [](std::vector<torch::Tensor>& p) {  // decay on ≥2-D, none on 1-D, as build_optimizer
    auto opt = [](double wd) {
      return std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(2e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(wd));
    };
    std::vector<torch::optim::OptimizerParamGroup> g;
    g.emplace_back(std::vector<torch::Tensor>{p[0], p[1]}, opt(0.1));
    g.emplace_back(std::vector<torch::Tensor>{p[2]}, opt(0.0));
    return g;
  };
  FusedAdamW fused_opt(groups(fast));
  torch::optim::AdamW ref_opt(groups(ref));
  for (int step = 0; step < 6; ++step) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      if (step == 0 && i == 1) continue;  // a parameter without a gradient in the first step
      const torch::Tensor g = torch::randn(shapes[i], torch::TensorOptions().device(torch::kCUDA));
      fast[i].mutable_grad() = g.clone();
      ref[i].mutable_grad() = g.clone();
    }
    if (step % 2 == 1) {  // clipping folded into the fused update vs clip_grad_norm_ first
      const double max_norm = 0.5 * torch::nn::utils::clip_grad_norm_(ref, 1e30);
      fused_opt.clip_next_step(grad_norm(fast), max_norm);
      torch::nn::utils::clip_grad_norm_(ref, max_norm);
    }
    fused_opt.step();
    ref_opt.step();
    for (auto& p : fast) p.mutable_grad() = torch::Tensor();
    for (auto& p : ref) p.mutable_grad() = torch::Tensor();
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    EXPECT_LT(rel_err(fast[i], ref[i]), 1e-6) << i;
    const auto& sf = static_cast<torch::optim::AdamWParamState&>(*fused_opt.state().at(fast[i].unsafeGetTensorImpl()));
    const auto& sr = static_cast<torch::optim::AdamWParamState&>(*ref_opt.state().at(ref[i].unsafeGetTensorImpl()));
    EXPECT_EQ(sf.step(), sr.step()) << i;
    EXPECT_LT(rel_err(sf.exp_avg(), sr.exp_avg()), 1e-6) << i;
    EXPECT_LT(rel_err(sf.exp_avg_sq(), sr.exp_avg_sq()), 1e-6) << i;
  }
}

// train.param_dtype bf16: the fused master-weight AdamW kernel against the reference twin
// (fp32 masters swapped in, gradients upcast, FusedAdamW's step): odd sizes (scalar path),
// aligned ones (eight or four at a time), a parameter spanning several blocks, a fp32 norm, a
// parameter without a gradient in the first step, and the clip on every other step.
// moments: fp32, or bf16 (optim.moment_dtype; both sides round the same fp32 values, which
// fp32 reassociation can move by an ulp: a rounding may differ in a few elements).
// split: the fused kernel on split masters (optim.master_storage: split) against the fp32-master
// reference.
void fused_master_adamw_matches_the_swap_reference(torch::ScalarType moments, bool split = false) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const double moment_tol = moments == torch::kFloat ? 1e-6 : 1e-3;
  struct Net : torch::nn::Module {
    Net() {
      torch::manual_seed(11);
      const auto o = torch::TensorOptions().device(torch::kCUDA);
      register_parameter("a", torch::randn({64, 32}, o));
      register_parameter("odd", torch::randn({7, 5}, o));
      register_parameter("big", torch::randn({3, 70000}, o));  // 4 blocks of 65,536
      register_parameter("four", torch::randn({3, 12}, o));     // four at a time (36 elements)
      register_parameter("norm", torch::randn({32}, o));
    }
  };
  Net fast, ref;
  MasterWeights fast_m(bf16_weight_params(fast), moments, split), ref_m(bf16_weight_params(ref), moments);
  OptimConfig cfg;
  cfg.lr = 1e-2;
  cfg.weight_decay = 0.1;
  auto fast_opt = build_optimizer(fast, cfg), ref_opt = build_optimizer(ref, cfg);
  std::vector<torch::Tensor> fp = fast.parameters(), rp = ref.parameters();
  for (int step = 0; step < 6; ++step) {
    for (size_t i = 0; i < fp.size(); ++i) {
      if (step == 0 && i == 1) continue;
      const torch::Tensor g = torch::randn(fp[i].sizes(), fp[i].options().dtype(torch::kFloat)).to(fp[i].scalar_type());
      fp[i].mutable_grad() = g.clone();
      rp[i].mutable_grad() = g.clone();
    }
    if (step % 2 == 1) {
      fast_opt->clip_next_step(grad_norm(fp), 5.0);
      ref_opt->clip_next_step(grad_norm(rp), 5.0);
    }
    fast_m.step(*fast_opt, /*fused=*/true);
    ref_m.step(*ref_opt, /*fused=*/false);
  }
  for (size_t k = 0; k < fast_m.masters().size(); ++k) {
    EXPECT_LT(rel_err(fast_m.masters()[k], ref_m.masters()[k]), moments == torch::kFloat ? 1e-6 : 1e-5) << k;
    EXPECT_TRUE(torch::equal(fp[k], fast_m.masters()[k].to(torch::kBFloat16))) << k;  // a, odd, big, four
  }
  for (size_t i = 0; i < fp.size(); ++i) {
    const auto& sf = static_cast<torch::optim::AdamWParamState&>(*fast_opt->state().at(fp[i].unsafeGetTensorImpl()));
    const auto& sr = static_cast<torch::optim::AdamWParamState&>(*ref_opt->state().at(rp[i].unsafeGetTensorImpl()));
    EXPECT_EQ(sf.step(), sr.step()) << i;
    EXPECT_EQ(sf.exp_avg().scalar_type(), i == 4 ? torch::kFloat : moments) << i;
    EXPECT_EQ(sr.exp_avg_sq().scalar_type(), i == 4 ? torch::kFloat : moments) << i;
    EXPECT_LT(rel_err(sf.exp_avg().to(torch::kFloat), sr.exp_avg().to(torch::kFloat)), moment_tol) << i;
    EXPECT_LT(rel_err(sf.exp_avg_sq().to(torch::kFloat), sr.exp_avg_sq().to(torch::kFloat)), moment_tol) << i;
  }
  EXPECT_LT(rel_err(fp[4], rp[4]), 1e-6) << "the fp32 norm";
}

TEST(MasterAdamWCuda, FusedKernelMatchesTheSwapReference) {
  fused_master_adamw_matches_the_swap_reference(torch::kFloat);
}

TEST(MasterAdamWCuda, Bf16MomentsFusedKernelMatchesTheSwapReference) {
  fused_master_adamw_matches_the_swap_reference(torch::kBFloat16);
}

TEST(MasterAdamWCuda, SplitMastersFusedKernelMatchesTheSwapReference) {
  fused_master_adamw_matches_the_swap_reference(torch::kBFloat16, /*split=*/true);
  fused_master_adamw_matches_the_swap_reference(torch::kFloat, /*split=*/true);
}

// The clipping norm summed during the backward on a side stream (trainer/grad_norm_tracker.h)
// against the pass over the gradients after it (ExpertParallel::grad_norm's: the same chunks in
// the same order): bit-equal, eager with two micro-steps and in two replays of a captured graph
// (other tokens each time), with bf16 weights under autocast as the trainer runs.
TEST(GradNormTrackerCuda, MatchesTheNormAfterTheBackwardEagerAndGraphed) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ModelConfig cfg;  // the debug shape
  Transformer model = bf16_debug_model(cfg, 5);
  Balancer balancer(BalanceConfig{}, cfg, model->routers());
  const std::vector<torch::Tensor> params = model->parameters();
  GradNormTracker tracker(params);
  const auto long_opts = torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA);
  const int64_t seq = 32;
  ForwardBackwardOptions fb;
  fb.accum = 2;
  fb.seq_len = seq;
  fb.bf16_autocast = true;
  fb.norm_tracker = &tracker;
  auto over = [&](const torch::Tensor& tokens) {  // [4, seq + 1]: two micro-batches of two rows
    return forward_backward(
        model, balancer,
        [&](int64_t m) {
          const torch::Tensor rows = tokens.narrow(0, 2 * m, 2);
          return Batch{rows.narrow(1, 0, seq), rows.narrow(1, 1, seq)};
        },
        fb);
  };
  auto expect_equal_to_after = [&](const torch::Tensor& got, const std::string& what) {
    std::vector<torch::Tensor> grads;
    for (const auto& p : params)
      if (p.grad().defined()) grads.push_back(p.grad());
    ASSERT_EQ(grads.size(), params.size()) << what << ": every parameter has a gradient";
    const torch::Tensor want = grad_squares_sum(grads).to(torch::kDouble).sqrt();
    ASSERT_TRUE(got.defined()) << what;
    EXPECT_GT(got.item<double>(), 0.0) << what;
    EXPECT_TRUE(torch::equal(got, want)) << what << ": " << got.item<double>() << " vs " << want.item<double>();
  };

  model->zero_grad();
  const StepLosses eager = over(torch::randint(cfg.vocab_size, {4, seq + 1}, long_opts));
  EXPECT_EQ(tracker.summed_in_backward(), static_cast<int64_t>(params.size())) << "all summed beside the backward";
  expect_equal_to_after(eager.grad_norm, "eager");

  // captured on a default stream, then on one of raised priority (graph_node_priority())
  int64_t raised[2] = {0, 0};
  for (bool by_priority : {false, true}) {
    const torch::Tensor graph_tokens = torch::randint(cfg.vocab_size, {4, seq + 1}, long_opts);
    CapturedForwardBackward graph([&] { return over(graph_tokens); }, params, [&] { balancer.discard_step(); },
                                  by_priority);
    for (int replay = 0; replay < 2; ++replay) {
      graph_tokens.copy_(torch::randint(cfg.vocab_size, {4, seq + 1}, long_opts));
      const StepLosses sums = graph.run();
      torch::cuda::synchronize();
      expect_equal_to_after(sums.grad_norm, "replay " + std::to_string(replay) + (by_priority ? ", by priority" : ""));
    }
    raised[by_priority] = graph.high_priority_kernels();
  }
  EXPECT_GT(raised[0], 0) << "the tracker's sums, captured on its high-priority stream";
  EXPECT_GT(raised[1], raised[0]) << "the chain's kernels carry the capture stream's priority";
}

#ifdef MOETRAIN_WITH_CUDA
// A captured graph's memset nodes as kernel nodes (trainer/cuda_graph.h): 1-, 2- and 4-byte
// elements, a pitched 2D memset, a memset between two kernels that write and read its bytes, one
// over the size limit left alone; the replay writes what the memsets would have, in order.
TEST(CudaGraphCuda, MemsetNodesBecomeKernelsThatWriteTheSameBytes) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const auto opts = torch::TensorOptions().device(torch::kCUDA);
  const torch::Tensor bytes = torch::zeros({64}, opts.dtype(torch::kUInt8));
  const torch::Tensor halves = torch::zeros({7}, opts.dtype(torch::kInt16));
  const torch::Tensor words = torch::zeros({5}, opts.dtype(torch::kInt32));
  const torch::Tensor grid = torch::zeros({4, 16}, opts.dtype(torch::kUInt8));  // rows 16 bytes apart
  const torch::Tensor big = torch::zeros({1 << 16}, opts.dtype(torch::kInt32));  // 256 KiB: over the limit
  torch::Tensor sum;
  at::cuda::CUDAGraph graph(/*keep_graph=*/true);
  const c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, 0);
  {
    c10::cuda::CUDAStreamGuard guard(stream);
    graph.capture_begin();
    // (EXPECT, not ASSERT, inside the capture: the capture must end)
    words.add_(100);  // a kernel before the memset: overwritten by it
    EXPECT_EQ(cudaMemsetAsync(words.data_ptr(), 0x01, 8, stream.stream()), cudaSuccess);  // words[0:2] = 0x01010101
    sum = words.sum();  // a kernel after it reads its bytes
    EXPECT_EQ(cudaMemsetAsync(bytes.data_ptr(), 0xAB, 33, stream.stream()), cudaSuccess);
    EXPECT_EQ(cudaMemset2DAsync(grid.data_ptr(), 16, 0x7F, 3, 2, stream.stream()), cudaSuccess);  // 3 bytes × 2 rows
    EXPECT_EQ(cudaMemsetAsync(big.data_ptr(), 0x02, big.numel() * 4, stream.stream()), cudaSuccess);
    graph.capture_end();
  }
  // The graph's nodes of one type, and a node's dependency / dependent counts.
  auto nodes_of = [&](cudaGraphNodeType want) {
    size_t n = 0;
    cudaGraphGetNodes(graph.raw_cuda_graph(), nullptr, &n);
    std::vector<cudaGraphNode_t> all(n), out;
    cudaGraphGetNodes(graph.raw_cuda_graph(), all.data(), &n);
    for (cudaGraphNode_t node : all) {
      cudaGraphNodeType type{};
      cudaGraphNodeGetType(node, &type);
      if (type == want) out.push_back(node);
    }
    return out;
  };
  auto degree = [](cudaGraphNode_t node) {
    size_t in = 0, out = 0;
    cudaGraphNodeGetDependencies(node, nullptr, nullptr, &in);
    cudaGraphNodeGetDependentNodes(node, nullptr, nullptr, &out);
    return std::make_pair(in, out);
  };
  // the captured chain: add_ -> memset(words) -> sum -> memset(bytes) -> memset2D -> memset(big)
  const std::vector<cudaGraphNode_t> captured_memsets = nodes_of(cudaGraphNodeTypeMemset);
  ASSERT_EQ(captured_memsets.size(), 4u);
  const size_t kernels_before = nodes_of(cudaGraphNodeTypeKernel).size();
  // 2- and 4-byte elements (cuBLAS's counters are 32-bit) as nodes of their own
  auto add_memset = [&](const torch::Tensor& t, unsigned value) {
    cudaMemsetParams m{};
    m.dst = t.data_ptr();
    m.value = value;
    m.elementSize = static_cast<unsigned>(t.element_size());
    m.width = static_cast<size_t>(t.numel());
    m.height = 1;
    cudaGraphNode_t node = nullptr;
    ASSERT_EQ(cudaGraphAddMemsetNode(&node, graph.raw_cuda_graph(), nullptr, 0, &m), cudaSuccess);
  };
  const torch::Tensor quads = torch::zeros({3}, opts.dtype(torch::kInt32));
  add_memset(halves, 0x1234);
  add_memset(quads, 0x12345678);
  EXPECT_EQ(replace_memset_nodes(graph.raw_cuda_graph(), int64_t{64} << 10), 5) << "the 256 KiB memset stays";
  const std::vector<cudaGraphNode_t> memsets_left = nodes_of(cudaGraphNodeTypeMemset);
  ASSERT_EQ(memsets_left.size(), 1u);
  EXPECT_EQ(degree(memsets_left[0]), std::make_pair(size_t{1}, size_t{0})) << "the last of the chain";
  const std::vector<cudaGraphNode_t> kernels_after = nodes_of(cudaGraphNodeTypeKernel);
  EXPECT_EQ(kernels_after.size(), kernels_before + 5);
  // the new kernels keep the chain's edges: in the chain, one in and one out (the last one's
  // successor is the big memset); the two added nodes stay roots without dependents
  int64_t chained = 0, roots = 0;
  for (cudaGraphNode_t node : kernels_after) {
    cudaKernelNodeParams k{};
    cudaGraphKernelNodeGetParams(node, &k);
    if (k.func != kernels::memset_node_kernel()) continue;
    const auto d = degree(node);
    if (d == std::make_pair(size_t{1}, size_t{1})) ++chained;
    if (d == std::make_pair(size_t{0}, size_t{0})) ++roots;
  }
  EXPECT_EQ(chained, 3);
  EXPECT_EQ(roots, 2);
  graph.instantiate();
  graph.replay();
  torch::cuda::synchronize();
  const int32_t word = 0x01010101;
  EXPECT_TRUE(torch::equal(words.cpu(), torch::tensor(std::vector<int32_t>{word, word, 100, 100, 100})));
  EXPECT_EQ(sum.item<int64_t>(), 2 * int64_t{word} + 300);
  const torch::Tensor b = bytes.cpu();
  EXPECT_TRUE(torch::equal(b.narrow(0, 0, 33), torch::full({33}, 0xAB, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(b.narrow(0, 33, 31), torch::zeros({31}, torch::kUInt8))) << "past the memset";
  torch::Tensor want_grid = torch::zeros({4, 16}, torch::kUInt8);
  want_grid.narrow(0, 0, 2).narrow(1, 0, 3).fill_(0x7F);
  EXPECT_TRUE(torch::equal(grid.cpu(), want_grid));
  EXPECT_TRUE(torch::equal(big.cpu(), torch::full({1 << 16}, 0x02020202, torch::kInt32)));
  EXPECT_TRUE(torch::equal(halves.cpu(), torch::full({7}, 0x1234, torch::kInt16)));
  EXPECT_TRUE(torch::equal(quads.cpu(), torch::full({3}, 0x12345678, torch::kInt32)));
}

// What graph_node_priority() relies on: a kernel captured on a stream of raised priority carries
// it as its node's attribute, one on a default stream does not, and a memset whose neighbours
// include a raised kernel and a default one becomes a kernel node of the raised priority; the
// graph replays in dependency order (torch instantiates it with the nodes' priorities).
TEST(CudaGraphCuda, CapturedStreamPriorityReachesKernelNodesAndMemsetKernels) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  const auto opts = torch::TensorOptions().device(torch::kCUDA);
  const torch::Tensor a = torch::zeros({1000}, opts), b = torch::zeros({1000}, opts);
  const torch::Tensor words = torch::full({4}, 7, opts.dtype(torch::kInt32));
  torch::Tensor total;
  at::cuda::CUDAGraph graph(/*keep_graph=*/true);
  const c10::cuda::CUDAStream high = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, 0);
  const c10::cuda::CUDAStream low = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, 0);
  ASSERT_NE(high.priority(), 0) << "this device has no stream priorities";
  {
    c10::cuda::CUDAStreamGuard guard(high);
    graph.capture_begin();
    a.add_(1);  // raised
    at::cuda::CUDAEvent fork;
    fork.record(high);
    fork.block(low);
    {
      c10::cuda::CUDAStreamGuard on_low(low);
      b.add_(2);  // default
    }
    at::cuda::CUDAEvent join;
    join.record(low);
    join.block(high);
    // after a.add_ (raised) and b.add_ (default), before the sums (raised)
    EXPECT_EQ(cudaMemsetAsync(words.data_ptr(), 0, words.numel() * 4, high.stream()), cudaSuccess);
    total = a.sum() + words.sum();  // raised
    graph.capture_end();
  }
  size_t n = 0;
  cudaGraphGetNodes(graph.raw_cuda_graph(), nullptr, &n);
  std::vector<cudaGraphNode_t> nodes(n);
  cudaGraphGetNodes(graph.raw_cuda_graph(), nodes.data(), &n);
  int64_t kernels = 0;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type{};
    cudaGraphNodeGetType(node, &type);
    kernels += type == cudaGraphNodeTypeKernel;
  }
  const int64_t raised = count_priority_kernel_nodes(graph.raw_cuda_graph());
  EXPECT_GE(raised, 3) << "a.add_ and the sums";
  EXPECT_EQ(kernels - raised, 1) << "b.add_ on the default stream keeps the default";
  EXPECT_EQ(replace_memset_nodes(graph.raw_cuda_graph(), int64_t{64} << 10), 1);
  EXPECT_EQ(count_priority_kernel_nodes(graph.raw_cuda_graph()), raised + 1)
      << "the memset's kernel takes the highest of its neighbours' priorities";
  graph.instantiate();
  for (int replay = 1; replay <= 2; ++replay) {
    graph.replay();
    torch::cuda::synchronize();
    EXPECT_EQ(total.item<float>(), 1000.0f * replay) << "the memset zeroed words before the sum";
    EXPECT_TRUE(torch::equal(b.cpu(), torch::full({1000}, 2.0f * replay)));
  }
}
#endif

}  // namespace
