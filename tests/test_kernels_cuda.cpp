// Fused CUDA kernels against their ATen references, on the GPU (label cuda:
// runs only where a GPU is visible).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include <fmt/format.h>
#include <torch/torch.h>

#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/_grouped_mm.h>

#include "models/kernels/cross_entropy.h"
#include "models/kernels/fan_out.h"
#include "models/kernels/grouped_gemm.h"
#include "models/kernels/grouped_wgrad.h"
#include "models/kernels/mla_rope.h"
#include "models/kernels/moe_permute.h"
#include "models/kernels/rms_norm_fused.h"
#include "models/kernels/router_select.h"
#include "models/kernels/sum_squares.h"
#include "models/kernels/swiglu.h"
#include "models/moe.h"
#include "models/rms_norm.h"
#include "models/rope.h"
#include "models/router.h"
#include "trainer/optim.h"

using namespace moetrain;

namespace {

// max |a − b| / (|b| + atol): the fused kernel rounds once from fp32, so for bf16
// it must sit within one bf16 ulp (2^-7 relative) of the fp32 result.
double max_rel_err(const torch::Tensor& a, const torch::Tensor& b, double atol) {
  auto a32 = a.to(torch::kFloat32), b32 = b.to(torch::kFloat32);
  return ((a32 - b32).abs() / (b32.abs() + atol)).max().item<double>();
}

}  // namespace

// Plain and gate-scaled (the routed experts' h = g_r · silu(gate)·up, whose backward also returns
// each row's gate gradient, a warp's sum over the row) against the ATen references in fp32.
TEST(KernelsCuda, SwigluPackedMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  // F = 256 / 512: eight columns per access in bf16, four in fp32; F = 260: four (not a multiple
  // of eight); F = 257: one (odd width, unaligned up half)
  for (bool scaled : {false, true}) {
    for (int64_t f : {scaled ? 512 : 256, 260, 257}) {
      for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
        torch::manual_seed(0);
        auto opts = torch::TensorOptions().device(torch::kCUDA);
        auto gu = torch::randn({3, 343, 2 * f}, opts.dtype(dtype)).requires_grad_(true);
        auto scale = torch::rand({3, 343}, opts).requires_grad_(true);
        auto gu32 = gu.detach().to(torch::kFloat32).requires_grad_(true);
        auto scale32 = scale.detach().clone().requires_grad_(true);
        auto out = scaled ? swiglu_packed_scaled(gu, scale) : swiglu_packed(gu);
        auto ref = scaled ? swiglu_packed_scaled_reference(gu32, scale32) : swiglu_packed_reference(gu32);
        ASSERT_EQ(out.sizes(), ref.sizes());
        ASSERT_EQ(out.scalar_type(), dtype);
        const double tol = dtype == torch::kFloat32 ? 1e-5 : 1.0 / 128;
        EXPECT_LT(max_rel_err(out, ref, 1e-3), tol) << dtype << " F " << f << " scaled " << scaled;
        auto go = torch::randn_like(ref).to(dtype);
        out.backward(go);
        ref.backward(go.to(torch::kFloat32));
        EXPECT_LT(max_rel_err(gu.grad(), gu32.grad(), 1e-2), 2 * tol) << dtype << " F " << f << " scaled " << scaled;
        if (!scaled) continue;
        // a row's gate gradient is a sum over F (cancellation): against the largest one
        const double g_scale = scale32.grad().abs().max().item<double>();
        EXPECT_LT((scale.grad() - scale32.grad()).abs().max().item<double>() / g_scale, 1e-5) << dtype << " F " << f;
      }
    }
  }
}

namespace {

// fp64 reference of RMSNorm on the same (possibly bf16) inputs, with its gradients.
struct NormRef {
  torch::Tensor out, grad_x, grad_w;
};
NormRef rms_norm_fp64(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& go, double eps) {
  auto x64 = x.detach().to(torch::kDouble).requires_grad_(true);
  auto w64 = w.detach().to(torch::kDouble).requires_grad_(true);
  auto out = rms_norm_reference(x64, w64, eps);
  out.backward(go.to(torch::kDouble));
  return {out.detach(), x64.grad(), w64.grad()};
}

}  // namespace

TEST(KernelsCuda, RmsNormMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  for (auto x_dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (auto out_dtype : {torch::kFloat32, torch::kBFloat16}) {
      for (int64_t dim : {256, 1024, 100, 102, 388, 2048}) {  // 100: not a multiple of the warp; 102: nor of 4
        // (the register kernels take dim ≤ 1024 in four-column steps: 256, 100, 388, 1024; 2048 and 102 the generic one)
        torch::manual_seed(1);
        auto opts = torch::TensorOptions().device(torch::kCUDA);
        // 4803 rows: more than the register kernels' warps (≤ 3 blocks of 8 on each SM), so warps take several rows
        auto x = (torch::randn({3, 1601, dim}, opts) * 3).to(x_dtype).requires_grad_(true);
        auto w = (1 + 0.1 * torch::randn({dim}, opts)).requires_grad_(true);
        auto out = rms_norm_fused(x, w, 1e-6, out_dtype);
        ASSERT_EQ(out.scalar_type(), out_dtype);
        ASSERT_EQ(out.sizes(), x.sizes());
        auto go = torch::randn(x.sizes(), opts).to(out_dtype);
        out.backward(go);
        const NormRef ref = rms_norm_fp64(x, w, go, 1e-6);
        // one rounding to out_dtype (and the reference's own rounding of x̂ to x's dtype)
        const double tol = (x_dtype == torch::kBFloat16 || out_dtype == torch::kBFloat16) ? 1.0 / 64 : 1e-5;
        EXPECT_LT(max_rel_err(out, ref.out, 1e-2), tol) << x_dtype << " " << out_dtype << " " << dim;
        EXPECT_LT(max_rel_err(x.grad(), ref.grad_x, 1e-1), 2 * tol) << x_dtype << " " << out_dtype << " " << dim;
        // the weight gradient is a sum over 4803 rows: compare relative to its scale
        const double w_scale = ref.grad_w.abs().max().item<double>();
        EXPECT_LT((w.grad().to(torch::kDouble) - ref.grad_w).abs().max().item<double>() / w_scale, tol)
            << x_dtype << " " << out_dtype << " " << dim;
      }
    }
  }
}

