// Probe (bench/NOTES.md 61): times the routed experts' swapped-operand grouped GEMM
// (models/kernels/grouped_gemm_kernels.cu: the weights as WGMMA's M side, an expert's tokens as its
// N side in steps of 16, so an expert's last tile is as narrow as its rows) on bench-1b's four
// forward / input-gradient shapes, against a CUDA-core fp32 twin on NaN-poisoned output.
//
//   forward:        out[t, f] = Σ_k x[t, k] · w[g][f][k]    (w: [E, N, K])
//   input gradient: out[t, f] = Σ_k x[t, k] · w[g][k][f]    (w: [E, K, N])
//
// Reads the counts scripts/probe_fine_tiles.py wrote (COUNTS_DIR/counts-E-{bal,skew}.txt, where
// it times ATen's grouped GEMM on the same counts). Build and run on a GPU machine:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I. -o /tmp/swapab scripts/probe_wgmma_swapab.cu \
//     models/kernels/grouped_gemm_kernels.cu models/kernels/sm90_host.cu && /tmp/swapab /tmp
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "models/kernels/grouped_gemm_kernels.h"
#include "scripts/probe_common.cuh"

namespace {

using probe::compare_kernel;
using probe::fill_normal;

constexpr int kRows = 16384 * 6;

// name, N (output features), K, w stored [E, K, N] (input gradient) or [E, N, K] (forward)
void run_case(const char* name, int E, const char* kind, const std::vector<int>& counts, int N, int K, bool trans_w) {
  const std::vector<int> offs = probe::end_offsets(counts, kRows);
  const int64_t nx = int64_t{kRows} * K, nw = int64_t{E} * N * K;
  probe::DeviceBuffers buffers;
  __nv_bfloat16 *x = buffers.alloc<__nv_bfloat16>(nx), *w = buffers.alloc<__nv_bfloat16>(nw),
                *out = buffers.alloc<__nv_bfloat16>(size_t{kRows} * N);
  float* ref = buffers.alloc<float>(size_t{kRows} * N);
  int* d_offs = buffers.alloc<int>(E);
  double* d_sums = buffers.alloc<double>(3);
  fill_normal<<<4096, 256>>>(x, nx, 1000 + E + K, 1.f);
  fill_normal<<<4096, 256>>>(w, nw, 2000 + E + K, 0.05f);
  CHECK(cudaMemcpy(d_offs, offs.data(), E * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d_sums, 0, 3 * sizeof(double)));
  CHECK(cudaMemset(out, 0xFF, size_t{kRows} * N * 2));  // poison: NaN in bf16
  probe::grouped_gemm_reference<<<static_cast<unsigned>((int64_t{kRows} * N + 255) / 256), 256>>>(
      x, w, d_offs, E, kRows, N, K, trans_w, ref);
  CHECK(cudaGetLastError());

  auto launch = [&] {
    CHECK(static_cast<cudaError_t>(
        moetrain::kernels::launch_grouped_gemm(x, w, d_offs, out, kRows, E, N, K, trans_w, /*stream=*/nullptr)));
  };
  launch();
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  compare_kernel<<<1024, 256>>>(out, ref, int64_t{kRows} * N, d_sums);
  double sums[3];
  CHECK(cudaMemcpy(sums, d_sums, sizeof(sums), cudaMemcpyDeviceToHost));
  const double med = probe::median_ms(launch), tflops = 2.0 * kRows * N * K / (med * 1e-3) / 1e12;
  int mma_rows = 0;  // the MMA's rows: each expert's rows in 256-row tiles, the last rounded up to 16
  for (int c : counts) mma_rows += c / 256 * 256 + (c % 256 + 15) / 16 * 16;
  std::printf("%4d %5s %10s %9.3f %8.1f %7.3f %9.2e %8.0f\n", E, kind, name, med, tflops, double(mma_rows) / kRows,
              std::sqrt(sums[0] / sums[1]), sums[2]);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  if (!moetrain::kernels::grouped_gemm_supported(0)) {
    std::fprintf(stderr, "needs an sm_90 GPU\n");
    return 1;
  }
  std::printf("swapped-operand grouped GEMM (models/kernels/grouped_gemm_kernels.cu)\n");
  std::printf("%4s %5s %10s %9s %8s %7s %9s %8s\n", "E", "rows", "gemm", "ms", "TFLOP/s", "waste", "rel err", "non-fin");
  constexpr int D = 1024, I = 512;
  for (int E : {64, 256})
    for (const char* kind : {"bal", "skew"}) {
      const std::vector<int> counts =
          probe::read_counts(dir + "/counts-" + std::to_string(E) + "-" + kind + ".txt", E, kRows);
      run_case("fwd w13", E, kind, counts, 2 * I, D, false);   // x [M, D] · w13[E, 2I, D]ᵀ
      run_case("fwd w2", E, kind, counts, D, I, false);        // h [M, I] · w2[E, D, I]ᵀ
      run_case("dgrad w2", E, kind, counts, I, D, true);       // dy [M, D] · w2[E, D, I]
      run_case("dgrad w13", E, kind, counts, D, 2 * I, true);  // dh [M, 2I] · w13[E, 2I, D]
    }
  return 0;
}
