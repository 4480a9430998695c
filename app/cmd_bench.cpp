// moetrain bench FILE [--steps N] [--warmup N] [--peak-tflops X]: real training steps
// of FILE's model, optimizer and batch shape (the trainer's forward_backward, clip,
// AdamW, balancer update) on synthetic tokens, timed per step after a device sync.
// Reports the median step, tokens/s, model TFLOP/s (models/params.h: 6·FLOP params
// + attention, per token), MFU against the MEASURED bf16 matmul rate of the card
// (gpu.md: 790 TFLOP/s H200, 722 H100; never the datasheet's 989) and peak memory.
// The last stdout line is one JSON object (INTERFACES.md).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <numeric>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#ifdef MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "app/cli.h"
#include "app/commands.h"
#include "app/step_profile.h"
#include "models/autocast.h"
#include "models/moe.h"
#include "models/params.h"
#include "models/transformer.h"
#include "trainer/balance.h"
#include "trainer/cuda_graph.h"
#include "trainer/distributed.h"
#include "trainer/experiment_config.h"
#include "trainer/expert_parallel.h"
#include "trainer/master_weights.h"
#include "trainer/optim.h"
#include "trainer/train_step.h"
#include "trainer/zero.h"

namespace moetrain {

namespace {

using Clock = std::chrono::steady_clock;

// Measured dense bf16 matmul rates (../shared/reference/gpu.md, LibTorch on the GPU machines).
std::optional<double> measured_peak_tflops(const std::string& device_name) {
  if (device_name.find("H200") != std::string::npos) return 790.0;
  if (device_name.find("H100") != std::string::npos) return 722.0;
  return std::nullopt;
}

std::string device_name(const torch::Device& device) {
#ifdef MOETRAIN_WITH_CUDA
  if (device.is_cuda()) return at::cuda::getCurrentDeviceProperties()->name;
#endif
  return device.is_cuda() ? "cuda" : "cpu";
}

// Peak bytes of live tensors (allocated) or held by the caching allocator (reserved). Under
// train.cuda_graph the replays allocate nothing: the graph's pool holds the activations for
// good, so the reserved peak is the comparable number there.
double peak_memory_gb(const torch::Device& device, bool reserved = false) {
#ifdef MOETRAIN_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    const auto& stat = reserved ? stats.reserved_bytes[0] : stats.allocated_bytes[0];  // [0] = StatType::AGGREGATE
    return static_cast<double>(stat.peak) / 1e9;
  }
#endif
  (void)device, (void)reserved;
  return 0.0;
}

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Prints the profile of n profiled iterations ("steps" or "layer passes") to stderr, kernels by
// GPU time, and returns it as JSON for the bench's result line.
nlohmann::json report_profile(const StepProfile& p, int64_t n_profiled, const std::string& what, size_t rows) {
  const double n = static_cast<double>(n_profiled);
  std::cerr << fmt::format("profile of {} {}: wall {:.2f} ms each, GPU busy {:.2f} ms each ({:.0f} %), {:.0f} host "
                           "syncs each, {:.0f} kernel launches each\n",
                           n_profiled, what, p.wall_ms / n, p.gpu_busy_ms / n, 100.0 * p.gpu_busy_ms / p.wall_ms,
                           static_cast<double>(p.host_syncs) / n, static_cast<double>(p.launches) / n);
  std::cerr << fmt::format("{:>9} {:>6} {:>7}  {}\n", "ms each", "% GPU", "calls", "kernel");
  nlohmann::json top = nlohmann::json::array();
  for (size_t k = 0; k < p.kernels.size() && k < rows; ++k) {
    const KernelTime& kt = p.kernels[k];
    std::cerr << fmt::format("{:>9.3f} {:>6.1f} {:>7.0f}  {}\n", kt.total_ms / n, 100.0 * kt.total_ms / p.gpu_busy_ms,
                             static_cast<double>(kt.calls) / n, kt.name.substr(0, 110));
    top.push_back({{"name", kt.name}, {"ms_per_step", kt.total_ms / n}, {"calls_per_step", kt.calls / n}});
  }
  return {{"steps", n_profiled},
          {"wall_ms_per_step", p.wall_ms / n},
          {"gpu_busy_ms_per_step", p.gpu_busy_ms / n},
          {"host_syncs_per_step", p.host_syncs / n},
          {"launches_per_step", p.launches / n},
          {"top_kernels", top}};
}

// One MoE layer of config `m` on the device with its input and output gradient: a pass is
// the forward + backward of the layer on random hidden states of one micro-batch. The input
// is bf16 under bf16 autocast, as the layer's RMSNorm hands it over in the model. A fresh
// router routes nearly uniformly, so every expert gets ≈ N·K/E rows.
struct MoELayerPass {
  MoE moe;
  torch::Tensor x, grad_y;
  bool bf16;
  MoELayerPass(const ModelConfig& m, const TrainConfig& tc, const torch::Device& device, bool bf16_)
      : moe(m), bf16(bf16_) {
    moe->to(device);
    // train.param_dtype bf16: the matrices stored in bf16, as the trainer holds them (no optimizer here)
    if (tc.param_dtype == "bf16") cast_params_to_bf16(bf16_weight_params(*moe));
    x = torch::randn({tc.micro_batch, tc.seq_len, m.hidden_size},
                     torch::TensorOptions(device).dtype(bf16 ? torch::kBFloat16 : torch::kFloat))
            .requires_grad_(true);
    grad_y = torch::randn_like(x);
  }
  void operator()() {
    for (auto& p : moe->parameters()) p.mutable_grad() = torch::Tensor();
    x.mutable_grad() = torch::Tensor();
    torch::Tensor y;
    {
      Bf16AutocastGuard autocast(bf16);
      y = moe(x).y;
    }
    y.backward(grad_y.to(y.scalar_type()));
  }
};

// Milliseconds of each of n passes, each timed between device syncs.
std::vector<double> time_passes(MoELayerPass& pass, const torch::Device& device, int64_t n) {
  std::vector<double> ms;
  for (int64_t i = 0; i < n; ++i) {
    sync(device);
    const auto t0 = Clock::now();
    pass();
    sync(device);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return ms;
}

// --moe-layer: forward + backward of one MoE layer of the config (router, permutation,
// routed and shared experts), median of `steps` passes.
// --scale-experts E2 (issue 9's expert scaling): the same layer with E2 routed experts (same
// top-k) in the same process, the two timed in interleaved rounds (A B, then B A, ...) so
// that clock and thermal drift between calls falls on both alike; reports both medians and
// their ratio, and the spread of the per-round ratios.
nlohmann::json bench_moe_layer(const ExperimentConfig& cfg, const torch::Device& device, bool bf16, int64_t steps,
                               int64_t warmup, int64_t profile_n, size_t profile_rows, const std::string& trace,
                               int64_t scale_experts) {
  const ModelConfig& m = cfg.model;
  const int64_t tokens = cfg.train.micro_batch * cfg.train.seq_len;
  MoELayerPass pass(m, cfg.train, device, bf16);
  auto describe = [&](const ModelConfig& mc, double med) {
    return fmt::format("{}: MoE layer forward + backward {:.2f} ms ({} routed experts, top-{}, {} shared, {} tokens)\n",
                       device_name(device), med, mc.n_routed_experts, mc.num_experts_per_tok, mc.n_shared_experts,
                       tokens);
  };
  nlohmann::json result = {{"n_routed_experts", m.n_routed_experts},
                           {"top_k", m.num_experts_per_tok},
                           {"param_dtype", cfg.train.param_dtype},
                           {"tokens", tokens},
                           {"device", device_name(device)}};
  if (scale_experts > 0) {
    ModelConfig m2 = m;
    m2.n_routed_experts = scale_experts;
    if (scale_experts < m.num_experts_per_tok || scale_experts % m.n_group != 0)
      throw UsageError(fmt::format("moetrain bench: --scale-experts {} must be >= num_experts_per_tok {} and a multiple "
                                   "of n_group {}",
                                   scale_experts, m.num_experts_per_tok, m.n_group));
    MoELayerPass pass2(m2, cfg.train, device, bf16);
    time_passes(pass, device, warmup);
    time_passes(pass2, device, warmup);
    const int64_t rounds = std::max<int64_t>(1, std::min<int64_t>(10, steps / 5));
    const int64_t per_round = std::max<int64_t>(1, steps / rounds);
    std::vector<double> all_a, all_b, round_ratio;
    for (int64_t r = 0; r < rounds; ++r) {
      std::vector<double> a, b;
      if (r % 2 == 0) {
        a = time_passes(pass, device, per_round);
        b = time_passes(pass2, device, per_round);
      } else {
        b = time_passes(pass2, device, per_round);
        a = time_passes(pass, device, per_round);
      }
      round_ratio.push_back(median(b) / median(a));
      all_a.insert(all_a.end(), a.begin(), a.end());
      all_b.insert(all_b.end(), b.begin(), b.end());
    }
    const double med_a = median(all_a), med_b = median(all_b);
    const auto [lo, hi] = std::minmax_element(round_ratio.begin(), round_ratio.end());
    std::cout << describe(m, med_a) << describe(m2, med_b);
    std::cout << fmt::format("MoE layer scaling {} -> {} routed experts: {:.3f}x (median of {} interleaved rounds of {} "
                             "passes each; per-round ratios {:.3f}-{:.3f})\n",
                             m.n_routed_experts, scale_experts, med_b / med_a, rounds, per_round, *lo, *hi);
    result["moe_layer_ms"] = med_a;
    result["scaled_n_routed_experts"] = scale_experts;
    result["scaled_moe_layer_ms"] = med_b;
    result["scaling_ratio"] = med_b / med_a;
    result["round_ratios"] = round_ratio;
    result["peak_mem_gb"] = peak_memory_gb(device);
    return result;
  }
  time_passes(pass, device, warmup);
  const std::vector<double> ms = time_passes(pass, device, steps);
  nlohmann::json profile = nullptr;
  if (profile_n > 0) {
    if (!device.is_cuda()) throw UsageError("moetrain bench: --profile needs train.device cuda");
    profile = report_profile(profile_steps([&] { pass(); }, profile_n, trace), profile_n, "layer passes", profile_rows);
  }
  const double med = median(ms);
  std::cout << describe(m, med);
  result["moe_layer_ms"] = med;
  result["moe_layer_ms_min"] = *std::min_element(ms.begin(), ms.end());
  result["peak_mem_gb"] = peak_memory_gb(device);
  result["profile"] = profile;
  return result;
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  ArgParser args("bench", "FILE [--steps N] [--warmup N] [--peak-tflops X] [--moe-layer] [--set KEY=VALUE]...",
                 "Time real training steps of FILE's model, optimizer and batch (train.global_batch × seq_len,\n"
                 "micro_batch, device, dtype) on synthetic tokens: forward + backward over the micro-batches,\n"
                 "gradient clipping, AdamW and the balancer update, as `moetrain train` runs them.\n"
                 "Prints the median step time, tokens/s, model TFLOP/s, MFU against the measured bf16 matmul\n"
                 "rate of the card (H200 790, H100 722 TFLOP/s; other cards need --peak-tflops) and peak GPU\n"
                 "memory. The last stdout line is one JSON object: tokens_per_s, step_ms, tflops, mfu,\n"
                 "peak_mem_gb, device. Under torchrun / `moetrain launch` every rank takes its share of the\n"
                 "global batch (data parallel, gradients averaged); rank 0 reports (tflops and mfu per GPU).");
  args.positional("FILE", "experiment config (YAML)");
  args.option("steps", "N", "timed steps", "20");
  args.option("warmup", "N", "untimed steps first (allocator, cuBLAS heuristics, autotuning)", "5");
  args.option("peak-tflops", "X", "the card's measured bf16 matmul rate for MFU (default: a table by GPU name)");
  args.option("seed", "N", "seed of the synthetic tokens and the initial weights", "1234");
  args.option("profile", "N", "after timing, profile N more steps (CUDA): GPU time by kernel, syncs, launches", "0");
  args.option("profile-rows", "N", "with --profile: how many kernels the table lists, by GPU time", "25");
  args.option("trace", "FILE", "with --profile: also save a Chrome trace (chrome://tracing, Perfetto)");
  args.flag("moe-layer", "time one MoE layer's forward + backward (one micro-batch) instead of whole steps");
  args.option("scale-experts", "E",
              "with --moe-layer: also time the layer with E routed experts (same top-k), interleaved in one process,\n"
              "and print the ratio (issue 9's expert scaling)");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    const ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    const TrainConfig& tc = cfg.train;
    const int64_t steps = std::stoll(args.get("steps")), warmup = std::stoll(args.get("warmup"));
    if (steps < 1 || warmup < 0) throw UsageError("moetrain bench: --steps must be >= 1 and --warmup >= 0");
    if (tc.device == "cuda" && !torch::cuda::is_available())
      throw UsageError("moetrain bench: train.device is cuda but no CUDA device is available");
    if (tc.global_batch % tc.micro_batch != 0)
      throw UsageError(fmt::format("moetrain bench: train.global_batch {} is not a multiple of train.micro_batch {}",
                                   tc.global_batch, tc.micro_batch));
    if (tc.threads > 0) torch::set_num_threads(static_cast<int>(tc.threads));
    // Data parallel under torchrun / `moetrain launch`: each rank takes its share of the
    // global batch and the gradients are averaged, as `moetrain train` does.
    const DistEnv env = DistEnv::from_env();
    ProcessGroup pg(env, dist_backend(cfg.distributed.backend, tc.device), std::chrono::seconds(cfg.distributed.timeout_s));
    const int64_t world = pg.world_size();
    if (tc.global_batch % (tc.micro_batch * world) != 0)
      throw UsageError(fmt::format("moetrain bench: train.global_batch {} is not a multiple of micro_batch {} × {} ranks",
                                   tc.global_batch, tc.micro_batch, world));
    torch::Device device = torch::kCPU;
    if (tc.device == "cuda") {
      device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank % torch::cuda::device_count()));
#ifdef MOETRAIN_WITH_CUDA
      c10::cuda::set_device(device.index());
#endif
    }
    const std::string name = device_name(device);
    std::optional<double> peak = measured_peak_tflops(name);
    if (args.given("peak-tflops")) peak = std::stod(args.get("peak-tflops"));

