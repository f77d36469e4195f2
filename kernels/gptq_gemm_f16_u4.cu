// Fused small-M, tiled and GEMV GPTQ kernels for __half activations and 4-bit weights.
#include "gptq_gemv.cuh"
#include "gptq_launch.cuh"
#include "gptq_tiled.cuh"

namespace zephyr {
template cudaError_t gptq_gemm_small_launch<__half, 4>(const SmallArgs&);
template int gptq_gemm_small_occupancy<__half, 4>(int, bool, bool);
template cudaError_t gptq_gemv_launch<__half, 4>(const GemvArgs&);
template int gptq_gemv_occupancy<__half, 4>(int, int, bool, bool, bool);
template int gptq_gemv_gx_smem_cap<__half, 4>(int, int, bool, bool, bool);
template cudaError_t gptq_tiled_launch<__half, 4>(const TiledArgs&);
template int gptq_tiled_occupancy<__half, 4>(int, bool, int, int);
template int gptq_ws_cluster_slots<__half, 4>(int, bool, int, int);
}  // namespace zephyr
