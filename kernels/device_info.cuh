// Host-side device attributes shared by the op launchers (gptq_gemm.cu, decode_attention.cu),
// each queried once per device and cached (an attribute query, no sync).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace zephyr {

// Multiprocessor count.
inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v;
  }
  return cache[device];
}

// Compute capability major.
inline int cc_major(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device));
    cache[device] = v;
  }
  return cache[device];
}

}  // namespace zephyr