// A column slice of a wider matrix (MLA's latents out of the stacked down-projection) is read
// in place: row stride 4 + dim + 8, with four-column accesses (dim 1024) and without (102).
TEST(KernelsCuda, RmsNormReadsAColumnSliceInPlace) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (int64_t dim : {1024, 102}) {
      torch::manual_seed(2);
      auto opts = torch::TensorOptions().device(torch::kCUDA);
      auto wide = (torch::randn({2, 333, dim + 12}, opts) * 3).to(dtype).requires_grad_(true);
      const torch::Tensor x = wide.narrow(-1, 4, dim);
      auto w = (1 + 0.1 * torch::randn({dim}, opts)).requires_grad_(true);
      auto out = rms_norm_fused(x, w, 1e-6, dtype);
      auto go = torch::randn(x.sizes(), opts).to(dtype);
      out.backward(go);
      const NormRef ref = rms_norm_fp64(x.detach(), w, go, 1e-6);
      const double tol = dtype == torch::kBFloat16 ? 1.0 / 64 : 1e-5;
      EXPECT_LT(max_rel_err(out, ref.out, 1e-2), tol) << dtype << " " << dim;
      EXPECT_LT(max_rel_err(wide.grad().narrow(-1, 4, dim), ref.grad_x, 1e-1), 2 * tol) << dtype << " " << dim;
      EXPECT_EQ(wide.grad().narrow(-1, 0, 4).abs().max().item<double>(), 0.0);
      EXPECT_EQ(wide.grad().narrow(-1, dim + 4, 8).abs().max().item<double>(), 0.0);
    }
  }
}

// The residual add fused with the norm: h and norm(h) against the fp64 truth of the same
// rounded inputs; x and delta both receive h's whole gradient (its other use's + the norm's).
TEST(KernelsCuda, AddRmsNormMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (int64_t dim : {1024, 102}) {
      torch::manual_seed(3);
      auto opts = torch::TensorOptions().device(torch::kCUDA);
      auto x = (torch::randn({2, 2113, dim}, opts) * 2).to(dtype).requires_grad_(true);  // warps take several rows
      auto delta = torch::randn({2, 2113, dim}, opts).to(dtype).requires_grad_(true);
      auto w = (1 + 0.1 * torch::randn({dim}, opts)).requires_grad_(true);
      auto [h, normed] = add_rms_norm_fused(x, delta, w, 1e-6, dtype);
      ASSERT_EQ(h.scalar_type(), dtype);
      ASSERT_EQ(normed.scalar_type(), dtype);
      // h: exactly ATen's add
      EXPECT_TRUE(torch::equal(h, x.detach() + delta.detach())) << dtype << " " << dim;
      auto go_h = torch::randn(x.sizes(), opts).to(dtype), go_n = torch::randn(x.sizes(), opts).to(dtype);
      torch::autograd::backward({h, normed}, {go_h, go_n});
      // truth: the norm of the rounded h in fp64; h's gradient = go_h + the norm's input gradient
      const torch::Tensor h_rounded = (x.detach() + delta.detach());
      const NormRef ref = rms_norm_fp64(h_rounded, w, go_n, 1e-6);
      const torch::Tensor grad_h = ref.grad_x + go_h.to(torch::kDouble);
      const double tol = dtype == torch::kBFloat16 ? 1.0 / 64 : 1e-5;
      EXPECT_LT(max_rel_err(normed, ref.out, 1e-2), tol) << dtype << " " << dim;
      EXPECT_LT(max_rel_err(x.grad(), grad_h, 1e-1), 2 * tol) << dtype << " " << dim;
      EXPECT_TRUE(torch::equal(x.grad(), delta.grad())) << dtype << " " << dim;
      const double w_scale = ref.grad_w.abs().max().item<double>();
      EXPECT_LT((w.grad().to(torch::kDouble) - ref.grad_w).abs().max().item<double>() / w_scale, tol) << dtype << " " << dim;
    }
  }
}

TEST(KernelsCuda, RmsNormModuleUnderAutocastEmitsBf16) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  RMSNorm norm(64, 1e-6);
  norm->to(torch::kCUDA);
  auto x = torch::randn({8, 64}, torch::kCUDA);
  const auto fp32 = norm(x);
  EXPECT_EQ(fp32.scalar_type(), torch::kFloat32);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  const auto bf16 = norm(x);
  at::autocast::set_autocast_enabled(at::kCUDA, false);
  at::autocast::clear_cache();
  EXPECT_EQ(bf16.scalar_type(), torch::kBFloat16);
  // exactly the cast autocast would apply to the fp32 output
  EXPECT_TRUE(torch::equal(bf16, fp32.to(torch::kBFloat16)));
}

