#include "trainer/master_weights.h"

#include <cmath>
#include <cstring>
#include <unordered_map>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/master_adamw_kernels.h"
#endif

namespace moetrain {

ParamSwap::ParamSwap(std::vector<torch::Tensor> params, const std::vector<torch::Tensor>& with)
    : params_(std::move(params)) {
  TORCH_CHECK(params_.size() == with.size(), "ParamSwap: ", params_.size(), " parameters, ", with.size(), " replacements");
  saved_.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    TORCH_CHECK(params_[i].sizes() == with[i].sizes(), "ParamSwap: shape ", params_[i].sizes(), " vs ", with[i].sizes());
    saved_.push_back(params_[i].data());
    params_[i].set_data(with[i]);
  }
}

ParamSwap::~ParamSwap() {
  for (size_t i = 0; i < params_.size(); ++i) params_[i].set_data(saved_[i]);
}

std::vector<torch::Tensor> bf16_weight_params(torch::nn::Module& model) {
  std::vector<torch::Tensor> out;
  for (const auto& p : model.parameters())
    if (stored_in_bf16(p)) out.push_back(p);
  return out;
}

void cast_params_to_bf16(const std::vector<torch::Tensor>& params) {
  torch::NoGradGuard no_grad;
  for (const auto& p : params)
    if (p.scalar_type() != torch::kBFloat16) const_cast<torch::Tensor&>(p).set_data(p.data().to(torch::kBFloat16));
}

bool MasterWeights::fused_step(FusedAdamW& optimizer) {
#ifdef MOETRAIN_WITH_CUDA
  constexpr int64_t kChunk = 65536;  // elements per block (a multiple of 8)
  std::unordered_map<const c10::TensorImpl*, size_t> index;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!params_[i].is_cuda() || params_[i].scalar_type() != torch::kBFloat16 || !params_[i].is_contiguous()) return false;
    index[params_[i].unsafeGetTensorImpl()] = i;
  }
  if (params_.empty()) return false;
  const auto& first = static_cast<const torch::optim::AdamWOptions&>(optimizer.param_groups().at(0).options());
  for (const auto& group : optimizer.param_groups()) {  // the kernel takes one β1, β2, ε
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    if (o.amsgrad() || o.betas() != first.betas() || o.eps() != first.eps()) return false;
  }
  const auto [beta1, beta2] = first.betas();
  store_moments_as(optimizer, moment_dtype_);
  std::vector<torch::Tensor> kept;  // the params' gradients, given back after the step
  for (const auto& p : params_) kept.push_back(p.grad());
  std::vector<kernels::MasterAdamWTensor> table;
  std::vector<torch::Tensor> grads;  // contiguous bf16 gradients, alive until the launch
  int64_t chunks = 0;
  for (auto& group : optimizer.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    for (auto& p : group.params()) {
      auto it = index.find(p.unsafeGetTensorImpl());
      if (it == index.end() || !p.grad().defined()) continue;
      torch::Tensor& master = masters_[it->second];  // fp32, or the int16 remainder (split)
      auto& slot = optimizer.state()[p.unsafeGetTensorImpl()];
      if (!slot) {  // as AdamW::step initialises it (zeros like the master), in the moments' dtype
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(0);
        st->exp_avg(torch::zeros(master.sizes(), master.options().dtype(moment_dtype_)));
        st->exp_avg_sq(torch::zeros(master.sizes(), master.options().dtype(moment_dtype_)));
        slot = std::move(st);
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
      TORCH_CHECK(st.exp_avg().is_contiguous() && st.exp_avg().scalar_type() == moment_dtype_ &&
                      st.exp_avg_sq().is_contiguous() && st.exp_avg_sq().scalar_type() == moment_dtype_,
                  "MasterWeights: the AdamW moments must be contiguous ", moment_dtype_);
      st.step(st.step() + 1);
      const double t = static_cast<double>(st.step());
      grads.push_back(p.grad().to(torch::kBFloat16).contiguous());
      kernels::MasterAdamWTensor e{};
      e.master = split_ ? nullptr : master.data_ptr<float>();
      e.master_lo = split_ ? master.data_ptr<int16_t>() : nullptr;
      e.grad = grads.back().data_ptr();
      e.exp_avg = st.exp_avg().data_ptr();
      e.exp_avg_sq = st.exp_avg_sq().data_ptr();
      e.param = p.data_ptr();
      e.numel = p.numel();
      e.first_chunk = chunks;
      e.decay = static_cast<float>(1.0 - o.lr() * o.weight_decay());
      e.step_size = static_cast<float>(o.lr() / (1.0 - std::pow(beta1, t)));
      e.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
      const auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
      const bool all_aligned = aligned(master.data_ptr()) && aligned(e.grad) && aligned(e.exp_avg) &&
                               aligned(e.exp_avg_sq) && aligned(e.param);
      e.vec = !all_aligned ? 1 : e.numel % 8 == 0 ? 8 : e.numel % 4 == 0 ? 4 : 1;
      table.push_back(e);
      chunks += (e.numel + kChunk - 1) / kChunk;
    }
  }
  const torch::Device device = params_[0].device();
  if (!table.empty()) {
    // the table through pinned memory: an asynchronous copy, no host sync
    const torch::Tensor dev =
        kernels::upload_table(table.data(), table.size() * sizeof(kernels::MasterAdamWTensor), device);
    torch::Tensor scale = optimizer.pending_grad_scale();
    if (scale.defined()) scale = scale.to(device, torch::kFloat).contiguous();
    kernels::check_kernel_launch(
        kernels::launch_master_adamw(reinterpret_cast<const kernels::MasterAdamWTensor*>(dev.data_ptr()),
                                     static_cast<int>(table.size()), chunks, kChunk, static_cast<float>(beta1),
                                     static_cast<float>(beta2), static_cast<float>(first.eps()),
                                     scale.defined() ? scale.data_ptr<float>() : nullptr,
                                     moment_dtype_ == torch::kBFloat16, split_, kernels::current_stream_of(dev)),
        "master AdamW");
  }
  // the fp32 parameters (norms) take the optimizer's own step, same clip (it consumes it);
  // the bf16 ones are hidden from it for that step and keep their gradients afterwards
  for (auto& p : params_) p.mutable_grad() = torch::Tensor();
  optimizer.step();
  for (size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = kept[i];
  return true;
#else
  (void)optimizer;
  return false;
#endif
}

MasterWeights::MasterWeights(std::vector<torch::Tensor> params, torch::ScalarType moment_dtype, bool split)
    : params_(std::move(params)), moment_dtype_(moment_dtype), split_(split) {
  TORCH_CHECK(moment_dtype == torch::kFloat || moment_dtype == torch::kBFloat16,
              "MasterWeights: the moments are stored in fp32 or bf16, not ", moment_dtype);
  torch::NoGradGuard no_grad;
  masters_.reserve(params_.size());
  for (const auto& p : params_) {
    TORCH_CHECK(p.scalar_type() == torch::kFloat, "MasterWeights: the masters come from fp32 parameters, got ",
                p.scalar_type());
    masters_.push_back(split_ ? split_master_remainder(p.data()) : p.data().clone());
  }
  cast_params_to_bf16(params_);  // (the weight of a split master: the same rounding)
}

std::vector<torch::Tensor> MasterWeights::masters() const {
  if (!split_) return masters_;
  std::vector<torch::Tensor> out;
  out.reserve(masters_.size());
  for (size_t i = 0; i < masters_.size(); ++i) out.push_back(join_split_master(params_[i].data(), masters_[i]));
  return out;
}

torch::Tensor split_master_remainder(const torch::Tensor& master) {
  TORCH_CHECK(master.scalar_type() == torch::kFloat, "split_master_remainder: fp32 masters, got ", master.scalar_type());
  torch::NoGradGuard no_grad;
  const torch::Tensor m = master.contiguous();
  // the bit patterns as unsigned values in int64: no overflow, no shift of a negative number
  const torch::Tensor m_bits = m.view(torch::kInt32).to(torch::kLong).bitwise_and(0xffffffffLL);
  const torch::Tensor w_bits = m.to(torch::kBFloat16).view(torch::kInt16).to(torch::kLong).bitwise_and(0xffffLL);
  return (m_bits - w_bits * 65536).clamp(-32768, 32767).to(torch::kInt16);
}

torch::Tensor join_split_master(const torch::Tensor& weight, const torch::Tensor& remainder) {
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && remainder.scalar_type() == torch::kInt16 &&
                  weight.sizes() == remainder.sizes(),
              "join_split_master: a bf16 weight and an int16 remainder of one shape");
  torch::NoGradGuard no_grad;
  const torch::Tensor w_bits = weight.contiguous().view(torch::kInt16).to(torch::kLong).bitwise_and(0xffffLL);
  const torch::Tensor bits = (w_bits * 65536 + remainder.to(torch::kLong)).bitwise_and(0xffffffffLL);
  // values ≥ 2³¹ wrap to the negative int32 of the same bits
  return torch::where(bits >= 0x80000000LL, bits - 0x100000000LL, bits).to(torch::kInt32).view(torch::kFloat);
}