    const uint64_t seed = std::stoull(args.get("seed"));
    torch::manual_seed(seed);
    const auto profile_rows = static_cast<size_t>(std::stoull(args.get("profile-rows")));
    if (args.has("moe-layer")) {
      std::cout << bench_moe_layer(cfg, device, tc.dtype == "bf16" && device.is_cuda(), steps, warmup,
                                   std::stoll(args.get("profile")), profile_rows, args.get("trace"),
                                   args.given("scale-experts") ? std::stoll(args.get("scale-experts")) : 0)
                       .dump() << "\n";
      return 0;
    }
    Transformer model(cfg.model);
    model->activation_checkpointing = tc.activation_checkpointing == "full";
    // distributed.ep_size > 1: the routed experts sharded over EP groups, as `moetrain train` does
    // (every rank builds the same model from the seed, so no broadcast is needed)
    ExpertParallel ep(pg, cfg.distributed.ep_size);
    ep.shard(model);
    model->to(device);
    // replicated FusedAdamW, or ZeRO-1 (distributed.zero_stage: 1) as the trainer builds it
    const bool zero = cfg.distributed.zero_stage == 1;
    ModelOptimizer built = build_model_optimizer(*model, cfg, pg);
    built.use_bf16_weights(*model);  // train.param_dtype bf16: bf16 matrices, fp32 masters
    FusedAdamW* optimizer = built.replicated.get();
    ZeroAdamW* zero_opt = built.zero.get();
    if (zero)
      zero_opt->set_lr(cfg.optim.lr);
    else
      set_lr(*optimizer, cfg.optim.lr);
    Balancer balancer(cfg.balance, cfg.model, model->routers());
    // replicated data parallel: gradients averaged during the backward, as the trainer does
    std::unique_ptr<GradReducer> reducer;
    if (world > 1 && !zero && cfg.distributed.overlap_grad_reduce)
      reducer = std::make_unique<GradReducer>(ep.replicated_params(), pg, cfg.distributed.bucket_mb << 20);