TEST(KernelsCuda, MoePermutationMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  const int64_t N = 777, E = 16;
  // dims: 128 and 72 the wide gather-sums (8 columns an access; 72 leaves lanes idle), 1288 several
  // passes of 256 columns, 68 four columns an access, 70 one; K = 10: more rows than a wide
  // gather-sum holds (the four-column loop), K = 6 within
  for (int64_t K : {6, 10})
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    for (int64_t dim : {128, 72, 1288, 68, 70}) {
      SCOPED_TRACE("K " + std::to_string(K));
      torch::manual_seed(2);
      auto opts = torch::TensorOptions().device(torch::kCUDA);
      // distinct experts per token, like top-k
      auto topk_idx = std::get<1>(torch::rand({N, E}, opts).topk(K, -1));
      auto counts = torch::bincount(topk_idx.flatten(), {}, E);
      const ExpertPermutation perm = moe_sort_by_expert(topk_idx, counts);
      ASSERT_TRUE(perm.inv.defined());
      auto x = torch::randn({N, dim}, opts).to(dtype).requires_grad_(true);
      auto x_ref = x.detach().clone().requires_grad_(true);
      auto w = torch::rand({N, K}, opts).requires_grad_(true);
      auto w_ref = w.detach().clone().requires_grad_(true);

      auto rows = moe_permute(x, perm);
      auto rows_ref = moe_permute_reference(x_ref, perm);
      EXPECT_TRUE(torch::equal(rows, rows_ref)) << dtype << " " << dim;  // a pure gather: bitwise
      // the experts: any row-wise function that differs per row
      auto scale = torch::linspace(0.5, 1.5, N * K, opts).unsqueeze(1).to(dtype);
      auto out = moe_unpermute(rows * scale, perm, w, N);
      auto out_ref = moe_unpermute_reference(rows_ref * scale, perm, w_ref, N);
      ASSERT_EQ(out.scalar_type(), dtype);
      const double tol = dtype == torch::kFloat32 ? 1e-5 : 1.0 / 128;
      EXPECT_LT(max_rel_err(out, out_ref, 1e-2), tol) << dtype << " " << dim;
      auto go = torch::randn({N, dim}, opts).to(dtype);
      out.backward(go);
      out_ref.backward(go);
      EXPECT_LT(max_rel_err(x.grad(), x_ref.grad(), 1e-1), 2 * tol) << dtype << " " << dim;
      // with a base (the shared experts' output) added inside the kernel's fp32 sum: one rounding,
      // so compare with the fp64 truth (the reference rounds the sum before adding)
      auto base = torch::randn({N, dim}, opts).to(dtype).requires_grad_(true);
      auto with_base = moe_unpermute(rows.detach() * scale, perm, w.detach(), N, base);
      auto truth = moe_unpermute_reference((rows_ref.detach() * scale).to(torch::kDouble), perm,
                                           w_ref.detach().to(torch::kDouble), N) + base.detach().to(torch::kDouble);
      EXPECT_LT(max_rel_err(with_base, truth, 1e-1), tol) << dtype << " " << dim;
      with_base.backward(go);
      EXPECT_TRUE(torch::equal(base.grad(), go)) << dtype << " " << dim;  // grad_out itself
      // a gate's gradient is a dot product over D (cancellation): compare against its scale
      const double w_scale = w_ref.grad().abs().max().item<double>();
      EXPECT_LT((w.grad() - w_ref.grad()).abs().max().item<double>() / w_scale, tol) << dtype << " " << dim;
      // unweighted (the gates applied inside the experts): a plain sum, and the backward a gather
      auto rows_u = rows.detach().requires_grad_(true), rows_u_ref = rows.detach().requires_grad_(true);
      auto sum = moe_unpermute(rows_u, perm, torch::Tensor(), N, base.detach());
      auto sum_ref = moe_unpermute_reference(rows_u_ref.to(torch::kDouble), perm, torch::Tensor(), N) +
                     base.detach().to(torch::kDouble);
      EXPECT_LT(max_rel_err(sum, sum_ref, 1e-1), tol) << dtype << " " << dim;
      sum.backward(go);
      sum_ref.backward(go.to(torch::kDouble));
      EXPECT_TRUE(torch::equal(rows_u.grad(), rows_u_ref.grad())) << dtype << " " << dim;  // a gather: bitwise
    }
  }
}

// The counting sort equals the stable argsort exactly: uniform and skewed routing, a partial
// last block (M not a multiple of 256), experts nobody picked, and the 1024-expert bound.
TEST(KernelsCuda, MoeExpertSortEqualsStableArgsort) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  struct Case {
    int64_t N, K, E;
    bool skewed;
  };
  for (const Case c : {Case{1000, 6, 64, false}, Case{4096, 6, 64, true}, Case{777, 8, 256, false},
                       Case{333, 1, 3, true}, Case{2048, 4, 1024, false}, Case{5, 2, 512, false}}) {
    torch::manual_seed(5);
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kLong);
    // skewed: most pairs on the first experts (the collapsed routing of an untrained model)
    torch::Tensor idx = c.skewed ? (torch::rand({c.N, c.K}, opts.dtype(torch::kFloat)).pow(4) * c.E).to(torch::kLong)
                                 : torch::randint(c.E, {c.N, c.K}, opts);
    const torch::Tensor counts = torch::bincount(idx.flatten(), {}, c.E);
    ASSERT_TRUE(moe_expert_order_kernel_ok(idx, c.E));
    const ExpertOrder got = moe_expert_order_fused(idx, c.E);
    const ExpertPermutation ref = moe_sort_by_expert_reference(idx, counts);
    EXPECT_TRUE(torch::equal(got.order, ref.order)) << c.N << " " << c.K << " " << c.E;
    EXPECT_TRUE(torch::equal(got.token_idx, ref.token_idx)) << c.N << " " << c.K << " " << c.E;
    EXPECT_TRUE(torch::equal(got.inv, ref.inv)) << c.N << " " << c.K << " " << c.E;
  }
}

TEST(KernelsCuda, MoePermuteWritesBf16RowsUnderAutocast) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  auto topk_idx = torch::tensor({{0, 2}, {1, 0}, {2, 1}}, opts.dtype(torch::kLong));
  const ExpertPermutation perm = moe_sort_by_expert(topk_idx, torch::bincount(topk_idx.flatten(), {}, 3));
  auto x = torch::randn({3, 16}, opts).requires_grad_(true);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  auto rows = moe_permute(x, perm);
  at::autocast::set_autocast_enabled(at::kCUDA, false);
  at::autocast::clear_cache();
  EXPECT_EQ(rows.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(rows, moe_permute_reference(x.detach(), perm).to(torch::kBFloat16)));
  // the backward: bf16 row gradients summed into fp32 x's (the wide gather-sum across dtypes)
  const torch::Tensor go = torch::randn({6, 16}, opts).to(torch::kBFloat16);
  rows.backward(go);
  auto x_ref = x.detach().clone().requires_grad_(true);
  moe_permute_reference(x_ref, perm).backward(go.to(torch::kFloat));
  ASSERT_EQ(x.grad().scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::allclose(x.grad(), x_ref.grad(), /*rtol=*/1e-6, /*atol=*/0));
}

