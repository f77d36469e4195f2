// L2 -> shared memory throughput of the copies a Hopper kernel can use (sm_90a): 1-D bulk copies
// (cp.async.bulk, what the WS kernel issues), 2-D tensor copies (cp.async.bulk.tensor with a tensor map,
// three L2 promotions), 16-byte loads by 128 threads, and the 1-D bulk copies into a ring that begins
// 80 bytes past a 128-byte boundary (where the WS kernel's ring began before it was aligned). One block
// per SM streams chunks of 32 KB ("x") + 4 x 4 KB ("weights") from an L2-resident buffer through a
// 4-stage ring; its consumer warps only wait for each stage and release it.
//
//   nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a -O3 benchmarks/l2_copy_throughput.cu -o l2_copy
//   ./l2_copy [buffer MB, default 24] [variant index, default all]
//
// Result on the H100 (benchmarks/results/ab_H100_2026-11-28/ws_ring_alignment.log): 7.6-7.8 TB/s for
// the aligned bulk and tensor copies alike (4 sectors per L2 request), 4.5 for the loads, and 4.2 for
// the misaligned ring, whose copies ncu counted at ~1.3 sectors per request.
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda.h>
#include <cuda_runtime.h>

#include "../kernels/gptq_kernels.cuh"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

// The kernels' own mbarrier and bulk-copy helpers (smem_addr, mbar_*, bulk_copy), so that this measures
// the very instructions the WS kernel issues; only the tensor-map copy is defined here.
using zephyr::bulk_copy;
using zephyr::mbar_arrive_expect;
using zephyr::mbar_arrive_if;
using zephyr::mbar_init;
using zephyr::mbar_init_fence;
using zephyr::mbar_wait;
using zephyr::smem_addr;

__device__ __forceinline__ void tcopy(void* d, const CUtensorMap* m, int c0, int c1, uint64_t* b) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_addr(d)), "l"(m), "r"(c0), "r"(c1), "r"(smem_addr(b)) : "memory");
}

constexpr int kStages = 4, kX = 32768, kW = 4096, kStage = kX + 4 * kW;

// MODE 0: x one 32 KB bulk copy, w four 4 KB; 1: x eight 4 KB bulk copies; 2: tensor copies (x one box of
// 256 rows x 128 B, w four boxes of 32 rows); 3: 16-byte loads into registers by the 128 consumers.
template <int MODE>
__global__ void __launch_bounds__(160, 1) stream(const uint8_t* __restrict__ buf, long nx, long nw, int chunks,
                                                 const __grid_constant__ CUtensorMap tm_x,
                                                 const __grid_constant__ CUtensorMap tm_w, unsigned* sink) {
  extern __shared__ __align__(128) uint8_t ring_raw[];
  uint8_t* ring = ring_raw + (MODE == 4 ? 80 : 0);  // 4: the ring 80 bytes past a 128-byte boundary
  __shared__ uint64_t full[kStages], empty[kStages];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // x chunk i at i * kX, w piece j at nx * kX + j * kW (pieces of 4 KB, column blocks)
  auto xoff = [&](int c) { return (long(blockIdx.x) * 37 + long(c) * 11) % nx; };
  auto woff = [&](int c, int w) { return (long(blockIdx.x % 112) * 4 + w + long(c) * 4 * 112) % nw; };
  if (MODE == 3) {
    if (warp >= 4) return;
    uint4 acc = make_uint4(0, 0, 0, 0);
    for (int c = 0; c < chunks; ++c) {
      const uint4* xs = reinterpret_cast<const uint4*>(buf + xoff(c) * kX);
      uint4 v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = __ldcg(xs + i * 128 + threadIdx.x);
#pragma unroll
      for (int i = 0; i < 16; ++i) acc.x ^= v[i].x, acc.y ^= v[i].y, acc.z ^= v[i].z, acc.w ^= v[i].w;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint4* ws = reinterpret_cast<const uint4*>(buf + nx * kX + woff(c, w) * kW);
        uint4 u[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) u[i] = __ldcg(ws + i * 128 + threadIdx.x);
        acc.x ^= u[0].x ^ u[1].x;
        acc.y ^= u[0].y ^ u[1].y;
      }
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) sink[0] = 1;
    return;
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], 4); }
    mbar_init_fence();
  }
  __syncthreads();
  if (warp == 4) {
    if (lane == 0) {
      for (int c = 0; c < chunks; ++c) {
        const int s = c % kStages;
        if (c >= kStages) mbar_wait(&empty[s], ((c / kStages) - 1) & 1);
        uint8_t* d = ring + s * kStage;
        mbar_arrive_expect(&full[s], kStage);
        const long xo = xoff(c);
        if (MODE == 0 || MODE == 4) bulk_copy(d, buf + xo * kX, kX, &full[s]);
        if (MODE == 1) for (int i = 0; i < 8; ++i) bulk_copy(d + i * 4096, buf + xo * kX + i * 4096, 4096, &full[s]);
        if (MODE == 2) tcopy(d, &tm_x, 0, int(xo * (kX / 128)), &full[s]);
        for (int w = 0; w < 4; ++w) {
          const long wo = woff(c, w);
          if (MODE == 2) tcopy(d + kX + w * kW, &tm_w, 0, int((nx * kX + wo * kW) / 128), &full[s]);
          else bulk_copy(d + kX + w * kW, buf + nx * kX + wo * kW, kW, &full[s]);
        }
      }
    }
    return;
  }
  unsigned acc = 0;
  for (int c = 0; c < chunks; ++c) {
    const int s = c % kStages;
    mbar_wait(&full[s], (c / kStages) & 1);
    acc ^= reinterpret_cast<const unsigned*>(ring + s * kStage)[threadIdx.x * 97 % (kStage / 4)];
    __syncwarp();
    if (lane == 0) mbar_arrive_if(&empty[s], true);
  }
  if (acc == 0x12345678u) sink[0] = 1;
}

