// MoE permutation as gathers: one warp per token, every output row written exactly
// once, so neither direction needs atomics (ATen's index_add scatter did, in fp32).
#include "models/kernels/moe_permute_kernels.h"

#include <cstdlib>
#include <cstring>

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kWarpsPerBlock = 8;

struct WarpIndex {
  int lane;
  int64_t first, stride;
};
__device__ __forceinline__ WarpIndex warp_index() {
  return {static_cast<int>(threadIdx.x % 32), blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32,
          static_cast<int64_t>(gridDim.x) * kWarpsPerBlock};
}

// The wide gather-sum (dim % 8 == 0, every pointer 16-byte aligned, k ≤ kMaxWideK): 16-byte
// accesses of 8 elements, and all k rows' loads issued before the first add, so each lane keeps
// k loads in flight where the 4-element loop kept one (a load, then the add that waits for it):
// 93 → 72 µs a call at bench-1b (bench/NOTES.md 60). The sum keeps the narrow loop's order
// (base, then j = 0, 1, ...). The fan-outs (permute forward, unweighted unpermute backward) stay
// four-column loops: the same treatment made them slower (74 → 97 µs).
constexpr int kWide = 8, kMaxWideK = 8;

// out_n = base_n + Σ_{j<k} w_n[j] · src[inv_n[j]] (base_n, w_n: nullptr for none / 1); k ≤ kMaxWideK
template <class TS, class TD>
__device__ __forceinline__ void gather_sum_row_wide(const TS* __restrict__ src, const int64_t* __restrict__ inv_n,
                                                    const float* __restrict__ w_n, const TD* __restrict__ base_n,
                                                    TD* __restrict__ out_n, int64_t k, int64_t dim, int lane) {
  const TS* rows[kMaxWideK];  // (the weights are read where they are used: fewer registers)
#pragma unroll
  for (int j = 0; j < kMaxWideK; ++j) rows[j] = src + (j < k ? inv_n[j] : 0) * dim;
  for (int64_t c = kWide * lane; c < dim; c += 32 * kWide) {
    typename Raw8Of<TS>::type v[kMaxWideK];
#pragma unroll
    for (int j = 0; j < kMaxWideK; ++j)
      if (j < k) v[j] = load_raw8(rows[j] + c);
    Float8 acc = base_n != nullptr ? load8(base_n + c) : Float8{};
#pragma unroll
    for (int j = 0; j < kMaxWideK; ++j) {
      if (j >= k) continue;
      const float wj = w_n != nullptr ? w_n[j] : 1.f;
      const Float8 x = widen8(v[j]);
      for (int e = 0; e < kWide; ++e) acc.v[e] += wj * x.v[e];
    }
    store8(out_n + c, acc);
  }
}

template <class TX, class TR>
__global__ void permute_forward_kernel(const TX* __restrict__ x, const int64_t* __restrict__ inv,
                                       TR* __restrict__ rows, int64_t n_tokens, int64_t k, int64_t dim, bool vec) {
  const WarpIndex w = warp_index();
  for (int64_t n = w.first; n < n_tokens; n += w.stride) {
    const TX* src = x + n * dim;
    for (int64_t j = 0; j < k; ++j) {
      TR* dst = rows + inv[n * k + j] * dim;
      for_columns(dim, w.lane, vec, [&](int64_t c, int m) { store_n(dst + c, load_n(src + c, m), m); });
    }
  }
}

template <class TR, class TX>
__global__ void permute_backward_kernel(const TR* __restrict__ grad_rows, const int64_t* __restrict__ inv,
                                        TX* __restrict__ grad_x, int64_t n_tokens, int64_t k, int64_t dim, bool vec,
                                        bool wide) {
  const WarpIndex w = warp_index();
  for (int64_t n = w.first; n < n_tokens; n += w.stride) {
    if (wide) {
      gather_sum_row_wide(grad_rows, inv + n * k, nullptr, static_cast<const TX*>(nullptr), grad_x + n * dim, k, dim,
                          w.lane);
      continue;
    }
    for_columns(dim, w.lane, vec, [&](int64_t c, int m) {
      Float4 acc{{0.f, 0.f, 0.f, 0.f}};
      for (int64_t j = 0; j < k; ++j) {
        const Float4 g = load_n(grad_rows + inv[n * k + j] * dim + c, m);
        for (int e = 0; e < m; ++e) acc.v[e] += g.v[e];
      }
      store_n(grad_x + n * dim + c, acc, m);
    });
  }
}

