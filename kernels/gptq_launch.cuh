// Launch of the fused small-M kernel for one (activation dtype, bits) pair.
// Pure CUDA: each gptq_gemm_<dtype>_u<bits>.cu instantiates it once, so the
// heavy template instantiations compile in parallel (one ninja job each).
#pragma once

#include <cuda_runtime.h>

#include "gptq_kernels.cuh"

namespace zephyr {

struct SmallArgs {
  const void* x;  // [M, Kp] (x itself when K == Kp and no act-order, else gathered/padded)
  const void* qweight;
  const void* scales;
  const void* zeros;  // null: every zero point is 2^(bits-1)
  float* partial;     // null when S == 1
  int* locks;
  void* out;
  int M, N, Kp, Np, G, group_rows, cpb, S, mt;
  bool pf;   // prefetch variant (mt == 1 only)
  bool pdl;  // launch as a programmatic dependent of the gather kernel (sm_90)
  cudaStream_t stream;
};

template <typename T, int BITS, bool HAS_Z, int MT, bool PF>
cudaError_t launch_small(const SmallArgs& a) {
  return launch_kernel(gptq_gemm_small_kernel<T, BITS, HAS_Z, MT, PF>, dim3(a.Np / kBlockN, a.S), dim3(kThreads),
                       a.stream, a.pdl, static_cast<const T*>(a.x), static_cast<const uint4*>(a.qweight),
                       static_cast<const T*>(a.scales), static_cast<const T*>(a.zeros), a.partial, a.locks,
                       static_cast<T*>(a.out), a.M, a.N, a.Kp, a.Np, a.G, a.group_rows, a.cpb, a.S);
}

// Resident blocks per SM of one instantiation (cached; the grid is sized to it).
template <typename T, int BITS, bool HAS_Z, int MT, bool PF>
int occupancy_small() {
  static int occ = 0;
  if (occ == 0) {
    int v = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, gptq_gemm_small_kernel<T, BITS, HAS_Z, MT, PF>, kThreads, 0) !=
        cudaSuccess)
      v = 1;
    occ = v < 1 ? 1 : v;
  }
  return occ;
}

template <typename T, int BITS, bool HAS_Z>
int occupancy_small_mt(int mt, bool pf) {
  if (mt == 1) return pf ? occupancy_small<T, BITS, HAS_Z, 1, true>() : occupancy_small<T, BITS, HAS_Z, 1, false>();
  return mt == 2 ? occupancy_small<T, BITS, HAS_Z, 2, false>() : occupancy_small<T, BITS, HAS_Z, 4, false>();
}

template <typename T, int BITS, bool HAS_Z>
cudaError_t launch_small_mt(const SmallArgs& a) {
  switch (a.mt) {
    case 1: return a.pf ? launch_small<T, BITS, HAS_Z, 1, true>(a) : launch_small<T, BITS, HAS_Z, 1, false>(a);
    case 2: return launch_small<T, BITS, HAS_Z, 2, false>(a);
    default: return launch_small<T, BITS, HAS_Z, 4, false>(a);
  }
}

// Explicitly instantiated once per pair in gptq_gemm_<dtype>_u<bits>.cu.
template <typename T, int BITS>
cudaError_t gptq_gemm_small_launch(const SmallArgs& a) {
  return a.zeros ? launch_small_mt<T, BITS, true>(a) : launch_small_mt<T, BITS, false>(a);
}

template <typename T, int BITS>
int gptq_gemm_small_occupancy(int mt, bool has_z, bool pf) {
  return has_z ? occupancy_small_mt<T, BITS, true>(mt, pf) : occupancy_small_mt<T, BITS, false>(mt, pf);
}

extern template int gptq_gemm_small_occupancy<__half, 4>(int, bool, bool);
extern template int gptq_gemm_small_occupancy<__half, 8>(int, bool, bool);
extern template int gptq_gemm_small_occupancy<__nv_bfloat16, 4>(int, bool, bool);
extern template int gptq_gemm_small_occupancy<__nv_bfloat16, 8>(int, bool, bool);
extern template cudaError_t gptq_gemm_small_launch<__half, 4>(const SmallArgs&);
extern template cudaError_t gptq_gemm_small_launch<__half, 8>(const SmallArgs&);
extern template cudaError_t gptq_gemm_small_launch<__nv_bfloat16, 4>(const SmallArgs&);
extern template cudaError_t gptq_gemm_small_launch<__nv_bfloat16, 8>(const SmallArgs&);

}  // namespace zephyr
