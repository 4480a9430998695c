#include "trainer/trainer.h"

#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <sstream>

#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "data/meta.h"
#include "data/progress.h"
#include "data/tokenizer.h"
#include "io/hf.h"
#include "models/autocast.h"
#include "models/lm_loss.h"
#include "models/transformer.h"
#include "trainer/balance.h"
#include "trainer/checkpoint.h"
#include "trainer/cuda_graph.h"
#include "trainer/distributed.h"
#include "trainer/evaluate.h"
#include "trainer/expert_parallel.h"
#include "trainer/grad_reducer.h"
#include "trainer/metrics.h"
#include "trainer/optim.h"
#include "trainer/train_step.h"
#include "trainer/zero.h"

namespace moetrain {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

nlohmann::json to_json_2d(const torch::Tensor& t) {  // [L, E] -> [[...], ...]
  nlohmann::json rows = nlohmann::json::array();
  torch::Tensor c = t.to(torch::kCPU).to(torch::kFloat64).contiguous();
  for (int64_t l = 0; l < c.size(0); ++l) {
    auto row = c[l];
    rows.push_back(std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + row.numel()));
  }
  return rows;
}

double mean_of(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

// Greedy continuation of `prompt` (a full forward per token: a short sample, no cache).
std::vector<int64_t> greedy_sample(Transformer& model, std::vector<int64_t> ids, int64_t new_tokens, int64_t max_len,
                                   torch::Device device) {
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < new_tokens; ++i) {
    int64_t start = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - max_len);
    std::vector<int64_t> window(ids.begin() + start, ids.end());
    torch::Tensor x = torch::tensor(window, torch::kInt64).view({1, -1}).to(device);
    ForwardOut out = model->forward(x);
    torch::Tensor last = out.hidden.index({0, -1});
    ids.push_back(model->logits(last).argmax(-1).item<int64_t>());
  }
  return ids;
}

// Test-only fault injection (MOETRAIN_TEST_INJECT, see trainer.h): which kinds fire at which
// 1-based optimizer steps (KIND@RANK: only on that data-parallel rank).
class TestInjection {
 public:
  explicit TestInjection(int64_t rank) {
    const char* env = std::getenv("MOETRAIN_TEST_INJECT");
    if (!env) return;
    std::stringstream ss(env);
    std::string item;
    while (std::getline(ss, item, ',')) {
      auto colon = item.find(':');
      if (colon == std::string::npos) throw std::runtime_error("MOETRAIN_TEST_INJECT: expected KIND:STEP[-STEP2], got " + item);
      std::string range = item.substr(colon + 1);
      auto dash = range.find('-');
      int64_t a = std::stoll(range.substr(0, dash)), b = dash == std::string::npos ? a : std::stoll(range.substr(dash + 1));
      std::string kind = item.substr(0, colon);
      if (auto at = kind.find('@'); at != std::string::npos) {
        if (std::stoll(kind.substr(at + 1)) != rank) continue;
        kind = kind.substr(0, at);
      }
      rules_.push_back({kind, a, b});
    }
  }
  bool at(const std::string& kind, int64_t step) const {
    for (const auto& r : rules_)
      if (r.kind == kind && step >= r.first && step <= r.last) return true;
    return false;
  }

 private:
  struct Rule {
    std::string kind;
    int64_t first, last;
  };
  std::vector<Rule> rules_;
};

// Starting weights from an HF DeepseekV3 directory; its architecture must be the config's.
void init_from_hf(const std::string& dir, const ModelConfig& want, Transformer& model) {
  nlohmann::json have = hf_config_to_json(load_hf_config(dir)), need = hf_config_to_json(want);
  std::string diff;
  for (const auto& [key, value] : need.items()) {
    if (key == "initializer_range" || key == "max_position_embeddings") continue;  // not part of the weights' meaning
    if (!have.contains(key) || have[key] != value)
      diff += fmt::format("\n  {}: config {} vs {} {}", key, value.dump(), dir, have.contains(key) ? have[key].dump() : "(absent)");
  }
  if (!diff.empty()) throw CheckpointError(fmt::format("--init-from {}: architecture differs from the config:{}", dir, diff));
  const int64_t n = load_hf_weights(dir, *model, want);
  std::cerr << fmt::format("init: {} tensors from {}\n", n, dir);
}

// Data parallel: every rank's loss sums become the sums over all ranks (one all-reduce),
// so the means, and the NaN / spike decisions taken from them, agree everywhere.
void all_reduce_losses(ProcessGroup& pg, StepLosses& sums) {
  if (pg.world_size() == 1) return;
  torch::Tensor all = torch::stack({sums.lm, sums.aux, sums.seq_aux, sums.z, sums.mtp});
  pg.all_reduce(all, ReduceOp::kSum);
  sums = StepLosses{all[0], all[1], all[2], all[3], all[4], sums.grad_norm};
}

}  // namespace