template <class T>
__global__ void unpermute_forward_kernel(const T* __restrict__ y, const float* __restrict__ weight,
                                         const int64_t* __restrict__ inv, const T* __restrict__ base,
                                         T* __restrict__ out, int64_t n_tokens, int64_t k, int64_t dim, bool vec,
                                         bool wide) {
  const WarpIndex w = warp_index();
  for (int64_t n = w.first; n < n_tokens; n += w.stride) {
    if (wide) {
      gather_sum_row_wide(y, inv + n * k, weight != nullptr ? weight + n * k : nullptr,
                          base != nullptr ? base + n * dim : nullptr, out + n * dim, k, dim, w.lane);
      continue;
    }
    for_columns(dim, w.lane, vec, [&](int64_t c, int m) {
      Float4 acc = base ? load_n(base + n * dim + c, m) : Float4{{0.f, 0.f, 0.f, 0.f}};
      for (int64_t j = 0; j < k; ++j) {
        const float wj = weight ? weight[n * k + j] : 1.f;
        const Float4 v = load_n(y + inv[n * k + j] * dim + c, m);
        for (int e = 0; e < m; ++e) acc.v[e] += wj * v.v[e];
      }
      store_n(out + n * dim + c, acc, m);
    });
  }
}

// weight == nullptr: the unweighted sum (the gates applied inside the experts), so grad_y is a
// gather of grad_out and neither y nor grad_w is touched.
template <class T>
__global__ void unpermute_backward_kernel(const T* __restrict__ y, const float* __restrict__ weight,
                                          const int64_t* __restrict__ inv, const T* __restrict__ grad_out,
                                          T* __restrict__ grad_y, float* __restrict__ grad_w, int64_t n_tokens,
                                          int64_t k, int64_t dim, bool vec) {
  const WarpIndex w = warp_index();
  for (int64_t n = w.first; n < n_tokens; n += w.stride) {
    const T* g = grad_out + n * dim;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = inv[n * k + j];
      T* gy = grad_y + row * dim;
      if (weight == nullptr) {
        for_columns(dim, w.lane, vec, [&](int64_t c, int m) { store_n(gy + c, load_n(g + c, m), m); });
        continue;
      }
      const float wj = weight[n * k + j];
      const T* yr = y + row * dim;
      float dot = 0.f;
      for_columns(dim, w.lane, vec, [&](int64_t c, int m) {
        const Float4 gc = load_n(g + c, m), yc = load_n(yr + c, m);
        Float4 out;
        for (int e = 0; e < m; ++e) {
          dot += gc.v[e] * yc.v[e];
          out.v[e] = wj * gc.v[e];
        }
        store_n(gy + c, out, m);
      });
      dot = warp_sum(dot);
      if (w.lane == 0) grad_w[n * k + j] = dot;
    }
  }
}

// ---- The stable sort of the M = N·K (token, choice) pairs by expert, as a counting sort in
// three passes (in place of ATen's radix argsort, an index division and the inverse's scatter).
// Pass 1 counts each block's pairs per expert; pass 2 turns the counts [E][blocks] into where
// expert e's pairs of block b start among expert e's pairs, and each expert's total; pass 3 adds
// the expert's offset (the scan of the totals), ranks each pair among its block's earlier pairs
// of the same expert (a warp match, then the earlier warps' counts) and writes order, token_idx
// and inv. Pairs of one expert keep their flat order.
constexpr int kSortBlock = 256, kSortWarps = kSortBlock / 32, kScanWarps = 8;