// Both launch paths: 16-byte chunks (every width a multiple of 8 elements) and the
// element-by-element fallback (widths 6 / 10 / 5).
TEST(KernelsCuda, MlaRopeMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  struct Shape {
    int64_t nope, R, v_dim;
  };
  for (const Shape& shape : {Shape{16, 32, 8}, Shape{6, 10, 5}}) {
    const int64_t B = 2, T = 37, H = 3, C = 24, nope = shape.nope, R = shape.R, v_dim = shape.v_dim;
    ModelConfig cfg;
    cfg.qk_rope_head_dim = R;
    RotaryEmbedding rotary(cfg);
    const RopeTables rope = rotary.tables(64, torch::kCUDA, torch::kFloat);
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      torch::manual_seed(3);
      auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
      auto q = torch::randn({B, T, H, nope + R}, opts).requires_grad_(true);
      auto q_ref = q.detach().clone().requires_grad_(true);
      auto latent = torch::randn({B, T, C + R}, opts).requires_grad_(true);  // wkv_a's output: [c_kv | k_rope]
      auto latent_ref = latent.detach().clone().requires_grad_(true);
      auto kv = torch::randn({B, T, H, nope + v_dim}, opts).requires_grad_(true);
      auto kv_ref = kv.detach().clone().requires_grad_(true);

      auto qf = mla_rope_q_fused(q, rope, nope);
      auto [kf, vf] = mla_rope_kv_fused(kv, latent.narrow(-1, C, R), rope, nope);
      auto q_parts = q_ref.split({nope, R}, -1);
      auto qr = torch::cat({q_parts[0], apply_rope(q_parts[1], rope)}, -1);
      auto k_rope = apply_rope(latent_ref.narrow(-1, C, R).unsqueeze(2), rope);
      auto kr = torch::cat({kv_ref.narrow(-1, 0, nope), k_rope.expand({B, T, H, R})}, -1);
      auto vr = kv_ref.narrow(-1, nope, v_dim);
      // the same fp32 arithmetic, one rounding: equal up to fma contraction
      const double tol = dtype == torch::kFloat32 ? 1e-5 : 1.0 / 128;
      const std::string what = fmt::format("{} nope {} R {} v {}", c10::toString(dtype), nope, R, v_dim);
      EXPECT_LT(max_rel_err(qf, qr, 1e-2), tol) << what;
      EXPECT_LT(max_rel_err(kf, kr, 1e-2), tol) << what;
      EXPECT_TRUE(torch::equal(vf, vr)) << what;
      // the gradient reaching v arrives through SDPA's transpose: a strided one must be read right
      auto gq = torch::randn_like(qf), gk = torch::randn_like(kf);
      auto gv = torch::randn({B, H, T, v_dim}, opts).transpose(1, 2);
      (qf * gq).sum().backward();
      ((kf * gk).sum() + (vf * gv).sum()).backward();
      (qr * gq).sum().backward();
      ((kr * gk).sum() + (vr * gv).sum()).backward();
      EXPECT_LT(max_rel_err(q.grad(), q_ref.grad(), 1e-1), 2 * tol) << what;
      EXPECT_LT(max_rel_err(kv.grad(), kv_ref.grad(), 1e-1), 2 * tol) << what;
      // k_rope's gradient sums over heads: compare to its scale
      const auto g = latent.grad().to(torch::kFloat), g_ref = latent_ref.grad().to(torch::kFloat);
      EXPECT_LT((g - g_ref).abs().max().item<double>() / g_ref.abs().max().item<double>(), 4 * tol) << what;
      // v unused: its gradient comes back undefined and kv's v part is zero
      kv.mutable_grad() = torch::Tensor();
      auto [k2, v2] = mla_rope_kv_fused(kv, latent.narrow(-1, C, R), rope, nope);
      (k2 * gk).sum().backward();
      EXPECT_EQ(kv.grad().narrow(-1, nope, v_dim).abs().max().item<double>(), 0.0) << what;
    }
  }
}

TEST(KernelsCuda, RouterSelectMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  struct Case {
    int64_t E, K, n_group, topk_group;
  };
  // 72: a partly filled last column of lanes; 32 groups of one (top-1 group scores); 512: the limit;
  // 64 / 128 / 256 / 512: the largest of each unrolled width (2, 4, 8, 16 experts a lane)
  for (const Case c : {Case{64, 6, 1, 1}, Case{256, 8, 8, 4}, Case{72, 6, 1, 1}, Case{160, 6, 32, 8},
                       Case{32, 4, 32, 8}, Case{512, 16, 16, 3}, Case{256, 1, 4, 1}, Case{128, 8, 4, 2}}) {
    torch::manual_seed(3);
    auto opts = torch::TensorOptions().device(torch::kCUDA);
    const int64_t N = 1031;
    // continuous fp32 values: no ties, so the choice (and its order) is unique
    auto scores = torch::rand({N, c.E}, opts);
    auto bias = 0.1 * torch::randn({c.E}, opts);
    ASSERT_TRUE(router_select_kernel_ok(scores, c.K, c.n_group));
    const auto [idx, counts] = router_select_fused(scores, bias, c.K, c.n_group, c.topk_group);
    const auto [idx_ref, counts_ref] = router_select_reference(scores, bias, c.K, c.n_group, c.topk_group);
    EXPECT_TRUE(torch::equal(idx, idx_ref)) << "E " << c.E << " K " << c.K << " groups " << c.n_group;
    EXPECT_TRUE(torch::equal(counts, counts_ref)) << "E " << c.E;
  }
}

