// defines: CapturedForwardBackward — the training step's forward + backward captured once as a
// CUDA graph and replayed every step (train.cuda_graph): one graph launch instead of ≈ 2,000
// kernel launches, so the GPU never waits on the host between kernels.
//
// What makes a step capturable: static shapes (dropless routing keeps its sizes on the
// device), no host reads inside it, inputs read from fixed device buffers (the caller copies
// each step's tokens into them before run()), and gradients that stay attached to their
// parameters between steps: the captured backward writes them (in the graph's memory pool)
// on every replay, so nothing may set them to None (no zero_grad; MasterWeights keeps them).
// The optimizer step runs eagerly after the replay (its step counts and learning rate change
// every step). Single process only: the data-parallel reducers' hooks are not captured.
// Before the graph is instantiated, its small memset nodes (the 4-byte counters cuBLAS and
// cuDNN reset before many of their kernels: ≈ 160 a bench-1b step) become kernel nodes
// (replace_memset_nodes). With graph_node_priority() the chain's nodes outrank the side streams'.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "trainer/train_step.h"

namespace moetrain {

// MOETRAIN_GRAPH_PRIORITY=nodes: the step is captured on a stream of raised priority (−1; the
// clipping-norm tracker's side stream keeps the greatest), so the main chain's kernel nodes
// carry it (CUDA copies a stream's priority into the kernel nodes it captures) while the second
// stream's weight gradients keep the default. torch 2.11 instantiates captured graphs with
// cudaGraphInstantiateFlagUseNodePriority, so when a persistent GEMM's blocks retire the freed
// SMs go to the chain's blocks first. Measured no faster on bench-1b (bench/NOTES.md 59): off
// unless set. Read once.
bool graph_node_priority();

class CapturedForwardBackward {
 public:
  // fb: one eager forward + backward (the trainer's forward_backward over fixed buffers);
  // params: the parameters whose gradients it writes; after_warmup: undoes what the warm-up
  // passes left behind (the balancer's expert counts) before the capture; by_node_priority: see
  // graph_node_priority().
  CapturedForwardBackward(std::function<StepLosses()> fb, std::vector<torch::Tensor> params,
                          std::function<void()> after_warmup, bool by_node_priority = graph_node_priority());
  ~CapturedForwardBackward();
  CapturedForwardBackward(const CapturedForwardBackward&) = delete;
  CapturedForwardBackward& operator=(const CapturedForwardBackward&) = delete;

  // The first call warms up on a side stream (cuBLAS workspaces, lazy kernel setup; the
  // parameters' gradients set to None before each pass) and captures the graph; every call
  // then replays it on the current stream. The returned sums are the graph's own output
  // tensors: read them before the next run().
  StepLosses run();

  bool captured() const;
  // Memset nodes of the captured graph replaced by kernel nodes (0 before the capture).
  int64_t replaced_memsets() const;
  // Kernel nodes of the captured graph with a raised priority: those captured on streams of
  // raised priority (the capture stream under graph_node_priority(), the norm tracker's side
  // stream) and the memset kernels among them; 0 before the capture.
  int64_t high_priority_kernels() const;

  static constexpr int kWarmupPasses = 2;

 private:
  struct State;
  void drop_grads();

  std::function<StepLosses()> fb_;
  std::vector<torch::Tensor> params_;
  std::function<void()> after_warmup_;
  bool by_node_priority_;
  std::unique_ptr<State> state_;
};

// Whether this build can capture CUDA graphs (MOETRAIN_WITH_CUDA).
bool cuda_graphs_available();

// Replaces every memset node of at most max_bytes in `cuda_graph` (a cudaGraph_t not yet
// instantiated) by a kernel node that writes the same bytes, with the same dependencies and
// dependents; returns how many. Between two kernels a memset node costs ≈ 9 µs of a graph's
// chain (≈ 4 µs of latency on each side), a kernel node ≈ 2 µs (bench/NOTES.md 58). The new
// nodes run on the device current at the call (the graph's). A node with edges of non-default
// type is left as it is, and so is a graph with memory allocation or free nodes (edges cannot
// be removed there). Throws on a CUDA error; 0 without CUDA or with a CUDA runtime before 13.
int64_t replace_memset_nodes(void* cuda_graph, int64_t max_bytes);

// MOETRAIN_GRAPH_MEMSETS=keep: captured steps keep their memset nodes (the A/B switch); unset
// or anything else: replace_memset_nodes up to 64 KiB. Read once.
bool graph_memsets_as_kernels();


// Kernel nodes of `cuda_graph` (a cudaGraph_t) whose priority attribute is not the default.
int64_t count_priority_kernel_nodes(void* cuda_graph);

}  // namespace moetrain