__global__ void expert_count_kernel(const int64_t* __restrict__ expert, int64_t m, int n_experts,
                                    int* __restrict__ block_counts, int n_blocks) {
  extern __shared__ int hist[];  // [E]
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t i = blockIdx.x * static_cast<int64_t>(kSortBlock) + threadIdx.x;
  if (i < m) atomicAdd(&hist[expert[i]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
    block_counts[static_cast<int64_t>(e) * n_blocks + blockIdx.x] = hist[e];
}

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
  for (int off = 1; off < 32; off <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += t;
  }
  return v;
}

// Pass 2: one warp an expert turns its row of the counts [E][n_blocks] into the exclusive scan
// along the blocks (in place, coalesced) and writes the expert's total to totals[e]; the experts'
// offsets (the scan of the totals) are summed by each block of pass 3. (A single block that did
// both took 42 µs at 256 experts × 384 blocks, bench/NOTES.md 62; a first version that scanned the
// flat array in 1024 contiguous stretches 0.21 ms.)
__global__ void expert_row_scan_kernel(int* __restrict__ counts, int* __restrict__ totals, int n_experts,
                                       int n_blocks) {
  const int lane = threadIdx.x % 32, e = blockIdx.x * kScanWarps + threadIdx.x / 32;
  if (e >= n_experts) return;
  int* row = counts + static_cast<int64_t>(e) * n_blocks;
  int carry = 0;
  for (int b0 = 0; b0 < n_blocks; b0 += 32) {
    const int b = b0 + lane, c = b < n_blocks ? row[b] : 0;
    const int incl = warp_inclusive_scan(c, lane);
    if (b < n_blocks) row[b] = carry + incl - c;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) totals[e] = carry;
}

// offsets[e] = Σ totals[< e] for a block of kSortBlock threads (E ≤ kMoeSortMaxExperts: each
// thread sums a run of ≤ 4 experts, the block scans the runs).
__device__ void expert_offsets(const int* __restrict__ totals, int n_experts, int* offsets, int* warp_sums) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int per = (n_experts + kSortBlock - 1) / kSortBlock, first = min(t * per, n_experts),
            last = min(first + per, n_experts);
  int run = 0;
  for (int e = first; e < last; ++e) run += totals[e];
  const int incl = warp_inclusive_scan(run, lane);
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int v = lane < kSortWarps ? warp_sums[lane] : 0, s = warp_inclusive_scan(v, lane);
    if (lane < kSortWarps) warp_sums[lane] = s - v;  // exclusive over the warps
  }
  __syncthreads();
  int before = warp_sums[warp] + incl - run;
  for (int e = first; e < last; ++e) {
    offsets[e] = before;
    before += totals[e];
  }
}

__global__ void expert_scatter_kernel(const int64_t* __restrict__ expert, int64_t m, int n_experts, int64_t k,
                                      const int* __restrict__ starts, const int* __restrict__ totals, int n_blocks,
                                      int64_t* __restrict__ order, int64_t* __restrict__ token_idx,
                                      int64_t* __restrict__ inv) {
  extern __shared__ int warp_counts[];  // [kSortWarps][E], then the experts' offsets [E]
  __shared__ int warp_sums[kSortWarps];
  int* offsets = warp_counts + kSortWarps * n_experts;
  for (int j = threadIdx.x; j < kSortWarps * n_experts; j += blockDim.x) warp_counts[j] = 0;
  expert_offsets(totals, n_experts, offsets, warp_sums);
  __syncthreads();  // the offsets and the zeroed counts are in place
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = blockIdx.x * static_cast<int64_t>(kSortBlock) + threadIdx.x;
  const int e = i < m ? static_cast<int>(expert[i]) : -1;  // -1: past the end (a class of its own)
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(same & ((1u << lane) - 1u));
  if (e >= 0 && rank_in_warp == 0) warp_counts[warp * n_experts + e] = __popc(same);
  __syncthreads();
  if (e < 0) return;
  int rank = rank_in_warp;
  for (int w = 0; w < warp; ++w) rank += warp_counts[w * n_experts + e];
  const int64_t pos = offsets[e] + starts[static_cast<int64_t>(e) * n_blocks + blockIdx.x] + rank;
  inv[i] = pos;
  order[pos] = i;
  token_idx[pos] = i / k;
}

int blocks_for(int64_t n_tokens) { return grid_for(n_tokens, kWarpsPerBlock); }

// Whether a gather-sum over rows of `dim` with k rows a token takes the wide path (the pointers'
// alignment is the caller's check). MOETRAIN_PERMUTE_WIDE=0 keeps the four-column loop (the A/B
// switch of bench/NOTES.md 60).
bool wide_gather(int64_t dim, int64_t k) {
  static const bool enabled = [] {
    const char* v = std::getenv("MOETRAIN_PERMUTE_WIDE");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled && dim % kWide == 0 && k <= kMaxWideK;
}

}  // namespace

