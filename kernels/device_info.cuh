// Host-side device attributes shared by the op launchers (gptq_gemm.cu, decode_attention.cu),
// each queried once per device and cached (an attribute query, no sync).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace zephyr {

// Device attribute A of `device`, queried once per device (`fallback` for an id beyond the cache).
template <cudaDeviceAttr A>
inline int cached_attribute(int device, int fallback) {
  static int cache[64] = {0};  // value + 1; 0: not queried yet
  if (device < 0 || device >= 64) return fallback;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, A, device));
    cache[device] = v + 1;
  }
  return cache[device] - 1;
}

// Whether environment variable `name` is set to "0" (the A/B switches that turn a path off; callers
// read it once per process).
inline bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// Multiprocessor count.
inline int sm_count(int device) { return cached_attribute<cudaDevAttrMultiProcessorCount>(device, 132); }

// Compute capability major.
inline int cc_major(int device) { return cached_attribute<cudaDevAttrComputeCapabilityMajor>(device, 0); }

// Compute capability minor.
inline int cc_minor(int device) { return cached_attribute<cudaDevAttrComputeCapabilityMinor>(device, 0); }

// Whether the decode-step kernels (GEMV, dense GEMV, permuted norm, decode attention, the act-order
// gather) launch as programmatic dependents of the kernel before them (sm_90+): each may then be
// scheduled while its predecessor still runs and read what does not depend on it (weights, the
// permutation) until it reaches griddepcontrol.wait, and each lets its own dependents launch as soon
// as it starts. ZEPHYR_PDL=0 turns that off (read once per process); the kernel after a gather kernel
// still launches as the gather's dependent either way, as before.
inline bool pdl_chain(int device) {
  static const bool off = env_off("ZEPHYR_PDL");
  return !off && cc_major(device) >= 9;
}

}  // namespace zephyr
