// defines: CHECK, fill_normal, grouped_gemm_reference, grouped_wgrad_reference, compare_kernel,
// median_ms, check_and_time, read_counts, end_offsets, DeviceBuffers — the shared harness of the
// standalone GEMM probes (scripts/probe_wgmma_*.cu): random bf16 inputs made on the device, an
// error check against an fp32 reference over NaN-poisoned output, a median of timed launches, and
// the per-expert row counts probe_fine_tiles.py writes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CHECK(x)                                                                                \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

namespace probe {

// Random normal bf16 (Box-Muller over a counter hash): fresh data, no host round trip.
__global__ void fill_normal(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull ^ seed * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u1 = (static_cast<float>(z >> 40) + 1.f) / 16777217.f, u2 = static_cast<float>(z & 0xFFFFFF) / 16777216.f;
    p[i] = __float2bfloat16(scale * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}

// The fp32 twins (one thread an output element). Grouped GEMM: out[t, f] = Σ_k x[t, k] · w(g, f, k)
// with w stored [E, N, K] (the forward) or [E, K, N] (trans_w: the input gradient), g the expert
// of row t.
__global__ void grouped_gemm_reference(const __nv_bfloat16* x, const __nv_bfloat16* w, const int* offs, int groups,
                                       int M, int N, int K, bool trans_w, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(M) * N) return;
  const int row = static_cast<int>(i / N), col = static_cast<int>(i % N);
  int g = 0;
  while (g < groups && offs[g] <= row) ++g;
  float s = 0.f;
  for (int k = 0; k < K; ++k) {
    const int64_t wi = trans_w ? (static_cast<int64_t>(g) * K + k) * N + col : (static_cast<int64_t>(g) * N + col) * K + k;
    s += __bfloat162float(x[static_cast<int64_t>(row) * K + k]) * __bfloat162float(w[wi]);
  }
  out[i] = s;
}

// Weight gradient: dw[g][r][c] = Σ over expert g's rows of dy[row, r] · x[row, c].
__global__ void grouped_wgrad_reference(const __nv_bfloat16* dy, const __nv_bfloat16* x, const int* offs, int groups,
                                        int n, int k, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(groups) * n * k) return;
  const int g = static_cast<int>(i / (static_cast<int64_t>(n) * k)), r = static_cast<int>(i / k % n),
            col = static_cast<int>(i % k);
  float s = 0.f;
  for (int row = g == 0 ? 0 : offs[g - 1]; row < offs[g]; ++row)
    s += __bfloat162float(dy[static_cast<int64_t>(row) * n + r]) * __bfloat162float(x[static_cast<int64_t>(row) * k + col]);
  out[i] = s;
}

// sums += {Σ (out − ref)² over finite outputs, Σ ref², count of non-finite outputs}
__global__ void compare_kernel(const __nv_bfloat16* out, const float* ref, int64_t n, double* sums) {
  double num = 0, den = 0, bad = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double o = __bfloat162float(out[i]), r = ref[i];
    if (!isfinite(o)) bad += 1;
    else num += (o - r) * (o - r);
    den += r * r;
  }
  atomicAdd(&sums[0], num);
  atomicAdd(&sums[1], den);
  atomicAdd(&sums[2], bad);
}

// Median milliseconds of `reps` launches after 3 warm-up ones.
template <class F>
double median_ms(F&& launch, int reps = 20) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// One kernel variant against the fp32 twin: out poisoned (NaN in bf16: every element must be
// written), one launch, the relative error and the count of non-finite outputs, then its time.
struct Checked {
  double ms, rel_err, non_finite;
};
template <typename F>
Checked check_and_time(F&& launch, __nv_bfloat16* out, const float* ref, int64_t n, double* d_sums) {
  CHECK(cudaMemset(out, 0xFF, n * 2));
  CHECK(cudaMemset(d_sums, 0, 3 * sizeof(double)));
  launch();
  CHECK(cudaDeviceSynchronize());
  compare_kernel<<<1024, 256>>>(out, ref, n, d_sums);
  double sums[3];
  CHECK(cudaMemcpy(sums, d_sums, sizeof(sums), cudaMemcpyDeviceToHost));
  // Ten launches back to back between the events, so the host's work for a launch (its tensor
  // maps) overlaps the previous kernel; the median over 11 such samples, a launch each.
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  launch();
  std::vector<float> ms;
  for (int rep = 0; rep < 11; ++rep) {
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < 10; ++i) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / 10);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return Checked{ms[ms.size() / 2], std::sqrt(sums[0] / sums[1]), sums[2]};
}

// Per-expert row counts, one a line (scripts/probe_fine_tiles.py writes them beside its ATen
// times); without a file of `groups` lines, `rows` split evenly.
inline std::vector<int> read_counts(const std::string& path, int groups, int rows) {
  std::vector<int> counts;
  if (FILE* f = std::fopen(path.c_str(), "r")) {
    int v;
    while (std::fscanf(f, "%d", &v) == 1) counts.push_back(v);
    std::fclose(f);
  }
  if (static_cast<int>(counts.size()) != groups) {
    counts.assign(groups, rows / groups);
    counts[0] += rows - rows / groups * groups;
  }
  return counts;
}

// The experts' end offsets; exits unless the counts cover `rows` exactly (the references and the
// kernels' zeroed tails assume it).
inline std::vector<int> end_offsets(const std::vector<int>& counts, int rows) {
  std::vector<int> offs(counts.size());
  for (size_t g = 0, run = 0; g < counts.size(); ++g) offs[g] = static_cast<int>(run += counts[g]);
  if (offs.empty() || offs.back() != rows) {
    std::fprintf(stderr, "counts of %zu experts sum to %d, not %d\n", counts.size(), offs.empty() ? 0 : offs.back(),
                 rows);
    std::exit(1);
  }
  return offs;
}

// One case's device buffers, freed together when the case ends.
class DeviceBuffers {
 public:
  DeviceBuffers() = default;
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;
  ~DeviceBuffers() {
    for (void* p : ptrs_) CHECK(cudaFree(p));
  }
  template <class T>
  T* alloc(size_t count) {
    void* p = nullptr;
    CHECK(cudaMalloc(&p, count * sizeof(T)));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  std::vector<void*> ptrs_;
};

}  // namespace probe