int launch_moe_permute_forward(const void* x, const int64_t* inv, void* rows, int64_t n_tokens, int64_t k, int64_t dim,
                               int x_dtype, int rows_dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  MOETRAIN_DISPATCH_DTYPE(x_dtype, TX, {
    MOETRAIN_DISPATCH_DTYPE(rows_dtype, TR, {
      permute_forward_kernel<TX, TR><<<blocks_for(n_tokens), kWarpsPerBlock * 32, 0, s>>>(
          static_cast<const TX*>(x), inv, static_cast<TR*>(rows), n_tokens, k, dim, dim % 4 == 0 && aligned16(x, rows));
    })
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_moe_permute_backward(const void* grad_rows, const int64_t* inv, void* grad_x, int64_t n_tokens, int64_t k,
                                int64_t dim, int rows_dtype, int x_dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  MOETRAIN_DISPATCH_DTYPE(rows_dtype, TR, {
    MOETRAIN_DISPATCH_DTYPE(x_dtype, TX, {
      permute_backward_kernel<TR, TX><<<blocks_for(n_tokens), kWarpsPerBlock * 32, 0, s>>>(
          static_cast<const TR*>(grad_rows), inv, static_cast<TX*>(grad_x), n_tokens, k, dim,
          dim % 4 == 0 && aligned16(grad_rows, grad_x), wide_gather(dim, k) && aligned16(grad_rows, grad_x));
    })
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_moe_unpermute_forward(const void* y, const float* w, const int64_t* inv, const void* base, void* out,
                                 int64_t n_tokens, int64_t k, int64_t dim, int y_dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = aligned16(y, out) && (base == nullptr || aligned16(base));
  const bool vec = dim % 4 == 0 && aligned, wide = wide_gather(dim, k) && aligned;
  MOETRAIN_DISPATCH_DTYPE(y_dtype, T, {
    unpermute_forward_kernel<T><<<blocks_for(n_tokens), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<const T*>(y), w, inv, static_cast<const T*>(base), static_cast<T*>(out), n_tokens, k, dim, vec,
        wide);
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_moe_unpermute_backward(const void* y, const float* w, const int64_t* inv, const void* grad_out,
                                  void* grad_y, float* grad_w, int64_t n_tokens, int64_t k, int64_t dim, int y_dtype,
                                  void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = aligned16(grad_out, grad_y) && (y == nullptr || aligned16(y));
  MOETRAIN_DISPATCH_DTYPE(y_dtype, T, {
    unpermute_backward_kernel<T><<<blocks_for(n_tokens), kWarpsPerBlock * 32, 0, s>>>(
        static_cast<const T*>(y), w, inv, static_cast<const T*>(grad_out), static_cast<T*>(grad_y), grad_w,
        n_tokens, k, dim, dim % 4 == 0 && aligned);
  })
  return static_cast<int>(cudaGetLastError());
}

int64_t moe_expert_sort_scratch(int64_t m, int64_t n_experts) {
  return n_experts * ((m + kSortBlock - 1) / kSortBlock) + n_experts;  // the counts, then the totals
}

int launch_moe_expert_sort(const int64_t* expert, int64_t m, int64_t n_experts, int64_t k, int* scratch,
                           int64_t* order, int64_t* token_idx, int64_t* inv, void* stream) {
  if (m == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int n_blocks = static_cast<int>((m + kSortBlock - 1) / kSortBlock);
  const int E = static_cast<int>(n_experts);
  expert_count_kernel<<<n_blocks, kSortBlock, E * sizeof(int), s>>>(expert, m, E, scratch, n_blocks);
  int* totals = scratch + static_cast<int64_t>(E) * n_blocks;
  expert_row_scan_kernel<<<(E + kScanWarps - 1) / kScanWarps, kScanWarps * 32, 0, s>>>(scratch, totals, E, n_blocks);
  expert_scatter_kernel<<<n_blocks, kSortBlock, (kSortWarps + 1) * E * sizeof(int), s>>>(
      expert, m, E, k, scratch, totals, n_blocks, order, token_idx, inv);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