TEST(KernelsCuda, RouterSelectOnBf16TiesIsAValidTopK) {
  // bf16 scores tie often; any tied choice is a correct top-k, so check the definition:
  // K distinct experts whose biased scores are >= every unchosen one, counts = their histogram.
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(4);
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  const int64_t N = 4096, E = 256, K = 6;
  auto scores = torch::sigmoid(torch::randn({N, E}, opts)).to(torch::kBFloat16);
  auto bias = torch::zeros({E}, opts);
  const auto [idx, counts] = router_select_fused(scores, bias, K, 1, 1);
  const auto choice = scores.to(torch::kFloat);
  const auto chosen = choice.gather(1, idx);                                       // [N, K]
  const auto unchosen = choice.scatter(1, idx, -std::numeric_limits<float>::infinity());
  EXPECT_TRUE((std::get<0>(chosen.min(1)) >= std::get<0>(unchosen.max(1))).all().item<bool>());
  EXPECT_TRUE((std::get<0>(idx.sort(1)).diff(1, 1) > 0).all().item<bool>());      // distinct
  EXPECT_TRUE(torch::equal(counts, torch::bincount(idx.flatten(), {}, E)));
  EXPECT_TRUE((chosen.diff(1, 1) <= 0).all().item<bool>());                        // descending
}

TEST(KernelsCuda, RouterLogitsUnderAutocastAreFp32) {
  // bf16 operands, fp32 output: the logits match the fp64 product of the bf16-rounded operands
  // to fp32 accumulation; the gradients to bf16 rounding.
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(5);
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  for (auto w_dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto x = torch::randn({2048, 256}, opts).to(torch::kBFloat16).requires_grad_(true);
    auto w = (0.05 * torch::randn({64, 256}, opts)).to(w_dtype).requires_grad_(true);
    torch::Tensor logits;
    {
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      logits = router_logits(x, w);
      at::autocast::set_autocast_enabled(at::kCUDA, false);
      at::autocast::clear_cache();
    }
    ASSERT_EQ(logits.scalar_type(), torch::kFloat);
    auto x64 = x.detach().to(torch::kDouble).requires_grad_(true);
    auto w64 = w.detach().to(torch::kBFloat16).to(torch::kDouble).requires_grad_(true);
    auto ref = torch::matmul(x64, w64.t());
    const auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
      return ((a.to(torch::kDouble) - b).norm() / b.norm()).item<double>();
    };
    // fp32 accumulation order only (≈ 1e-7); a bf16 output would be ≈ 1e-3
    EXPECT_LT(rel(logits, ref), 1e-5) << w_dtype;
    auto g = torch::randn_like(logits);
    logits.backward(g);
    ref.backward(g.to(torch::kDouble));
    ASSERT_EQ(x.grad().scalar_type(), torch::kBFloat16);
    ASSERT_EQ(w.grad().scalar_type(), w_dtype);
    EXPECT_LT(rel(x.grad(), x64.grad()), 1e-2) << w_dtype;
    EXPECT_LT(rel(w.grad(), w64.grad()), 1e-2) << w_dtype;
  }
}

TEST(KernelsCuda, CrossEntropyMatchesReference) {
  // per-row loss and logsumexp against ATen, the gradient against softmax − onehot, both ways,
  // over fp32 logits and bf16 ones (train.logits_dtype; the reference reads the same bf16 values)
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  for (auto logits_dtype : {torch::kFloat32, torch::kBFloat16})
    // 1004: four-wide but not eight; 1001: the one-column path; 32768: bench-1b's vocabulary (the
    // one-kernel form writes the gradient over the logits while thread 0 forms the loss)
    for (int64_t V : {1000, 1004, 1001, 32768}) {
      torch::manual_seed(6);
      const int64_t n = 257, ignore = -100;
      const auto logits_in = (4.0 * torch::randn({n, V}, opts)).to(logits_dtype);
      const auto logits = logits_in.to(torch::kFloat);  // the values the kernels read
      auto targets = torch::randint(V, {n}, opts.dtype(torch::kLong));
      targets.index_put_({torch::arange(0, n, 7, opts.dtype(torch::kLong))}, ignore);
      torch::Tensor loss = torch::empty({n}, opts), lse = torch::empty({n}, opts);
      cross_entropy_rows_fused(logits_in, targets, ignore, loss, lse);
      const auto ref_loss = torch::nn::functional::cross_entropy(
          logits, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone).ignore_index(ignore));
      EXPECT_LT((loss - ref_loss).abs().max().item<double>(), 1e-5) << V << " " << logits_dtype;
      EXPECT_LT((lse - torch::logsumexp(logits, 1)).abs().max().item<double>(), 1e-5) << V << " " << logits_dtype;

      auto scale = torch::full({}, 0.37, opts);
      const auto valid = (targets != ignore).unsqueeze(1).to(torch::kFloat);
      auto ref = torch::softmax(logits, 1);
      ref.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), -torch::ones({n, 1}, opts));
      ref = ref * valid * scale;
      for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
        const auto g = cross_entropy_grad_fused(logits_in, lse, targets, scale, ignore, dtype);
        ASSERT_EQ(g.scalar_type(), dtype);
        const double tol = dtype == torch::kFloat32 ? 1e-6 : 4e-3;  // absolute; |g| <= 0.37
        EXPECT_LT((g.to(torch::kFloat) - ref).abs().max().item<double>(), tol)
            << V << " " << logits_dtype << " " << dtype;
        // the one-kernel twin: the same loss, lse and gradient bits as the two kernels; with
        // the gradient's dtype equal to the logits' it is written over them
        torch::Tensor logits_copy = logits_in.clone();
        torch::Tensor loss1 = torch::empty({n}, opts), lse1 = torch::empty({n}, opts);
        const auto g1 = cross_entropy_rows_and_grad_fused(logits_copy, targets, scale, ignore, loss1, lse1, dtype);
        EXPECT_TRUE(torch::equal(loss1, loss)) << V << " " << logits_dtype << " " << dtype;
        EXPECT_TRUE(torch::equal(lse1, lse)) << V << " " << logits_dtype << " " << dtype;
        EXPECT_TRUE(torch::equal(g1, g)) << V << " " << logits_dtype << " " << dtype;
        EXPECT_EQ(g1.data_ptr() == logits_copy.data_ptr(), dtype == logits_dtype) << V << " " << logits_dtype;
      }
    }
}

