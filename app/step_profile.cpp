#include "app/step_profile.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>

namespace moetrain {

StepProfile profile_steps(const std::function<void()>& step, int64_t steps, const std::string& trace_path) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  torch::cuda::synchronize();
  prof::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) step();
  torch::cuda::synchronize();
  const auto t1 = std::chrono::steady_clock::now();
  std::unique_ptr<prof::ProfilerResult> result = prof::disableProfiler();

  StepProfile out;
  out.wall_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  std::map<std::string, KernelTime> by_name;
  for (const prof::KinetoEvent& e : result->events()) {
    const std::string name = e.name();
    if (e.deviceType() == c10::DeviceType::CUDA) {
      KernelTime& k = by_name[name];
      k.name = name;
      k.total_ms += static_cast<double>(e.durationNs()) / 1e6;
      ++k.calls;
      out.gpu_busy_ms += static_cast<double>(e.durationNs()) / 1e6;
    } else if (name == "cudaStreamSynchronize" || name == "cudaDeviceSynchronize" || name == "cudaEventSynchronize" ||
               name == "cudaMemcpy") {
      ++out.host_syncs;
    } else if (name.rfind("cudaLaunchKernel", 0) == 0 || name == "cuLaunchKernel" || name == "cuLaunchKernelEx") {
      ++out.launches;
    }
  }
  for (auto& kv : by_name) out.kernels.push_back(kv.second);
  std::sort(out.kernels.begin(), out.kernels.end(),
            [](const KernelTime& a, const KernelTime& b) { return a.total_ms > b.total_ms; });
  if (!trace_path.empty()) result->save(trace_path);
  return out;
}

}  // namespace moetrain