    // A few distinct synthetic global batches on the device, used in turn.
    const int64_t accum = tc.global_batch / (tc.micro_batch * world);  // micro-steps per rank
    auto gen = at::detail::createCPUGenerator(seed + static_cast<uint64_t>(pg.rank()));
    std::vector<torch::Tensor> batches;  // this rank's rows of the global batch
    for (int k = 0; k < 4; ++k)
      batches.push_back(
          torch::randint(cfg.model.vocab_size, {tc.global_batch / world, tc.seq_len + 1}, gen, torch::kInt64).to(device));
    ForwardBackwardOptions fb;
    fb.accum = accum;
    fb.seq_len = tc.seq_len;
    fb.bf16_autocast = tc.dtype == "bf16" && device.is_cuda();
    fb.bf16_logits = fb.bf16_autocast && tc.logits_dtype == "bf16";
    fb.reducer = reducer.get();
    // one process: the clipping norm summed during the backward (trainer/grad_norm_tracker.h)
    const std::unique_ptr<GradNormTracker> norm_tracker =
        norm_tracker_for(ep.replicated_params(), world == 1 && !zero && !ep.enabled());
    fb.norm_tracker = norm_tracker.get();

    const ParamCounts pc = count_params(cfg.model, tc.seq_len);
    const int64_t tokens_per_step = tc.global_batch * tc.seq_len;
    if (pg.is_main())
      std::cerr << fmt::format(
          "bench: {} on {} ({}) × {} ranks, {} warmup + {} timed steps of {} × {} tokens ({} micro-steps per rank), {}\n",
          args.pos(0), tc.device, name, world, warmup, steps, tc.global_batch, tc.seq_len, accum,
          fb.bf16_autocast ? (tc.param_dtype == "bf16" ? "bf16 weights (fp32 masters)" : "bf16 autocast") : "fp32");
    const double clip = cfg.optim.grad_clip > 0.0 ? cfg.optim.grad_clip : std::numeric_limits<double>::infinity();
    int64_t step_index = 0;
    StepLosses sums;
    torch::Tensor last_counts;  // [L_moe, E] the last step's expert loads (a device copy: no sync)
    auto fb_over = [&](const torch::Tensor& tokens, const ForwardBackwardOptions& options) {  // over these rows
      return forward_backward(
          model, balancer,
          [&](int64_t m) {
            torch::Tensor rows = tokens.narrow(0, m * tc.micro_batch, tc.micro_batch);
            return Batch{rows.narrow(1, 0, tc.seq_len), rows.narrow(1, 1, tc.seq_len)};
          },
          options);
    };
    // train.cuda_graph: the forward + backward captured once over a fixed token buffer
    std::unique_ptr<CapturedForwardBackward> graph;
    torch::Tensor graph_tokens, graph_mtp_weight;
    if (tc.cuda_graph) {
      if (world > 1) throw UsageError("moetrain bench: train.cuda_graph runs one process");
      graph_tokens = torch::empty_like(batches[0]);
      graph_mtp_weight = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(device));
      graph = std::make_unique<CapturedForwardBackward>(
          [&] {
            ForwardBackwardOptions captured = fb;
            captured.mtp_weight_device = graph_mtp_weight;
            return fb_over(graph_tokens, captured);
          },
          model->parameters(), [&] { balancer.discard_step(); });
    }
    auto train_step = [&] {  // one optimizer step, as `moetrain train` takes it
      const torch::Tensor& tokens = batches[static_cast<size_t>(step_index % 4)];
      fb.mtp_weight = mtp_loss_weight_at(tc, step_index);
      if (graph) {
        graph_tokens.copy_(tokens);
        graph_mtp_weight.fill_(fb.mtp_weight);
        sums = graph->run();
      } else {
        model->zero_grad();
        sums = fb_over(tokens, fb);
      }
      pg.all_reduce(balancer.mutable_counts(), ReduceOp::kSum);
      if (zero) {  // reduce-scatter, global norm over the shards, shard update, all-gather
        zero_opt->reduce_gradients();
        zero_opt->clip_grad_norm(clip);
        zero_opt->step();
      } else {  // the trainer's path (without its one host read of the norm, for logging)
        if (reducer)
          ep.reduce_expert_gradients();  // the replicated ones were averaged during the backward
        else
          ep.reduce_gradients();
        // the global norm on the device (each expert shard once), the clipping inside the fused update
        const torch::Tensor norm = sums.grad_norm.defined() ? sums.grad_norm : ep.grad_norm();
        if (std::isfinite(clip)) optimizer->clip_next_step(norm, clip);
        built.step_replicated();
      }
      ++step_index;
      last_counts = balancer.counts().clone();
      balancer.after_step(step_index, step_index * tokens_per_step);
    };
    std::vector<double> step_ms;
    double last_loss = 0.0;
    for (int64_t i = 0; i < warmup + steps; ++i) {
      sync(device);
      const auto t0 = Clock::now();
      train_step();
      sync(device);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      if (i >= warmup) step_ms.push_back(ms);
      if (i + 1 == warmup + steps) last_loss = sums.means(accum)[0];
      if (pg.is_main())
        std::cerr << fmt::format("\r{} step {:>4}/{}: {:.1f} ms  ", i < warmup ? "warmup" : "timed ",
                                 i < warmup ? i + 1 : i + 1 - warmup, i < warmup ? warmup : steps, ms)
                  << std::flush;
    }
    if (pg.is_main()) std::cerr << "\n";
    if (!std::isfinite(last_loss)) throw std::runtime_error("moetrain bench: the loss became non-finite");

    nlohmann::json profile = nullptr;
    const int64_t profile_steps_n = std::stoll(args.get("profile"));
    if (profile_steps_n > 0) {
      if (!device.is_cuda()) throw UsageError("moetrain bench: --profile needs train.device cuda");
      const StepProfile p = profile_steps(train_step, profile_steps_n, pg.is_main() ? args.get("trace") : "");
      if (!pg.is_main()) return 0;
      profile = report_profile(p, profile_steps_n, "steps", profile_rows);
    }

    if (!pg.is_main()) return 0;
    const double ms = median(step_ms);
    // How balanced the routing was: the grouped GEMMs' weight gradients slow down on a skewed one.
    const std::vector<double> maxvio = last_counts.defined() && last_counts.numel() > 0
                                           ? max_violation_per_row(last_counts)
                                           : std::vector<double>{};
    const double maxvio_mean = maxvio.empty() ? 0.0 : std::accumulate(maxvio.begin(), maxvio.end(), 0.0) / maxvio.size();
    const double maxvio_max = maxvio.empty() ? 0.0 : *std::max_element(maxvio.begin(), maxvio.end());
    const double tokens_per_s = static_cast<double>(tokens_per_step) / (ms / 1e3);
    const double tflops = pc.flops_per_token * tokens_per_s / 1e12 / static_cast<double>(world);  // per GPU
    nlohmann::json j = {{"tokens_per_s", tokens_per_s},
                        {"world_size", world},
                        {"zero_stage", cfg.distributed.zero_stage},
                        {"overlap_grad_reduce", reducer != nullptr},
                        {"bucket_mb", cfg.distributed.bucket_mb},
                        {"activation_checkpointing", tc.activation_checkpointing},
                        {"param_dtype", tc.param_dtype},
                        {"logits_dtype", fb.bf16_logits ? "bf16" : "fp32"},
                        {"cuda_graph", tc.cuda_graph},
                        {"graph_memsets_replaced", graph ? graph->replaced_memsets() : 0},
                        {"graph_high_priority_kernels", graph ? graph->high_priority_kernels() : 0},
                        {"norm_in_backward", norm_tracker != nullptr},
                        {"tokens_per_s_per_gpu", tokens_per_s / static_cast<double>(world)},
                        {"step_ms", ms},
                        {"step_ms_min", *std::min_element(step_ms.begin(), step_ms.end())},
                        {"step_ms_max", *std::max_element(step_ms.begin(), step_ms.end())},
                        {"tflops", tflops},
                        {"mfu", peak ? nlohmann::json(tflops / *peak) : nlohmann::json(nullptr)},
                        {"peak_tflops", peak ? nlohmann::json(*peak) : nlohmann::json(nullptr)},
                        {"peak_mem_gb", peak_memory_gb(device)},
                        {"peak_reserved_gb", peak_memory_gb(device, /*reserved=*/true)},
                        {"device", name},
                        {"params", pc.total},
                        {"flops_per_token", pc.flops_per_token},
                        {"tokens_per_step", tokens_per_step},
                        {"steps", steps},
                        {"warmup", warmup},
                        {"loss", last_loss},
                        {"maxvio_layers", maxvio},
                        {"profile", profile}};
    std::cout << fmt::format("{}{}: median step {:.1f} ms, {:.0f} tokens/s, {:.1f} TFLOP/s{}, MFU {}, peak memory {:.1f} GB "
                             "({:.1f} GB reserved), MaxVio of the last step {:.2f} mean / {:.2f} max over MoE layers{}\n",
                             name, world > 1 ? fmt::format(" × {}", world) : "", ms, tokens_per_s, tflops,
                             world > 1 ? " per GPU" : "",
                             peak ? fmt::format("{:.1f} %", 100.0 * tflops / *peak) : "n/a", j["peak_mem_gb"].get<double>(),
                             j["peak_reserved_gb"].get<double>(), maxvio_mean, maxvio_max,
                             graph ? fmt::format("; CUDA graph, {} memset nodes as kernels{}", graph->replaced_memsets(),
                                                 graph->high_priority_kernels() > 0
                                                     ? fmt::format(", {} kernel nodes by priority",
                                                                   graph->high_priority_kernels())
                                                     : "")
                                   : "");
    std::cout << j.dump() << "\n";
    return 0;
  });
}

}  // namespace moetrain
