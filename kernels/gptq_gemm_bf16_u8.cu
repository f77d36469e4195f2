// Fused small-M, tiled and GEMV GPTQ kernels for __nv_bfloat16 activations and 8-bit weights.
#include "gptq_gemv.cuh"
#include "gptq_launch.cuh"
#include "gptq_tiled.cuh"

namespace zephyr {
template cudaError_t gptq_gemm_small_launch<__nv_bfloat16, 8>(const SmallArgs&);
template int gptq_gemm_small_occupancy<__nv_bfloat16, 8>(int, bool, bool);
template cudaError_t gptq_gemv_launch<__nv_bfloat16, 8>(const GemvArgs&);
template int gptq_gemv_occupancy<__nv_bfloat16, 8>(int, int, bool, bool, bool);
template int gptq_gemv_gx_smem_cap<__nv_bfloat16, 8>(int, int, bool, bool, bool);
template cudaError_t gptq_tiled_launch<__nv_bfloat16, 8>(const TiledArgs&);
template int gptq_tiled_occupancy<__nv_bfloat16, 8>(int, bool, int, int);
template int gptq_ws_cluster_slots<__nv_bfloat16, 8>(int, bool, int, int);
}  // namespace zephyr
