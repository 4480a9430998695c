// defines: pingpong::init_ring, release_stage, await_turn, launch_clustered, print_header,
// print_row — what the two ping-pong probes (scripts/probe_wgmma_pingpong.cu,
// probe_wgmma_wgrad_pingpong.cu) share: a ring of stages filled by one producer warp group and
// consumed by two consumer warp groups that take a CTA's tiles in turn, optionally across a 2-CTA
// cluster whose producers multicast a shared operand into both CTAs. Include after
// models/kernels/sm90_wgmma.cuh and scripts/probe_common.cuh.
#pragma once

#include <map>

namespace probe::pingpong {

using namespace moetrain::kernels::sm90;

// One thread: full[s] waits for its producer's arrival and the stage's bytes; empty[s] for the
// consuming warp group of every CTA of the cluster (a peer's producer multicasts into this
// CTA's stage too). The two warp groups' K loops take turns on order[2] (CUTLASS's ordered
// sequence barrier): a group that waited for a stage of its next tile before the other group's
// tile had been loaded could meet a phase of the same parity two phases old, or a fresh
// barrier's.
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty, uint64_t* order, int stages, int cluster) {
  for (int s = 0; s < stages; ++s) {
    mbar_init(&full[s], 1);
    mbar_init(&empty[s], cluster);
  }
  mbar_init(&order[0], 1);
  mbar_init(&order[1], 1);
  mbar_init_fence();
}

// A stage's MMAs are done: free it in every CTA's ring (one thread).
template <int kCluster>
__device__ __forceinline__ void release_stage(uint64_t* empty, int stage) {
  if (kCluster == 1) {
    mbar_arrive(&empty[stage]);
  } else {
    for (int r = 0; r < kCluster; ++r) mbar_arrive_cluster(&empty[stage], r);
  }
}

// Warp group c's turn `turn` (its turn-th tile): group 0's turn n waits for group 1's turn n − 1
// (order[0]'s phase n − 1), group 1's turn n for group 0's turn n (order[1]'s phase n). A group
// ends its turn with mbar_arrive(&order[1 - c]) once every full wait of its tile has passed.
__device__ __forceinline__ void await_turn(uint64_t* order, int c, int turn) {
  if (c == 1 || turn > 0) mbar_wait(&order[c], (c == 0 ? turn - 1 : turn) & 1);
}

// Launches `kernel` as a persistent grid: one CTA an SM, or with cluster > 1 as many clusters of
// `cluster` CTAs as fit at once (the SMs of a GPC pair up; asked once a kernel). The kernel's
// dynamic shared memory must be allowed first (prepare_sm90_kernel, which also gives `sms`).
template <typename... Params, typename... Args>
int launch_clustered(void (*kernel)(Params...), int cluster, int sms, int threads, size_t smem, Args&&... args) {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.attrs = attr;
  config.numAttrs = 1;
  int grid = sms;
  if (cluster > 1) {
    static std::map<const void*, int> fits;
    int& fit = fits[reinterpret_cast<const void*>(kernel)];
    if (fit == 0) {
      config.gridDim = dim3(sms / cluster * cluster);
      const cudaError_t q = cudaOccupancyMaxActiveClusters(&fit, reinterpret_cast<const void*>(kernel), &config);
      if (q != cudaSuccess || fit < 1) return int(q != cudaSuccess ? q : cudaErrorInvalidConfiguration);
      std::printf("(clusters of %d: %d at once)\n", cluster, fit);
    }
    grid = fit * cluster;
  }
  config.gridDim = dim3(grid);
  return int(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// The table both probes print: the production kernel, ping-pong alone and with the cluster.
inline void print_header() {
  std::printf("%4s %5s %10s %9s %9s %9s %9s %9s %9s %14s\n", "E", "rows", "gemm", "prod ms", "pingpong", "+cluster",
              "prod err", "pp err", "cl err", "non-finite");
}
inline void print_row(int E, const char* kind, const char* name, const Checked (&r)[3]) {
  std::printf("%4d %5s %10s %9.3f %9.3f %9.3f %9.2e %9.2e %9.2e %4.0f %4.0f %4.0f\n", E, kind, name, r[0].ms, r[1].ms,
              r[2].ms, r[0].rel_err, r[1].rel_err, r[2].rel_err, r[0].non_finite, r[1].non_finite, r[2].non_finite);
}

}  // namespace probe::pingpong