TEST(KernelsCuda, FanOutSumsItsBranchesGradients) {
  // x read by three branches through fan_out3 (one node, one three-way sum kernel) against x
  // read three times (autograd's adds): fp32 and bf16, a size off the 8-element grid, and a
  // branch that takes no part in the loss (its gradient undefined, not zeros)
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16})
    for (int64_t branches : {3, 2}) {
      torch::manual_seed(8);
      const auto x0 = torch::randn({37, 13}, opts).to(dtype);
      const auto w = torch::randn({3, 37, 13}, opts).to(dtype);
      auto loss_of = [&](const std::array<torch::Tensor, 3>& o) {
        torch::Tensor loss = (o[0] * w[0]).sum() + (o[1].sin() * w[1]).sum();
        if (branches == 3) loss = loss + (o[2] * o[2] * w[2]).sum();
        return loss;
      };
      auto x = x0.clone().requires_grad_(true), x_ref = x0.clone().requires_grad_(true);
      const auto outs = fan_out3(x);
      EXPECT_NE(outs[0].grad_fn(), nullptr);
      loss_of(outs).backward();
      loss_of({x_ref, x_ref, x_ref}).backward();
      const double tol = dtype == torch::kFloat32 ? 1e-6 : 1e-2;  // bf16: one rounding against two
      EXPECT_LT((x.grad().to(torch::kFloat) - x_ref.grad().to(torch::kFloat)).abs().max().item<double>(),
                tol * x_ref.grad().abs().max().item<double>())
          << dtype << " " << branches;
    }
  // the sum itself: bit-equal to fp32 adds for fp32 tensors with the vector path's tail
  const auto a = torch::randn({1003}, opts), b = torch::randn({1003}, opts), c = torch::randn({1003}, opts);
  EXPECT_TRUE(torch::allclose(sum_gradients({a, b, c}), a + b + c, 0, 1e-6));
  EXPECT_TRUE(torch::equal(sum_gradients({a, torch::Tensor(), c}), a + c));
}

TEST(KernelsCuda, GradNormKernelMatchesForeachNorm) {
  // mixed bf16 / fp32 gradients, sizes off the 4-element and 64K-chunk grids, a sliced (offset) one
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  torch::manual_seed(7);
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  std::vector<torch::Tensor> params;
  for (int64_t n : {1, 3, 4, 1000, 65536, 65537, 200003}) {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      auto p = torch::zeros({n}, opts.dtype(dtype)).requires_grad_(true);
      p.mutable_grad() = torch::randn({n}, opts).to(dtype);
      params.push_back(p);
    }
  }
  auto sliced = torch::zeros({9}, opts).requires_grad_(true);
  sliced.mutable_grad() = torch::randn({10}, opts).narrow(0, 1, 9);  // contiguous, not 16-byte aligned
  params.push_back(sliced);
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) grads.push_back(p.grad());
  ASSERT_TRUE(sum_of_squares_kernel_ok(grads));
  const double got = grad_norm(params).item<double>(), want = grad_squares_sum_reference(grads).sqrt().item<double>();
  EXPECT_NEAR(got, want, 1e-5 * want);
  double exact = 0.0;
  for (const auto& g : grads) exact += g.to(torch::kDouble).pow(2).sum().item<double>();
  EXPECT_NEAR(got, std::sqrt(exact), 1e-5 * std::sqrt(exact));

  // the per-tensor chunk sums (the norm summed during the backward) add up to the list kernel's
  // sum bit for bit, each chunk near the reference's
  int64_t chunks = 0;
  for (const auto& g : grads) chunks += sum_of_squares_chunk_count(g.numel());
  const torch::Tensor buffer = torch::full({chunks}, -1.0f, opts), reference = torch::full({chunks}, -1.0f, opts);
  int64_t at = 0;
  for (const auto& g : grads) {
    const int64_t n = sum_of_squares_chunk_count(g.numel());
    sum_of_squares_chunks_into(g, buffer.narrow(0, at, n));
    sum_of_squares_chunks_reference(g, reference.narrow(0, at, n));
    at += n;
  }
  EXPECT_TRUE(torch::equal(buffer.sum(), sum_of_squares_fused(grads))) << "the same chunks, the same order";
  EXPECT_TRUE(torch::allclose(buffer, reference, 1e-5, 1e-6));
}

