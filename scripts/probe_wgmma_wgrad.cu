// Probe (bench/NOTES.md 44): the routed experts' weight gradient as our own Hopper kernel
// (models/kernels/grouped_wgrad_kernels.cu: MN-major WGMMA, heavy experts' rows split into
// chunks summed in order) on bench-1b's shapes — w13: dw [E, 1024, 1024] = dguᵀ · x, w2:
// dw [E, 1024, 512] = dyᵀ · h over 98,304 rows. Counts come from scripts/probe_fine_tiles.py
// (COUNTS_DIR/counts-E-{bal,skew}.txt, the same counts it times ATen's weight gradient on).
// Checks against a CUDA-core fp32 twin on NaN-poisoned output, checks that two runs are
// bit-equal, and prints the median of 20 timed runs.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I. -o /tmp/wgrad \
//     scripts/probe_wgmma_wgrad.cu models/kernels/sm90_host.cu && /tmp/wgrad /tmp
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "models/kernels/grouped_wgrad_kernels.cu"
#include "scripts/probe_common.cuh"

namespace {

using probe::compare_kernel;
using probe::fill_normal;

constexpr int kRows = 16384 * 6;

void run_case(int groups, const char* kind, const char* name, int n, int k, const std::string& dir) {
  const std::vector<int> counts =
      probe::read_counts(dir + "/counts-" + std::to_string(groups) + "-" + kind + ".txt", groups, kRows);
  const std::vector<int> offs = probe::end_offsets(counts, kRows);
  const int max_count = *std::max_element(counts.begin(), counts.end());

  const int64_t n_out = static_cast<int64_t>(groups) * n * k;
  const size_t ws_bytes = moetrain::kernels::grouped_wgrad_workspace_bytes(kRows, groups, n, k);
  probe::DeviceBuffers buffers;
  __nv_bfloat16 *dy = buffers.alloc<__nv_bfloat16>(static_cast<size_t>(kRows) * n),
                *x = buffers.alloc<__nv_bfloat16>(static_cast<size_t>(kRows) * k),
                *dw = buffers.alloc<__nv_bfloat16>(n_out);
  float* ref = buffers.alloc<float>(n_out);
  int* d_offs = buffers.alloc<int>(groups);
  void* ws = buffers.alloc<unsigned char>(ws_bytes);
  double* sums = buffers.alloc<double>(3);
  CHECK(cudaMemset(ws, 0, ws_bytes));
  CHECK(cudaMemset(sums, 0, 3 * sizeof(double)));
  CHECK(cudaMemcpy(d_offs, offs.data(), groups * 4, cudaMemcpyHostToDevice));
  fill_normal<<<4096, 256>>>(dy, static_cast<int64_t>(kRows) * n, 11 + groups + n, 1.f);
  fill_normal<<<4096, 256>>>(x, static_cast<int64_t>(kRows) * k, 23 + groups + k, 1.f);
  probe::grouped_wgrad_reference<<<static_cast<unsigned>((n_out + 255) / 256), 256>>>(dy, x, d_offs, groups, n, k,
                                                                                       ref);
  CHECK(cudaMemset(dw, 0xFF, n_out * 2));  // NaN in bf16: every element must be written

  auto launch = [&] {
    const int rc = moetrain::kernels::launch_grouped_wgrad(dy, x, d_offs, dw, kRows, groups, n, k, ws, nullptr);
    if (rc != 0) {
      std::fprintf(stderr, "launch_grouped_wgrad: %s\n", cudaGetErrorString(static_cast<cudaError_t>(rc)));
      std::exit(1);
    }
  };
  launch();
  CHECK(cudaDeviceSynchronize());
  compare_kernel<<<1024, 256>>>(dw, ref, n_out, sums);
  double h_sums[3];
  CHECK(cudaMemcpy(h_sums, sums, sizeof(h_sums), cudaMemcpyDeviceToHost));
  std::vector<uint16_t> first(n_out), second(n_out);
  CHECK(cudaMemcpy(first.data(), dw, n_out * 2, cudaMemcpyDeviceToHost));

  const double med = probe::median_ms(launch);
  CHECK(cudaMemcpy(second.data(), dw, n_out * 2, cudaMemcpyDeviceToHost));
  const bool same = first == second;
  const double tflops = 2.0 * kRows * n * k / (med * 1e-3) / 1e12;
  std::printf("%4d %5s %10s %6d %9.3f %8.1f %9.2e %8.0f %6s\n", groups, kind, name, max_count, med, tflops,
              std::sqrt(h_sums[0] / h_sums[1]), h_sums[2], same ? "yes" : "NO");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  if (!moetrain::kernels::grouped_wgrad_supported(0)) {
    std::fprintf(stderr, "grouped_wgrad: not supported on this device\n");
    return 1;
  }
  std::printf("%4s %5s %10s %6s %9s %8s %9s %8s %6s\n", "E", "rows", "gemm", "max", "ms", "TFLOP/s", "rel err",
              "non-fin", "determ");
  for (int groups : {64, 256})
    for (const char* kind : {"bal", "skew"}) {
      run_case(groups, kind, "wgrad w13", 1024, 1024, dir);
      run_case(groups, kind, "wgrad w2", 1024, 512, dir);
    }
  return 0;
}
