// defines: KernelTime, StepProfile, profile_steps — where the time of a training step goes
// on the GPU (`moetrain bench --profile N`): the Kineto profiler (CPU + CUDA activities)
// around N steps, GPU kernel time summed by kernel name, the GPU-busy share of the wall
// time (low = launch- or sync-bound) and the host syncs (cudaStreamSynchronize,
// cudaDeviceSynchronize, cudaMemcpy with a host side) per step.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moetrain {

struct KernelTime {
  std::string name;
  double total_ms = 0.0;
  int64_t calls = 0;
};

struct StepProfile {
  std::vector<KernelTime> kernels;  // by total time, descending
  double wall_ms = 0.0;             // of all profiled steps
  double gpu_busy_ms = 0.0;         // sum of GPU activity (kernels + copies; overlap counted twice)
  int64_t host_syncs = 0;           // runtime calls that wait for the GPU
  int64_t launches = 0;             // cudaLaunchKernel and friends
};

// Runs step() `steps` times under the profiler; saves a Chrome trace when trace_path is non-empty.
StepProfile profile_steps(const std::function<void()>& step, int64_t steps, const std::string& trace_path);

}  // namespace moetrain
