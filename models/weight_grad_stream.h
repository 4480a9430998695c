// defines: WeightGradOverlap, weight_grad_overlap — a backward's weight-gradient GEMMs on a
// second CUDA stream beside its input-gradient chain.
//
// A layer's backward has two independent GEMMs per weight: dX = dY·W feeds the layers below
// (the critical path), dW = dYᵀ·X only the optimizer. Queued on one stream each waits for the
// other's last wave; on two, one GEMM's idle SMs (its tail, or the uneven tiles of a grouped
// weight gradient) run the other's tiles (bench/NOTES.md 41). The join is in the same
// backward, before its gradients are returned, so whatever autograd or the trainer does with
// them next (a cast to fp32 masters, accumulation, a data-parallel hook) is ordered after it.
#pragma once

#include <functional>
#include <memory>
#include <utility>

#include <torch/torch.h>

namespace moetrain {

// Which backward nodes use the second stream: MOETRAIN_WGRAD_STREAM unset or "1": all
// (grouped experts and linear layers); "experts": the grouped experts only; "linear": the linear
// layers only; "0": none (the linear layers' one-stream twin, the experts' node on one stream).
// Read once; an A/B switch for benchmarks. CUDA builds only.
bool weight_grad_overlap(bool for_experts);

// Fork/join around one backward on the caller's current stream of `device`:
//   WeightGradOverlap side(x.device());
//   dw = side.run([&] { return grad.t().mm(x); });  // after everything queued so far
//   dx = grad.mm(w);                                 // meanwhile, on the current stream
//   side.join();                                     // (also on destruction)
// Everything the side stream reads was queued before its fork, and the current stream waits for
// the side stream before anything later is queued on it, so no memory is reused under it.
// Off CUDA, in a build without CUDA, or when constructed with enabled = false, run() calls the
// function inline.
class WeightGradOverlap {
 public:
  explicit WeightGradOverlap(const torch::Device& device, bool enabled = true);
  ~WeightGradOverlap();
  WeightGradOverlap(const WeightGradOverlap&) = delete;
  WeightGradOverlap& operator=(const WeightGradOverlap&) = delete;

  torch::Tensor run(const std::function<torch::Tensor()>& f);
  // {side(), current()}: side() on the side stream and current() on the current stream, both
  // after everything queued so far. current() is queued first, so the GPU dispatches its blocks
  // first and the side's persistent blocks take the SMs its tail frees (bench/NOTES.md 44; the
  // other order measured the same).
  std::pair<torch::Tensor, torch::Tensor> beside(const std::function<torch::Tensor()>& side,
                                                 const std::function<torch::Tensor()>& current);
  void join();

 private:
  void fork();  // the side stream waits for everything queued on the current stream so far
  torch::Tensor run_forked(const std::function<torch::Tensor()>& f);

  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace moetrain