typedef CUresult (*EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                             const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

int main(int argc, char** argv) {
  int dev = 0, sms = 0;
  CK(cudaSetDevice(dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const long mb = argc > 1 ? atol(argv[1]) : 24;  // buffer MB (L2 is 50 MB)
  const int only = argc > 2 ? atoi(argv[2]) : -1;
  const long total = mb << 20, nx = (total * 2 / 3) / kX, nw = (total / 3) / kW;
  uint8_t* buf;
  unsigned* sink;
  CK(cudaMalloc(&buf, nx * kX + nw * kW));
  CK(cudaMemset(buf, 1, nx * kX + nw * kW));
  CK(cudaMalloc(&sink, 4));
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  auto encode = reinterpret_cast<EncodeFn>(fn);
  const int chunks = 400;
  const size_t smem = kStages * kStage + 128;
  CK(cudaFuncSetAttribute(stream<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CK(cudaFuncSetAttribute(stream<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CK(cudaFuncSetAttribute(stream<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CK(cudaFuncSetAttribute(stream<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  CK(cudaFuncSetAttribute(stream<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const char* promo_names[] = {"none", "64B", "128B", "256B"};
  struct V { int mode; int promo; const char* name; };
  std::vector<V> vs = {{0, 0, "bulk 1-D: x 32 KB + w 4x4 KB"}, {1, 0, "bulk 1-D: x 8x4 KB + w 4x4 KB"},
                       {2, 0, "tensor 2-D, L2 promotion none"}, {2, 2, "tensor 2-D, L2 promotion 128B"},
                       {2, 3, "tensor 2-D, L2 promotion 256B"}, {3, 0, "LDG.128 (ld.cg), 128 threads"}, {4, 0, "bulk 1-D as 0, ring 80 B past 128 B"}};
  printf("buffer %ld MB, %d blocks x %d chunks of %d KB\n", mb, sms, chunks, kStage / 1024);
  for (size_t vi = 0; vi < vs.size(); ++vi) {
    if (only >= 0 && int(vi) != only) continue;
    const V v = vs[vi];
    CUtensorMap tx{}, tw{};
    const cuuint64_t rows = cuuint64_t((nx * kX + nw * kW) / 128);
    cuuint64_t dims[2] = {64, rows}, strides[1] = {128};
    cuuint32_t boxx[2] = {64, 256}, boxw[2] = {64, 32}, es[2] = {1, 1};
    auto pr = CUtensorMapL2promotion(v.promo);
    if (encode(&tx, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, buf, dims, strides, boxx, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_NONE, pr, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS ||
        encode(&tw, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, buf, dims, strides, boxw, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_NONE, pr, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      printf("encode failed\n");
      return 1;
    }
    auto launch = [&] {
      if (v.mode == 0) stream<0><<<sms, 160, smem>>>(buf, nx, nw, chunks, tx, tw, sink);
      if (v.mode == 1) stream<1><<<sms, 160, smem>>>(buf, nx, nw, chunks, tx, tw, sink);
      if (v.mode == 2) stream<2><<<sms, 160, smem>>>(buf, nx, nw, chunks, tx, tw, sink);
      if (v.mode == 4) stream<4><<<sms, 160, smem>>>(buf, nx, nw, chunks, tx, tw, sink);
      if (v.mode == 3) stream<3><<<sms, 160, smem>>>(buf, nx, nw, chunks, tx, tw, sink);
    };
    for (int i = 0; i < 3; ++i) launch();
    CK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int r = 0; r < 15; ++r) {
      CK(cudaEventRecord(a));
      launch();
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    const double ms = ts[ts.size() / 2];
    const double bytes = double(sms) * chunks * kStage;
    printf("%-36s %8.1f us  %6.2f TB/s  %6.2f us per 48 KB chunk per SM  (promo %s)\n", v.name, ms * 1e3,
           bytes / (ms * 1e-3) / 1e12, ms * 1e3 / chunks, promo_names[v.promo]);
  }
  return 0;
}
