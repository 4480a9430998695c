#include "trainer/cuda_graph.h"

#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <vector>

#ifdef MOETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include "models/kernels/graph_memset_kernels.h"
#endif

namespace moetrain {

bool cuda_graphs_available() {
#ifdef MOETRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool graph_memsets_as_kernels() {
  static const bool as_kernels = [] {
    const char* v = std::getenv("MOETRAIN_GRAPH_MEMSETS");
    return v == nullptr || std::strcmp(v, "keep") != 0;
  }();
  return as_kernels;
}

bool graph_node_priority() {
  static const bool on = [] {
    const char* v = std::getenv("MOETRAIN_GRAPH_PRIORITY");
    return v != nullptr && std::strcmp(v, "nodes") == 0;
  }();
  return on;
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

std::vector<cudaGraphNode_t> graph_nodes(cudaGraph_t graph) {
  size_t n = 0;
  C10_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  C10_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &n));
  return nodes;
}

cudaGraphNodeType node_type(cudaGraphNode_t node) {
  cudaGraphNodeType type{};
  C10_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
  return type;
}

// A kernel node's priority attribute (0: the default; lower numbers rank higher).
int kernel_priority(cudaGraphNode_t kernel) {
  cudaLaunchAttributeValue value{};
  C10_CUDA_CHECK(cudaGraphKernelNodeGetAttribute(kernel, cudaLaunchAttributePriority, &value));
  return value.priority;
}

}  // namespace
#endif

int64_t count_priority_kernel_nodes(void* cuda_graph) {
#ifdef MOETRAIN_WITH_CUDA
  int64_t raised = 0;
  for (cudaGraphNode_t node : graph_nodes(static_cast<cudaGraph_t>(cuda_graph)))
    raised += node_type(node) == cudaGraphNodeTypeKernel && kernel_priority(node) != 0;
  return raised;
#else
  (void)cuda_graph;
  return 0;
#endif
}

int64_t replace_memset_nodes(void* cuda_graph, int64_t max_bytes) {
#if defined(MOETRAIN_WITH_CUDA) && CUDART_VERSION >= 13000  // the edge-data forms of the graph API
  const auto graph = static_cast<cudaGraph_t>(cuda_graph);
  const std::vector<cudaGraphNode_t> nodes = graph_nodes(graph);
  // Edges cannot be removed from a graph with allocation or free nodes (captured under
  // PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync): leave such a graph as it is.
  for (cudaGraphNode_t node : nodes) {
    const cudaGraphNodeType type = node_type(node);
    if (type == cudaGraphNodeTypeMemAlloc || type == cudaGraphNodeTypeMemFree) return 0;
  }
  // The edges of a node in one direction: the nodes and the edges' data (all default: true;
  // programmatic edges join kernel nodes only, so a memset's are default, checked all the same).
  auto edges = [](cudaGraphNode_t node, bool incoming, std::vector<cudaGraphNode_t>& other) {
    size_t count = 0;
    auto query = incoming ? cudaGraphNodeGetDependencies : cudaGraphNodeGetDependentNodes;
    C10_CUDA_CHECK(query(node, nullptr, nullptr, &count));
    other.resize(count);
    std::vector<cudaGraphEdgeData> data(count);
    C10_CUDA_CHECK(query(node, other.data(), data.data(), &count));
    for (const cudaGraphEdgeData& d : data)
      if (d.from_port != 0 || d.to_port != 0 || d.type != cudaGraphDependencyTypeDefault) return false;
    return true;
  };
  int64_t replaced = 0;
  for (cudaGraphNode_t node : nodes) {
    if (node_type(node) != cudaGraphNodeTypeMemset) continue;
    cudaMemsetParams m{};
    C10_CUDA_CHECK(cudaGraphMemsetNodeGetParams(node, &m));
    if (static_cast<int64_t>(m.width * m.height * m.elementSize) > max_bytes) continue;
    std::vector<cudaGraphNode_t> before, after;
    if (!edges(node, /*incoming=*/true, before) || !edges(node, /*incoming=*/false, after)) continue;
    kernels::MemsetNodeArgs args{m.dst, m.pitch, m.value, m.elementSize, m.width, m.height};
    void* kernel_args[] = {&args};
    cudaKernelNodeParams k{};
    k.func = const_cast<void*>(kernels::memset_node_kernel());
    k.gridDim = dim3(kernels::memset_node_blocks(args));
    k.blockDim = dim3(kernels::kMemsetNodeThreads);
    k.kernelParams = kernel_args;  // copied by the call
    cudaGraphNode_t kernel = nullptr;
    C10_CUDA_CHECK(cudaGraphAddKernelNode(&kernel, graph, before.data(), before.size(), &k));
    // A memset node has no priority; its kernel takes the highest of its neighbouring kernels'
    // (under graph_node_priority() a memset on the chain stays with the chain; one on a default
    // stream right after a chain kernel is raised with it, which costs nothing measurable).
    std::optional<int> priority;
    for (const auto* side : {&before, &after})
      for (cudaGraphNode_t other : *side) {
        if (node_type(other) != cudaGraphNodeTypeKernel) continue;
        const int p = kernel_priority(other);
        if (!priority || p < *priority) priority = p;  // lower numbers rank higher
      }
    if (priority && *priority != 0) {
      cudaLaunchAttributeValue v{};
      v.priority = *priority;
      C10_CUDA_CHECK(cudaGraphKernelNodeSetAttribute(kernel, cudaLaunchAttributePriority, &v));
    }
    C10_CUDA_CHECK(cudaGraphDestroyNode(node));  // and its edges
    for (cudaGraphNode_t next : after) C10_CUDA_CHECK(cudaGraphAddDependencies(graph, &kernel, &next, nullptr, 1));
    ++replaced;
  }
  return replaced;
#else
  (void)cuda_graph, (void)max_bytes;
  return 0;
#endif
}

