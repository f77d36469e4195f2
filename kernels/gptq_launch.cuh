// Launch of the fused small-M kernel for one (activation dtype, bits) pair.
// Pure CUDA: each gptq_gemm_<dtype>_u<bits>.cu instantiates it once, so the
// heavy template instantiations compile in parallel (one ninja job each).
#pragma once

#include <cuda_runtime.h>

#include "gptq_kernels.cuh"

namespace zephyr {

constexpr int kMaxSmem = 96 * 1024;  // dynamic shared memory a block may use

struct SmallArgs {
  const void* x;
  const void* qweight;
  const void* scales;
  const void* zeros;  // null: every zero point is 2^(bits-1)
  const int* perm;    // null: no act-order permutation
  float* partial;     // null when S == 1
  int* locks;
  void* out;
  int M, K, N, Kp, Np, G, group_rows, cpb, S, smem, mt, gpc;
  bool vec_x;
  cudaStream_t stream;
};

template <typename T, int BITS, bool HAS_Z, int MT, int GPC>
cudaError_t launch_small(const SmallArgs& a) {
  auto kernel = gptq_gemm_small_kernel<T, BITS, HAS_Z, MT, GPC>;
  static bool attr_set = false;  // per instantiation; racing first calls set the same value
  if (!attr_set) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
    if (err != cudaSuccess) return err;
    attr_set = true;
  }
  dim3 grid(a.Np / kBlockN, a.S);
  kernel<<<grid, kThreads, a.smem, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const uint4*>(a.qweight), static_cast<const T*>(a.scales),
      static_cast<const T*>(a.zeros), a.perm, a.partial, a.locks, static_cast<T*>(a.out), a.M, a.K, a.N, a.Kp,
      a.Np, a.G, a.group_rows, a.cpb, a.S, a.vec_x);
  return cudaGetLastError();
}

template <typename T, int BITS, bool HAS_Z, int MT>
cudaError_t launch_small_gpc(const SmallArgs& a) {
  switch (a.gpc) {
    case 1: return launch_small<T, BITS, HAS_Z, MT, 1>(a);
    case 2: return launch_small<T, BITS, HAS_Z, MT, 2>(a);
    case 4: return launch_small<T, BITS, HAS_Z, MT, 4>(a);
    default: return launch_small<T, BITS, HAS_Z, MT, 8>(a);
  }
}

template <typename T, int BITS, bool HAS_Z>
cudaError_t launch_small_mt(const SmallArgs& a) {
  switch (a.mt) {
    case 1: return launch_small_gpc<T, BITS, HAS_Z, 1>(a);
    case 2: return launch_small_gpc<T, BITS, HAS_Z, 2>(a);
    default: return launch_small_gpc<T, BITS, HAS_Z, 4>(a);
  }
}

// Explicitly instantiated once per pair in gptq_gemm_<dtype>_u<bits>.cu.
template <typename T, int BITS>
cudaError_t gptq_gemm_small_launch(const SmallArgs& a) {
  return a.zeros ? launch_small_mt<T, BITS, true>(a) : launch_small_mt<T, BITS, false>(a);
}

extern template cudaError_t gptq_gemm_small_launch<__half, 4>(const SmallArgs&);
extern template cudaError_t gptq_gemm_small_launch<__half, 8>(const SmallArgs&);
extern template cudaError_t gptq_gemm_small_launch<__nv_bfloat16, 4>(const SmallArgs&);
extern template cudaError_t gptq_gemm_small_launch<__nv_bfloat16, 8>(const SmallArgs&);

}  // namespace zephyr
