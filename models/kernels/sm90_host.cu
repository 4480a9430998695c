#include "models/kernels/sm90_host.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace moetrain::kernels::sm90 {

namespace {

// Whether the code the device runs is the sm_90a build of this library (with wgmma), not the
// plain sm_90 one that the global architecture flags may add beside it.
__global__ void has_wgmma_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

// cuTensorMapEncodeTiled through the runtime's driver entry point: no link against libcuda.
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// 1: the device runs the sm_90a code, 0: it does not, −1: could not tell (a CUDA call failed, as
// it may under a graph capture) — ask again later. The probe runs on a private non-blocking stream
// in the relaxed capture mode, so a capture in progress on another stream is left undisturbed.
int probe_device(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return -1;
  if (prop.major != 9 || prop.minor != 0 || encode_tiled() == nullptr) return 0;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) return -1;
  int result = -1, previous = 0, found = 0;
  if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device) == cudaSuccess) {
    cudaStream_t stream = nullptr;
    if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess) {
      int* flag = nullptr;
      if (cudaMalloc(&flag, sizeof(int)) == cudaSuccess) {
        if (cudaMemsetAsync(flag, 0, sizeof(int), stream) == cudaSuccess) {
          has_wgmma_kernel<<<1, 1, 0, stream>>>(flag);
          if (cudaGetLastError() == cudaSuccess &&
              cudaMemcpyAsync(&found, flag, sizeof(int), cudaMemcpyDeviceToHost, stream) == cudaSuccess &&
              cudaStreamSynchronize(stream) == cudaSuccess)
            result = found == 1 ? 1 : 0;
        }
        cudaFree(flag);
      }
      cudaStreamDestroy(stream);
    }
    cudaSetDevice(previous);
  }
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (result < 0) cudaGetLastError();  // the failed probe's error must not surface in the caller's next check
  return result;
}

}  // namespace

bool sm90a_supported(int device) {
  static std::mutex mu;
  static std::map<int, bool> known;
  static std::map<int, int> undecided;  // probes that could not tell, per device
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  const int found = probe_device(device);
  // An undecided probe (e.g. under a capture) is asked again next time, up to four times: a device
  // whose probe keeps failing is taken as unsupported rather than probed at every call.
  if (found >= 0 || ++undecided[device] >= 4) known.emplace(device, found == 1);
  return found == 1;
}

bool make_tma_map_bf16(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

int prepare_sm90_kernel(const void* kernel, size_t smem_bytes, int* sms) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return static_cast<int>(cudaErrorInvalidDevice);
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> ready;  // (kernel, device) -> SM count
  std::lock_guard<std::mutex> lock(mu);
  auto it = ready.find({kernel, device});
  if (it == ready.end()) {
    int count = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0)
      return static_cast<int>(cudaErrorInvalidConfiguration);
    it = ready.emplace(std::make_pair(kernel, device), count).first;
  }
  *sms = it->second;
  return 0;
}

}  // namespace moetrain::kernels::sm90
