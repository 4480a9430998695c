// defines: MemsetNodeArgs, memset_node_kernel — a kernel that does a CUDA-graph memset node's
// work (no torch headers). Used only by trainer/cuda_graph.cpp, which swaps a captured step's
// small memset nodes for kernel nodes: between two kernels a memset node costs ≈ 9 µs of the
// chain (≈ 4 µs before it, 1.5 µs itself, ≈ 4 µs after, measured in a graphed bench-1b step),
// a kernel ≈ 2 µs (bench/NOTES.md 58).
#pragma once

#include <cstddef>

namespace moetrain::kernels {

// cudaMemsetParams' fields: `height` rows of `width` elements of element_size (1, 2 or 4) bytes,
// rows `pitch` bytes apart, each element set to the low element_size bytes of value.
struct MemsetNodeArgs {
  void* dst;
  size_t pitch;
  unsigned int value;
  unsigned int element_size;
  size_t width;
  size_t height;
};

// The kernel's entry (cudaKernelNodeParams::func); it takes one MemsetNodeArgs by value. Launch
// it with memset_node_blocks(args) blocks of kMemsetNodeThreads threads.
const void* memset_node_kernel();
constexpr unsigned int kMemsetNodeThreads = 256;
unsigned int memset_node_blocks(const MemsetNodeArgs& args);

}  // namespace moetrain::kernels