struct CapturedForwardBackward::State {
#ifdef MOETRAIN_WITH_CUDA
  at::cuda::CUDAGraph graph{/*keep_graph=*/true};  // edited (replace_memset_nodes) before instantiate()
#endif
  StepLosses sums;  // the graph's outputs (updated in place by every replay)
  bool captured = false;
  int64_t replaced_memsets = 0;
  int64_t high_priority_kernels = 0;
};

CapturedForwardBackward::CapturedForwardBackward(std::function<StepLosses()> fb, std::vector<torch::Tensor> params,
                                                 std::function<void()> after_warmup, bool by_node_priority)
    : fb_(std::move(fb)),
      params_(std::move(params)),
      after_warmup_(std::move(after_warmup)),
      by_node_priority_(by_node_priority),
      state_(std::make_unique<State>()) {
  if (!cuda_graphs_available()) throw std::runtime_error("train.cuda_graph: this build has no CUDA (MOETRAIN_CUDA)");
}

CapturedForwardBackward::~CapturedForwardBackward() = default;

bool CapturedForwardBackward::captured() const { return state_->captured; }

int64_t CapturedForwardBackward::replaced_memsets() const { return state_->replaced_memsets; }

int64_t CapturedForwardBackward::high_priority_kernels() const { return state_->high_priority_kernels; }

void CapturedForwardBackward::drop_grads() {
  for (auto& p : params_) p.mutable_grad() = torch::Tensor();
}

StepLosses CapturedForwardBackward::run() {
#ifdef MOETRAIN_WITH_CUDA
  if (!state_->captured) {
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
    // priority −1: above the weight-gradient stream's default, below the norm tracker's greatest
    // (another pool, so never the tracker's stream)
    const int capture_priority = by_node_priority_ ? -1 : 0;
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(capture_priority, current.device_index());
    at::cuda::CUDAEvent before;  // the side stream starts after everything queued so far
    before.record(current);
    before.block(side);
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      // Warm-up on the capture stream: the first cuBLAS/cuBLASLt call of a stream allocates its
      // workspace, which a capture must not do.
      for (int i = 0; i < kWarmupPasses; ++i) {
        drop_grads();
        fb_();
      }
      if (after_warmup_) after_warmup_();
      drop_grads();  // the captured backward allocates the gradients in the graph's pool
      // The warm-up's activations are cached blocks of the side stream that the graph's private
      // pool cannot reuse: give them back first (else the step holds its activations twice).
      c10::cuda::CUDACachingAllocator::emptyCache();
      state_->graph.capture_begin();
      state_->sums = fb_();
      state_->graph.capture_end();
      if (graph_memsets_as_kernels())
        state_->replaced_memsets = replace_memset_nodes(state_->graph.raw_cuda_graph(), int64_t{64} << 10);
      state_->high_priority_kernels = count_priority_kernel_nodes(state_->graph.raw_cuda_graph());
      state_->graph.instantiate();  // with cudaGraphInstantiateFlagUseNodePriority (torch 2.11)
    }
    at::cuda::CUDAEvent after;
    after.record(side);
    after.block(current);
    state_->captured = true;
  }
  state_->graph.replay();
  return state_->sums;
#else
  return fb_();
#endif
}

}  // namespace moetrain
