// defines: sm90a_supported, make_tma_map_bf16, prepare_sm90_kernel — the host side shared by the
// hand-written Hopper GEMMs (grouped_wgrad_kernels.cu, grouped_gemm_kernels.cu): whether a
// device runs their sm_90a code, TMA descriptors of bf16 matrices, and the per-device launch set-up.
// Used only by translation units of the sm_90a object library (models/kernels/CMakeLists.txt).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda.h>

namespace moetrain::kernels::sm90 {

// Whether `device` is compute capability 9.0, the driver can encode tensor maps, and the code it
// loads from this library is the sm_90a build (with wgmma), not a plain sm_90 one: one probe
// launch on a private stream, synchronized, its answer kept per device (false without keeping it
// where the probe could not run, e.g. under a graph capture that forbids it).
bool sm90a_supported(int device);

// A [rows, cols] row-major bf16 matrix as TMA boxes of 64 columns (128 bytes, the 128-byte
// swizzle) × box_rows rows. False where the driver refuses (e.g. an unaligned base or stride).
bool make_tma_map_bf16(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int box_rows);

// Opts `kernel` into `smem_bytes` of dynamic shared memory on the current device (once per
// kernel and device) and gives the device's SM count in *sms. Host calls only, no stream work,
// so a graph capture may pass through. Returns a cudaError_t value (0: ready).
int prepare_sm90_kernel(const void* kernel, size_t smem_bytes, int* sms);

}  // namespace moetrain::kernels::sm90