void MasterWeights::store_moments_as(FusedAdamW& optimizer, torch::ScalarType dtype) const {
  auto& state = optimizer.state();
  for (const auto& p : params_) {
    auto it = state.find(p.unsafeGetTensorImpl());
    if (it == state.end() || !it->second) continue;
    auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
    if (st.exp_avg().scalar_type() != dtype) st.exp_avg(st.exp_avg().to(dtype));
    if (st.exp_avg_sq().scalar_type() != dtype) st.exp_avg_sq(st.exp_avg_sq().to(dtype));
  }
}

int64_t MasterWeights::bytes() const {
  int64_t b = 0;
  for (const auto& m : masters_) b += static_cast<int64_t>(m.nbytes());
  return b;
}

void MasterWeights::step(FusedAdamW& optimizer, bool fused) {
  torch::NoGradGuard no_grad;
  if (fused && fused_step(optimizer)) return;
  // fp32 copies of the gradients (peak: +4 bytes a parameter)
  std::vector<torch::Tensor> kept(params_.size()), grads32(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    kept[i] = params_[i].grad();
    if (!kept[i].defined()) continue;
    grads32[i] = kept[i].to(torch::kFloat);
    params_[i].mutable_grad() = torch::Tensor();
  }
  std::vector<torch::Tensor> fp32 = split_ ? masters() : masters_;  // fp32: the masters themselves
  {
    ParamSwap swap(params_, fp32);
    for (size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = grads32[i];
    grads32.clear();
    store_moments_as(optimizer, torch::kFloat);  // AdamW's arithmetic in fp32 ...
    optimizer.step();
    store_moments_as(optimizer, moment_dtype_);  // ... the storage rounded (new state included)
    for (auto& p : params_) p.mutable_grad() = torch::Tensor();
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].data().copy_(fp32[i]);
    if (split_) masters_[i] = split_master_remainder(fp32[i]);
    params_[i].mutable_grad() = kept[i];
  }
}

}  // namespace moetrain