// Our Hopper weight-gradient kernel against the fp32 per-expert loop and ATen's grouped GEMM:
// an empty group first and in the middle, a group shorter than one 64-row step, groups that do
// not end on a step, two heavy groups split into chunks (the last group longest, so its chunk
// ends at M); bit-equal on a second launch (the chunks' partials are summed in a fixed order)
// and right again with other counts on the same workspace (its counters were reset).
TEST(KernelsCuda, GroupedWeightGradKernelMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(21);
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  const int64_t N = 256, K = 512;
  for (const std::vector<int64_t>& counts :
       {std::vector<int64_t>{0, 5, 700, 64, 0, 1, 130, 2500, 3000}, std::vector<int64_t>{900, 900, 0, 4600, 1, 999}}) {
    int64_t M = 0;
    for (int64_t c : counts) M += c;
    const torch::Tensor offs = torch::tensor(counts).cumsum(0).to(torch::kInt).to(torch::kCUDA);
    const torch::Tensor dy = torch::randn({M, N}, bf), x = torch::randn({M, K}, bf);
    ASSERT_TRUE(grouped_wgrad_kernel_applies(dy, x, offs)) << "the kernel runs on sm_90 (H100/H200)";
    const torch::Tensor got = grouped_weight_grad(dy, x, offs), again = grouped_weight_grad(dy, x, offs);
    const torch::Tensor want = grouped_weight_grad_reference(dy, x, offs).to(torch::kFloat);  // fp32 sums, bf16
    const torch::Tensor exact = grouped_weight_grad_reference(dy.to(torch::kFloat), x.to(torch::kFloat), offs);
    const torch::Tensor aten = at::_grouped_mm(dy.t(), x, offs);
    EXPECT_EQ(got.sizes(), (std::vector<int64_t>{static_cast<int64_t>(counts.size()), N, K}));
    EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::equal(got, again)) << "two launches agree bit for bit";
    EXPECT_TRUE(torch::isfinite(got).all().item<bool>());
    EXPECT_LT(((got.to(torch::kFloat) - exact).norm() / exact.norm()).item<double>(), 4e-3);
    EXPECT_LT(((got.to(torch::kFloat) - want).norm() / want.norm()).item<double>(), 4e-3);
    EXPECT_LT(((got.to(torch::kFloat) - aten.to(torch::kFloat)).norm() / exact.norm()).item<double>(), 4e-3);
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) {
        EXPECT_EQ(got[e].abs().sum().item<float>(), 0.0f) << "empty group " << e;
      }
    }
  }
  // An Inf in the next expert's first rows (inside the 64-row step where expert 0's 130 rows end)
  // stays out of expert 0's gradient: both operands' rows past a chunk are zeroed.
  const torch::Tensor offs = torch::tensor(std::vector<int64_t>{130, 200, 400}).to(torch::kInt).to(torch::kCUDA);
  torch::Tensor dy = torch::randn({400, N}, bf), x = torch::randn({400, K}, bf);
  x[130].fill_(std::numeric_limits<float>::infinity());
  dy[131].fill_(std::numeric_limits<float>::infinity());
  const torch::Tensor got = grouped_weight_grad(dy, x, offs);
  EXPECT_TRUE(torch::isfinite(got[0]).all().item<bool>()) << "expert 0 saw the next expert's Inf rows";
  EXPECT_TRUE(torch::isfinite(got[2]).all().item<bool>());
  const torch::Tensor want = grouped_weight_grad_reference(dy.slice(0, 0, 130), x.slice(0, 0, 130),
                                                           offs.slice(0, 0, 1).clone()).to(torch::kFloat)[0];
  EXPECT_LT(((got[0].to(torch::kFloat) - want).norm() / want.norm()).item<double>(), 4e-3);
}

// The swapped-operand grouped GEMM (forward x·w[e]ᵀ and input gradient dy·w[e]) against the fp32
// loop and ATen's grouped GEMM: empty experts, one row, row counts on and off the 16-row MMA steps
// and the 256-row tiles, rows past the last offset (zeros), a fresh router's 64 experts.
TEST(KernelsCuda, GroupedGemmKernelMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(23);
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  const int64_t N = 256, K = 192;  // output features, reduction width (forward)
  std::vector<int64_t> fresh(64);
  for (auto& c : fresh) c = 180 + torch::randint(0, 80, {1}).item<int64_t>();
  for (const std::vector<int64_t>& counts :
       {std::vector<int64_t>{0, 1, 300, 17, 0, 513, 256, 15, 16, 255, 33}, fresh}) {
    int64_t used = 0;
    for (int64_t c : counts) used += c;
    const int64_t M = used + 37;  // rows past the last offset
    const int64_t E = static_cast<int64_t>(counts.size());
    const torch::Tensor offs = torch::tensor(counts).cumsum(0).to(torch::kInt).to(torch::kCUDA);
    for (bool input_grad : {false, true}) {
      SCOPED_TRACE(fmt::format("E {} input_grad {}", E, input_grad));
      // forward: x [M, K] · w[E, N, K]ᵀ; input gradient: dy [M, K] · w[E, K, N]
      const torch::Tensor x = torch::randn({M, K}, bf);
      const torch::Tensor w = (input_grad ? torch::randn({E, K, N}, bf) : torch::randn({E, N, K}, bf)) * 0.1;
      ASSERT_TRUE(grouped_gemm_kernel_applies(x, w, offs, input_grad)) << "the kernel runs on sm_90 (H100/H200)";
      auto run = [&] { return input_grad ? grouped_linear_input_grad(x, w, offs) : grouped_linear(x, w, offs); };
      const torch::Tensor got = run(), again = run();
      const torch::Tensor exact =
          grouped_linear_reference(x.to(torch::kFloat), w.to(torch::kFloat), offs, input_grad);  // fp32 operands
      const torch::Tensor aten = input_grad ? at::_grouped_mm(x, w, offs) : at::_grouped_mm(x, w.transpose(-2, -1), offs);
      EXPECT_EQ(got.sizes(), (std::vector<int64_t>{M, N}));
      EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
      EXPECT_TRUE(torch::equal(got, again)) << "two launches agree bit for bit";
      EXPECT_TRUE(torch::isfinite(got).all().item<bool>());
      const torch::Tensor in = got.slice(0, 0, used).to(torch::kFloat), ref = exact.slice(0, 0, used);
      EXPECT_LT(((in - ref).norm() / ref.norm()).item<double>(), 4e-3);
      EXPECT_LT(((in - aten.slice(0, 0, used).to(torch::kFloat)).norm() / ref.norm()).item<double>(), 4e-3);
      EXPECT_LT(max_rel_err(in, ref, 0.05), 0.02) << "each output within bf16 rounding of the fp32 sum";
      EXPECT_EQ(got.slice(0, used).abs().sum().item<float>(), 0.0f) << "rows past the last offset are zeros";
    }
  }
  // A row's output depends on its own row only: an Inf in the first row of expert 1 (inside
  // expert 0's last MMA step) stays there; offsets past M or decreasing are clamped, not trusted.
  const torch::Tensor x = torch::randn({100, K}, bf), w = torch::randn({3, N, K}, bf) * 0.1;
  torch::Tensor xi = x.clone();
  xi[37].fill_(std::numeric_limits<float>::infinity());
  auto int32_offs = [](std::vector<int64_t> ends) { return torch::tensor(ends).to(torch::kInt).to(torch::kCUDA); };
  const torch::Tensor offs = int32_offs({37, 80, 100});
  const torch::Tensor got = grouped_linear(xi, w, offs);
  EXPECT_TRUE(torch::isfinite(got.slice(0, 0, 37)).all().item<bool>()) << "expert 0 saw expert 1's Inf row";
  EXPECT_TRUE(torch::isfinite(got.slice(0, 38)).all().item<bool>());
  const torch::Tensor bad = int32_offs({50, 10, 1000000}), clamped = int32_offs({50, 50, 100});
  EXPECT_TRUE(torch::equal(grouped_linear(x, w, bad), grouped_linear(x, w, clamped)));
}

