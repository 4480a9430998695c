// A graph memset node's work as a kernel: a grid-stride loop over the elements of its rows.
#include "models/kernels/graph_memset_kernels.h"

#include <cstdint>

namespace moetrain::kernels {

namespace {

__global__ void memset_node_kernel_impl(MemsetNodeArgs a) {
  const size_t total = a.width * a.height;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / a.width, col = i % a.width;
    char* p = static_cast<char*>(a.dst) + row * a.pitch + col * a.element_size;
    if (a.element_size == 4) *reinterpret_cast<uint32_t*>(p) = a.value;
    else if (a.element_size == 2) *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(a.value);
    else *reinterpret_cast<uint8_t*>(p) = static_cast<uint8_t>(a.value);
  }
}

}  // namespace

const void* memset_node_kernel() { return reinterpret_cast<const void*>(&memset_node_kernel_impl); }

unsigned int memset_node_blocks(const MemsetNodeArgs& args) {
  const size_t total = args.width * args.height;
  const size_t blocks = (total + kMemsetNodeThreads - 1) / kMemsetNodeThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks > 1024 ? 1024 : blocks);
}

}  // namespace moetrain::kernels