TrainResult train(const ExperimentConfig& cfg, const TrainOptions& options) {
  const TrainConfig& tc = cfg.train;
  if (tc.threads > 0) torch::set_num_threads(static_cast<int>(tc.threads));
  torch::manual_seed(static_cast<uint64_t>(tc.seed));
  if (tc.device == "cuda" && !torch::cuda::is_available())
    throw std::runtime_error("train.device is cuda but no CUDA device is available");
  // Data parallel (trainer/distributed.h): rank 0 alone writes metrics, console progress,
  // samples and checkpoints; every rank computes the same validation.
  ProcessGroup pg(options.dist, dist_backend(cfg.distributed.backend, tc.device),
                  std::chrono::seconds(cfg.distributed.timeout_s));
  const bool main_rank = pg.is_main();
  const int64_t rank = pg.rank(), world = pg.world_size();
  torch::Device device = torch::kCPU;
  if (tc.device == "cuda")
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(options.dist.local_rank % torch::cuda::device_count()));

  // --- data, model, optimizer, balancer --------------------------------------------
  DataLoader loader(cfg.data.dir, tc);
  check_compatible(loader.meta(), cfg.model, tc);
  Transformer model(cfg.model);
  model->activation_checkpointing = tc.activation_checkpointing == "full";
  if (!options.init_from.empty() && options.resume.empty()) init_from_hf(options.init_from, cfg.model, model);
  ExpertParallel ep(pg, cfg.distributed.ep_size);  // EP / EDP groups (trainer/expert_parallel.h)
  ep.shard(model);                                 // this rank's routed experts only (ep_size > 1)
  model->to(device);
  // the optimizer: replicated AdamW (zero_stage 0) or its ZeRO-1 sharding (trainer/zero.h)
  // (zero_stage 1 with ep_size > 1 is refused by validate_config)
  const bool zero = cfg.distributed.zero_stage == 1;
  ModelOptimizer built = build_model_optimizer(*model, cfg, pg);
  FusedAdamW* optimizer = built.replicated.get();
  ZeroAdamW* zero_opt = built.zero.get();
  Balancer balancer(cfg.balance, cfg.model, model->routers());
  TrainResult result;
  int64_t consecutive_skips = 0;
  LossSpikeDetector spikes(cfg.checkpoint.spike_factor);

  // --- resume: model, optimizer, RNG, data cursor and counters from a checkpoint ------
  const std::string resume_dir = resolve_resume(cfg.checkpoint.dir, options.resume);
  if (!resume_dir.empty()) {
    TrainingState st = zero ? load_checkpoint(resume_dir, cfg, model, *zero_opt)
                            : load_checkpoint(resume_dir, cfg, model, *optimizer, ep.expert_shard());
    loader.load_state(st.data);
    result.resumed_step = result.steps = st.step;
    result.skipped_steps = st.skipped_steps;
    consecutive_skips = st.consecutive_skips;
    spikes.restore(st.recent_losses);
  }
  ep.broadcast_model(model);  // identical starting points, whatever the init or checkpoint
  // train.param_dtype bf16: the matrices become bf16, their fp32 masters go to the optimizer
  // (trainer/master_weights.h) — after the resume, which loads fp32 weights
  built.use_bf16_weights(*model);
  int64_t last_saved_step = result.resumed_step;
  auto save_now = [&](int64_t steps_done) {
    TrainingState st{steps_done, loader.state(), result.skipped_steps, consecutive_skips, spikes.recent()};
    const auto fp32_weights = built.expose_fp32_weights();  // checkpoints hold the fp32 masters
    if (zero) {  // every rank writes its optimizer shard; rank 0 the rest and the commit
      std::string path = save_checkpoint(cfg, model, *zero_opt, st, pg);
      if (main_rank) result.last_checkpoint = path;
    } else if (ep.enabled()) {  // each expert shard's first replica writes it, rank 0 commits
      result.last_checkpoint = ep.save_checkpoint(cfg, model, *optimizer, st);
    } else if (main_rank) {  // the ranks hold the same state: one writer
      result.last_checkpoint = save_checkpoint(cfg, model, *optimizer, st);
    }
    if (main_rank) std::cerr << "\ncheckpoint: " << result.last_checkpoint << "\n";
    last_saved_step = steps_done;
    pg.barrier();  // nobody runs ahead (or exits) before the checkpoint is complete
  };
  StopSignals signals;  // SIGINT/SIGTERM: stop after this step; SIGUSR1: save after this step
  const TestInjection inject(rank);

  std::optional<MetricsLog> metrics;
  if (main_rank) metrics.emplace(cfg.logging.dir, /*truncate=*/resume_dir.empty());  // a resumed run appends
  const int64_t accum = loader.accumulation_steps(world);
  const bool bf16_autocast = tc.dtype == "bf16" && device.is_cuda();
  const int64_t tokens_per_step = tc.global_batch * tc.seq_len;
  // data parallel: the replicated gradients averaged during the backward (trainer/grad_reducer.h);
  // ZeRO-1 reduce-scatters after it, expert gradients are reduced over their EDP group after it
  std::unique_ptr<GradReducer> reducer;
  if (world > 1 && !zero && cfg.distributed.overlap_grad_reduce)
    reducer = std::make_unique<GradReducer>(ep.replicated_params(), pg, cfg.distributed.bucket_mb << 20);

  if (main_rank)
    std::cerr << fmt::format("train: {} steps × {} sequences × {} tokens ({} micro-steps of {}{}), {} on {}; metrics → {}\n",
                             tc.steps, tc.global_batch, tc.seq_len, accum, tc.micro_batch,
                             world > 1 ? fmt::format(" on each of {} ranks over {}{}", world, pg.backend(),
                                                     zero ? ", ZeRO-1" : "")
                                       : "",
                             cfg.balance.strategy.empty() ? "no balancing" : fmt::format("{}", fmt::join(cfg.balance.strategy, "+")),
                             tc.device, metrics->path());

  const int64_t first_step = loader.state().step;
  auto run_start = Clock::now();
  auto log_window_start = Clock::now();
  int64_t log_window_tokens = 0;
  auto run_eval = [&](int64_t step) {
    EvalResult e = evaluate(model, loader, cfg, device);
    result.val_loss = e.loss;
    result.val_ppl = std::exp(e.loss);
    result.maxvio_global = mean_of(e.maxvio_layers);
    if (!main_rank) return;
    metrics->write({{"kind", "eval"}, {"step", step}, {"tokens", loader.state().tokens}, {"val_loss", e.loss},
                   {"val_ppl", result.val_ppl}, {"maxvio_global", result.maxvio_global},
                   {"maxvio_global_layers", e.maxvio_layers}, {"epochs", loader.epochs()}});
    std::cerr << fmt::format("\neval step {}: val loss {:.4f}, ppl {:.2f}, MaxVio_global {:.3f}\n", step, e.loss,
                             result.val_ppl, result.maxvio_global);
  };

  // train.cuda_graph: the forward + backward over fixed token buffers (and a device λ), captured
  // at the first step and replayed after (trainer/cuda_graph.h); the fault injections of the
  // loss and the gradients need the eager step.
  std::unique_ptr<CapturedForwardBackward> graph;
  torch::Tensor graph_inputs, graph_targets;  // [accum, micro_batch, seq_len] int64 on the device
  torch::Tensor graph_mtp_weight;             // λ of the step, refilled before each replay
  ForwardBackwardOptions step_fb;             // what every step's forward + backward shares
  step_fb.accum = accum;
  step_fb.seq_len = tc.seq_len;
  step_fb.bf16_autocast = bf16_autocast;
  step_fb.bf16_logits = bf16_autocast && tc.logits_dtype == "bf16";
  // one process: the clipping norm summed during the backward (trainer/grad_norm_tracker.h)
  const std::unique_ptr<GradNormTracker> norm_tracker =
      norm_tracker_for(ep.replicated_params(), world == 1 && !zero && !ep.enabled());
  step_fb.norm_tracker = norm_tracker.get();
  if (tc.cuda_graph) {
    if (world > 1) throw std::runtime_error("train.cuda_graph: CUDA graphs are for one process (world size 1)");
    const auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
    graph_inputs = torch::empty({accum, tc.micro_batch, tc.seq_len}, opts);
    graph_targets = torch::empty({accum, tc.micro_batch, tc.seq_len}, opts);
    ForwardBackwardOptions fb = step_fb;
    graph_mtp_weight = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat).device(device));
    fb.mtp_weight_device = graph_mtp_weight;
    graph = std::make_unique<CapturedForwardBackward>(
        [&, fb] {
          return forward_backward(
              model, balancer, [&](int64_t m) { return Batch{graph_inputs[m], graph_targets[m]}; }, fb);
        },
        model->parameters(), [&] { balancer.discard_step(); });
  }

  // ================================ TRAINING SECTION BEGIN ================================
  for (int64_t step = loader.state().step; step < tc.steps; ++step) {
    if (inject.at("sigterm", step + 1)) std::raise(SIGTERM);
    if (inject.at("sigusr1", step + 1)) std::raise(SIGUSR1);
    const double lr = lr_at(step, cfg.optim, tc.steps);
    if (zero) {
      zero_opt->set_lr(lr);
      model->zero_grad();
    } else {
      set_lr(*optimizer, lr);
      if (!graph) optimizer->zero_grad();  // a captured backward rewrites the gradients
    }

    // forward + backward over the micro-steps of this global batch
    const double mtp_weight = mtp_loss_weight_at(tc, step);
    StepLosses sums;
    if (graph) {
      for (int64_t m = 0; m < accum; ++m) {
        const Batch b = loader.micro_batch(step, m, rank, world);
        graph_inputs[m].copy_(b.inputs);
        graph_targets[m].copy_(b.targets);
      }
      graph_mtp_weight.fill_(mtp_weight);
      sums = graph->run();
    } else {
      ForwardBackwardOptions fb = step_fb;
      fb.mtp_weight = mtp_weight;
      fb.poison_loss = inject.at("nan_loss", step + 1);
      fb.poison_grad = inject.at("nan_grad", step + 1);
      fb.reducer = reducer.get();
      sums = forward_backward(
          model, balancer, [&](int64_t m) { return loader.micro_batch(step, m, rank, world); }, fb);
    }
    // data parallel: sum the losses and the expert counts, average the gradients, so every
    // rank takes the same decisions, the same bias update and the same optimizer step
    all_reduce_losses(pg, sums);
    pg.all_reduce(balancer.mutable_counts(), ReduceOp::kSum);
    if (zero)
      zero_opt->reduce_gradients();  // reduce-scatter: this rank's shard of the averaged gradient
    else if (reducer)
      ep.reduce_expert_gradients();  // replicated ones: averaged during the backward
    else
      ep.reduce_gradients();  // replicated: average over all ranks; experts: over their EDP group
    const std::vector<double> means = sums.means(accum * world);
    const double lm_loss = means[0], aux = means[1], seq_aux = means[2], z = means[3];
    const double mtp_loss = means[4];  // unweighted mean over depths (comparable with lm_loss)
    const double loss =
        (lm_loss + mtp_weight * mtp_loss + aux + seq_aux + z) * (inject.at("spike", step + 1) ? 1000.0 : 1.0);

    // clip; never step the optimizer or the biases on non-finite values
    const double max_norm = cfg.optim.grad_clip > 0.0 ? cfg.optim.grad_clip : std::numeric_limits<double>::infinity();
    // replicated optimizer: the global norm on the device (each expert shard once), read once;
    // the clipping folded into the fused AdamW step
    const torch::Tensor norm = zero ? torch::Tensor() : sums.grad_norm.defined() ? sums.grad_norm : ep.grad_norm();
    const double grad_norm = zero ? zero_opt->clip_grad_norm(max_norm)  // global: the shards' squares all-reduced
                                  : norm.item<double>();
    const std::vector<double> maxvio_layers = balancer.maxvio_per_layer();
    torch::Tensor expert_load = balancer.counts().clone();
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
      balancer.discard_step();
      ++result.skipped_steps;
      std::cerr << fmt::format("\nstep {}: non-finite loss {} / grad norm {}: step skipped\n", step + 1, loss, grad_norm);
      if (cfg.checkpoint.nonfinite_policy == "abort" || ++consecutive_skips > cfg.checkpoint.max_consecutive_skips)
        throw std::runtime_error(fmt::format("stopping at step {}: non-finite loss or gradients", step + 1));
    } else {
      consecutive_skips = 0;
      if (zero) {
        zero_opt->step();  // the shard's AdamW, then all-gather of the parameters
      } else {
        if (std::isfinite(max_norm)) optimizer->clip_next_step(norm, max_norm);
        built.step_replicated();
      }
      balancer.after_step(step + 1, (step + 1) * tokens_per_step);
    }
    const bool loss_spike = spikes.observe(loss);  // a warning only (Megatron's spiky-loss check)
    if (loss_spike && main_rank)
      std::cerr << fmt::format("\nwarning: step {}: loss spike {:.4f} > {} × the max of the last losses\n", step + 1,
                               loss, cfg.checkpoint.spike_factor);
    loader.advance();
    result.losses.push_back(loss);
    result.final_loss = loss;
    result.steps = step + 1;
    log_window_tokens += tokens_per_step;
    // ================================ TRAINING SECTION END ==================================

    // diagnostics
    if (std::string w = loader.take_epoch_warning(); !w.empty() && main_rank) std::cerr << "\nwarning: " << w << "\n";
    if (main_rank && ((step + 1) % cfg.logging.every == 0 || step + 1 == tc.steps || loss_spike)) {
      const double window_s = seconds_since(log_window_start);
      const double tokens_per_s = static_cast<double>(log_window_tokens) / std::max(window_s, 1e-9);
      log_window_start = Clock::now();
      log_window_tokens = 0;
      nlohmann::json record = {{"step", step + 1}, {"tokens", loader.state().tokens}, {"loss", loss}, {"lm_loss", lm_loss},
                     {"aux_loss", aux}, {"seq_aux_loss", seq_aux}, {"z_loss", z}, {"mtp_loss", mtp_loss}, {"mtp_loss_weight", mtp_weight}, {"lr", lr},
                     {"grad_norm", grad_norm}, {"tokens_per_s", tokens_per_s}, {"maxvio_batch", mean_of(maxvio_layers)},
                     {"maxvio_batch_layers", maxvio_layers}, {"expert_load", to_json_2d(expert_load)},
                     {"bias", to_json_2d(balancer.biases())}, {"epochs", loader.epochs()},
                     {"skipped_steps", result.skipped_steps}};
      if (loss_spike) record["loss_spike"] = true;
      metrics->write(record);
      const double elapsed = seconds_since(run_start);
      const double eta = elapsed / static_cast<double>(step + 1 - first_step) * static_cast<double>(tc.steps - step - 1);
      static const bool tty = isatty(2);  // a log file gets one line per record, a terminal one live line
      std::cerr << (tty ? "\r" : "") << fmt::format("step {:>6}/{} | loss {:.4f} | lr {:.2e} | gnorm {:.3f} | MaxVio {:.3f} | {:.0f} tok/s | ETA {}  ",
                               step + 1, tc.steps, loss, lr, grad_norm, mean_of(maxvio_layers), tokens_per_s,
                               ProgressBar::duration(eta))
                << (tty ? "" : "\n") << std::flush;
    }
    if (tc.eval_every > 0 && (step + 1) % tc.eval_every == 0 && step + 1 != tc.steps) run_eval(step + 1);

    // checkpoints at step boundaries: periodic, on SIGUSR1, and before stopping on SIGINT/SIGTERM
    // (one rank's signal is every rank's: the flags are agreed by a MAX all-reduce)
    if (inject.at("exit", step + 1)) std::_Exit(3);  // test-only: a rank dies mid-run
    torch::Tensor flags = torch::tensor({signals.stop_requested() ? 1 : 0, signals.take_save_request() ? 1 : 0}, torch::kInt32);
    pg.all_reduce(flags, ReduceOp::kMax);
    const bool stop = flags[0].item<int>() != 0, save_request = flags[1].item<int>() != 0;
    const bool periodic = cfg.checkpoint.every > 0 && (step + 1) % cfg.checkpoint.every == 0;
    if (save_request || periodic || stop) save_now(step + 1);
    if (stop) {
      if (main_rank) std::cerr << fmt::format("\nstopping at step {} on a signal (checkpoint saved)\n", step + 1);
      result.stopped_by_signal = true;
      return result;
    }
  }
  if (last_saved_step != result.steps) save_now(result.steps);
  run_eval(result.steps);

  // a short greedy sample, from the start of the validation text (with expert parallelism
  // every rank runs the forward passes: the MoE layers' all-to-alls need them all)
  if (main_rank || ep.enabled()) try {
    auto tokenizer = load_tokenizer(cfg.data.dir);
    Batch prompt_batch = loader.val_rows(0, 0, 1);
    auto prompt_t = prompt_batch.inputs[0].slice(0, 0, std::min<int64_t>(16, tc.seq_len));
    std::vector<int64_t> prompt(prompt_t.data_ptr<int64_t>(), prompt_t.data_ptr<int64_t>() + prompt_t.numel());
    Bf16AutocastGuard autocast(tc.param_dtype == "bf16" && device.is_cuda());  // as evaluate()
    std::vector<int64_t> ids = greedy_sample(model, prompt, 48, tc.seq_len, device);
    if (main_rank) std::cerr << "sample: " << tokenizer->decode(prompt) << "⟨" << tokenizer->decode({ids.begin() + static_cast<long>(prompt.size()), ids.end()})
              << "⟩\n";
  } catch (const std::exception& e) {
    std::cerr << "sample skipped: " << e.what() << "\n";
  }
  return result;
}

}  // namespace moetrain