// The grouped GEMM where each CTA runs many tiles (its output buffer reused, the stage ring's
// parity carried across tiles, K loops of 1 and 5 stages against a ring of 3), the narrowest
// shapes (128 features, K = 64, fewer than 16 rows), 512 experts, all experts empty, and a CUDA
// graph replayed on new rows and new offsets.
TEST(KernelsCuda, GroupedGemmKernelManyTilesEdgesAndGraphReplay) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  torch::manual_seed(29);
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto int32_offs = [](const torch::Tensor& counts) { return counts.cumsum(0).to(torch::kInt).to(torch::kCUDA); };
  auto check = [&](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& offs, bool input_grad,
                   const std::string& what) {
    SCOPED_TRACE(what);
    ASSERT_TRUE(grouped_gemm_kernel_applies(x, w, offs, input_grad));
    const torch::Tensor got = input_grad ? grouped_linear_input_grad(x, w, offs) : grouped_linear(x, w, offs);
    const torch::Tensor want = grouped_linear_reference(x.to(torch::kFloat), w.to(torch::kFloat), offs, input_grad);
    EXPECT_TRUE(torch::isfinite(got).all().item<bool>());
    const double scale = std::max(want.norm().item<double>(), 1e-6);
    EXPECT_LT((got.to(torch::kFloat) - want).norm().item<double>() / scale, 4e-3);
  };
  // ≈ 20k rows over 64 experts, 512 features: ≈ 570 tiles, several a CTA; K = 320 (5 stages) and 64
  for (int64_t K : {320, 64}) {
    const torch::Tensor counts = torch::randint(200, 420, {64}, torch::kLong);
    const int64_t M = counts.sum().item<int64_t>();
    for (bool input_grad : {false, true}) {
      const torch::Tensor x = torch::randn({M, K}, bf);
      const torch::Tensor w = (input_grad ? torch::randn({64, K, 512}, bf) : torch::randn({64, 512, K}, bf)) * 0.1;
      check(x, w, int32_offs(counts), input_grad, fmt::format("many tiles K {} input_grad {}", K, input_grad));
    }
  }
  {  // 128 features, K = 64, five rows in one expert of three
    const torch::Tensor x = torch::randn({5, 64}, bf), w = torch::randn({3, 128, 64}, bf) * 0.1;
    check(x, w, int32_offs(torch::tensor(std::vector<int64_t>{0, 5, 0})), false, "five rows");
  }
  {  // 512 experts of 0–3 rows
    const torch::Tensor counts = torch::randint(0, 4, {512}, torch::kLong);
    const int64_t M = counts.sum().item<int64_t>();
    const torch::Tensor x = torch::randn({M, 64}, bf), w = torch::randn({512, 128, 64}, bf) * 0.1;
    check(x, w, int32_offs(counts), false, "512 experts");
  }
  {  // every expert empty: all rows are past the last offset, so all zeros
    const torch::Tensor x = torch::randn({40, 64}, bf), w = torch::randn({3, 128, 64}, bf);
    const torch::Tensor got = grouped_linear(x, w, int32_offs(torch::zeros({3}, torch::kLong)));
    EXPECT_EQ(got.abs().sum().item<float>(), 0.0f);
  }
  // Captured once, replayed on new rows and new offsets (same shapes): the tile list is rebuilt on
  // the device from the offsets at every replay.
  const torch::Tensor x = torch::randn({1000, 128}, bf), w = torch::randn({8, 256, 128}, bf) * 0.1;
  const torch::Tensor offs = int32_offs(torch::full({8}, 125, torch::kLong));
  (void)grouped_linear(x, w, offs);  // outside the capture first (the device probe, the launch set-up)
  torch::Tensor out;
  at::cuda::CUDAGraph graph(/*keep_graph=*/true);
  const c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, 0);
  {
    c10::cuda::CUDAStreamGuard guard(stream);
    graph.capture_begin();
    out = grouped_linear(x, w, offs);
    graph.capture_end();
  }
  const torch::Tensor counts = torch::tensor(std::vector<int64_t>{0, 300, 1, 255, 17, 0, 400, 27});
  x.copy_(torch::randn({1000, 128}, bf));
  offs.copy_(int32_offs(counts));
  graph.replay();
  torch::cuda::synchronize();
  const torch::Tensor want = grouped_linear_reference(x.to(torch::kFloat), w.to(torch::kFloat), offs);
  EXPECT_LT(((out.to(torch::kFloat) - want).norm() / want.norm()).item<double>(), 4e-3);
}
