// GPTQ kernels: fused dequantize + matmul for small M on tensor cores, and a
// dequantize-to-fp16/bf16 kernel for large M (followed by cuBLAS).
//
// Pure CUDA (no torch headers), so it compiles on its own; the launchers and
// argument checks live in gptq_gemm.cu.
//
// ---------------------------------------------------------------------------
// The repacked ("zk") layout, built once at load time by
// zephyr_plugins/repack.py (which is the executable specification):
//
//   K rows are first permuted by argsort(g_idx) (act-order) so each group is a
//   contiguous run of rows, then padded to Kp = ceil(K/128)*128; N is padded to
//   Np = ceil(N/64)*64.  The weight is cut into blocks of 16 rows x 64 columns
//   ("steps", 8 per 128-row "chunk"); one step is exactly what a warp feeds
//   to eight mma.m16n8k16 B operands (n-tiles t = 0..7 of 8 columns each).
//   Inside a chunk the rows are reordered: B-fragment element (h, e) of lane
//   l in step i is chunk row 32*(l%4) + 4*i + 2*h + e. (The mma sums over k in
//   any order, and this makes a lane's A fragments of the whole chunk the 32
//   contiguous x columns [32*(l%4), +32): four 16-byte loads, and its 32 rows
//   one group for group sizes 32, 64 and multiples of 128.)
//
//   qweight: int32 [Np/64, Kp/16, 32*bits]: for each 64-column block, its
//     steps in K order; inside a step, lane l of the warp reads bits/4
//     16-byte vectors (coalesced: the warp reads 512 contiguous bytes each).
//     Lane l holds column n = t*8 + l/4 of each tile t, as B fragments
//     b0 = (h=0, e=0..1), b1 = (h=1, e=0..1).
//   4-bit: word j of the lane covers tiles A = 2j and B = 2j+1; nibble
//     e*4 + ab*2 + h holds element (h, e) of tile 2j+ab.  So
//     (w & 0x000f000f) is b0 of A as two 16-bit lanes, (w & 0x00f000f0) is
//     b1 of A (times 16), and w >> 8 gives the same for B: two LOP3s per
//     fragment, no shifts per value (bf16, with 7 mantissa bits, shifts
//     the high nibble down first).
//   8-bit: vector hh (0/1) holds tiles 4hh..4hh+3, word j tile 4hh+j; byte
//     h*2 + e holds element (h, e).
//   scales, zeros: [G, Np] in the activation dtype, each 64-column block
//     stored as [l/4][t] so a lane reads its 8 values in one 16-byte load.
//     zeros holds the real zero point (checkpoint offset already added); it
//     is empty when every zero point is 2^(bits-1) (symmetric checkpoints).
//   perm: int32 [K], repacked row k came from checkpoint row perm[k]; empty
//     when g_idx is the trivial k // group_size.
// ---------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace zephyr {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kChunkK = 128;  // K rows a warp handles per main-loop iteration (8 steps)
constexpr int kBlockN = 64;   // columns per block
constexpr int kMaxMTiles = 4;  // fused kernel serves M <= 64
constexpr int kSmallMaxM = 16;  // planned: the fused small-M kernel up to here, the tiled one above
constexpr int kXAlign = 16;  // bytes: x rows are read with 16-byte loads

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  using T2 = __half2;
  // 0x6400 is 1024.0 in fp16: OR-ing a nibble into its mantissa gives 1024+q.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicF = 1024.f;
  __device__ static __forceinline__ T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  __device__ static __forceinline__ T2 bcast(__half a) { return __half2half2(a); }
  __device__ static __forceinline__ float to_float(__half a) { return __half2float(a); }
  __device__ static __forceinline__ __half from_float(float a) { return __float2half_rn(a); }
  __device__ static __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // 0x4300 is 128.0 in bf16 (7 mantissa bits: 128+q is exact for q < 128).
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicF = 128.f;
  __device__ static __forceinline__ T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  __device__ static __forceinline__ T2 bcast(__nv_bfloat16 a) { return __bfloat162bfloat162(a); }
  __device__ static __forceinline__ float to_float(__nv_bfloat16 a) { return __bfloat162float(a); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float a) { return __float2bfloat16_rn(a); }
  __device__ static __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename V, typename U>
__device__ __forceinline__ V bit_cast_to(U u) {
  static_assert(sizeof(V) == sizeof(U), "size mismatch");
  V v;
  memcpy(&v, &u, sizeof(V));
  return v;
}

// (a & b) | c in one LOP3. Written as C, (w & mask) | magic compiles to two LOP3 (one immediate per
// instruction; the H100 GEMV loop had 8 LOP3 per HMMA instead of 4).
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Weights are read exactly once: keep them out of L1 so x and scales stay.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---- mbarriers and bulk copies (sm_90: the TMA engine copies global to
// shared memory without registers, counting completed bytes on an mbarrier).
// Other targets compile these to nothing; the host launches the kernels that
// use them only on sm_90 (gptq_gemm.cu).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ZEPHYR_DEVICE_BULK 1
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// A barrier completing a phase once `count` threads arrived (and the bytes they announced landed).
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// Makes the initialized barriers visible to the other threads and to the async proxy (the copies).
__device__ __forceinline__ void mbar_init_fence() {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// Arrives on `bar` where `pred` holds, without a branch (the WS kernel calls it between asynchronous
// wgmma, where ptxas serializes them around control flow).
__device__ __forceinline__ void mbar_arrive_if(uint64_t* bar, bool pred) {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
                   smem_addr(bar)),
               "r"(int(pred))
               : "memory");
#endif
}
// Arrives on `bar` announcing `bytes` that bulk copies will complete.
__device__ __forceinline__ void mbar_arrive_expect(uint64_t* bar, uint32_t bytes) {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global `src` to shared
// `dst`, completing them on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
#endif
}
// Waits until phase `parity` (0/1) of `bar` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef ZEPHYR_DEVICE_BULK
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
#endif
}

// ---- Thread-block clusters (sm_90): the WS kernel's split-K blocks of one output tile form a
// cluster and sum their accumulators through each other's shared memory.
// Every thread of every block of the cluster arrives, then waits for all (release / acquire at
// cluster scope: shared-memory writes before it are visible to the cluster's blocks after it).
__device__ __forceinline__ void cluster_sync_all() {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
// The same barrier without memory ordering (no fence before the arrive): for a cluster's last
// barrier, which only keeps every block's shared memory alive until the others have read it (the
// values those reads returned were already used by then).
__device__ __forceinline__ void cluster_sync_relaxed() {
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}
// The address of shared-memory address `addr` (of this block) in block `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_map(uint32_t addr, uint32_t rank) {
  uint32_t r = addr;
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
#endif
  return r;
}
__device__ __forceinline__ float ld_cluster_f32(uint32_t addr) {
  float v = 0.f;
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
#endif
  return v;
}
__device__ __forceinline__ float2 ld_cluster_f2(uint32_t addr) {
  float2 v = make_float2(0.f, 0.f);
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
#endif
  return v;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
#endif
  return v;
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r = 0;
#ifdef ZEPHYR_DEVICE_BULK
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}

// Programmatic dependent launch (Hopper): the gather kernel lets the fused
// kernel start early; the fused kernel waits only before it reads x.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Launch `kernel` on `stream`; with `pdl`, as a programmatic dependent launch
// (sm_90): it may start before the previous kernel ends, and waits in
// pdl_wait() before reading what that kernel wrote.
// `smem`: bytes of dynamic shared memory.
// The launch attribute that makes each `cluster` of blocks one thread-block cluster (sm_90).
inline cudaLaunchAttribute cluster_attribute(dim3 cluster) {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = cluster.x;
  a.val.clusterDim.y = cluster.y;
  a.val.clusterDim.z = cluster.z;
  return a;
}

// Blocks grouped as clusters of `cluster` (each grid dimension a multiple of it; sm_90) where it
// holds more than one block.
template <typename... Params, typename... Args>
cudaError_t launch_kernel_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                   cudaStream_t stream, bool pdl, dim3 cluster, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) attr[n++] = cluster_attribute(cluster);
  cfg.attrs = attr;
  cfg.numAttrs = n;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename... Params, typename... Args>
cudaError_t launch_kernel_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               bool pdl, Args... args) {
  return launch_kernel_clusters(kernel, grid, block, smem, stream, pdl, dim3(1, 1, 1), args...);
}

// Blocks of `kernel` (`block` threads, `smem` bytes of dynamic shared memory) that can be resident at
// once as clusters of `cluster` on the current device: cudaOccupancyMaxActiveClusters x the cluster's
// size, or 0 where the query fails or no cluster fits (the error is cleared). Clusters sit within one
// GPC, so this can be fewer than the SMs hold as single blocks. A host query; callers cache it.
inline int resident_cluster_blocks(const void* kernel, dim3 block, size_t smem, dim3 cluster) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = cluster;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1] = {cluster_attribute(cluster)};
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (kernel == nullptr || cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    return 0;
  }
  return n * int(cluster.x * cluster.y * cluster.z);
}

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl,
                          Args... args) {
  return launch_kernel_smem(kernel, grid, block, 0, stream, pdl, args...);
}

// "zk order" of x within a 128-row chunk (the wgmma kernels): the chunk row that mma k index j
// (0..15) of step i (0..7) reads, 32c + 4i + q with c = (j % 8) / 2 and q = j % 2 + 2 * (j / 8).
__device__ __forceinline__ int zk_chunk_row(int i, int j) { return 32 * ((j & 7) >> 1) + 4 * i + (j & 1) + 2 * (j >> 3); }

// x [M, K] -> xg [M, Kp]: columns gathered through perm (act-order) or
// copied, zero-padded to Kp, so the fused kernel reads x with aligned 16-byte
// loads and never past the end. One launch per call, M*Kp elements.
// ZK: in "zk order" for the wgmma kernel (gptq_tiled.cuh): output column
// 128*chunk + 16*i + j holds chunk column 32*c + 4*i + q, with c = (j % 8) / 2
// and q = j % 2 + 2*(j / 8): step i's 16 k in the order of the mma k index.
// Launched as a programmatic dependent of the kernel before it (pdl_chain), it reads the
// permutation (fixed data) before griddepcontrol.wait and x, which that kernel may write, after it.
template <typename T, bool ZK>
__global__ void gather_pad_kernel(const T* __restrict__ x, const int* __restrict__ perm, T* __restrict__ xg, int K,
                                  int Kp) {
  pdl_launch_dependents();
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  const int m = blockIdx.y;
  if (k >= Kp) return;
  const int j = k & 15, i = (k >> 4) & 7;
  const int src = ZK ? (k & ~127) + zk_chunk_row(i, j) : k;
  const int col = src < K ? (perm ? __ldg(perm + src) : src) : -1;
  pdl_wait();
  xg[(size_t)m * Kp + k] = col >= 0 ? x[(size_t)m * K + col] : Traits<T>::from_float(0.f);
}

// x [M, K] -> xt, the WS kernel's x tiles (gptq_tiled.cuh) exactly as they lie
// in its shared memory, so that one bulk copy moves a (row tile, chunk):
// [row tiles][chunks][16 units][rows][8 values], where unit u of a chunk holds
// its zk-ordered columns 8u .. 8u + 7 (as gather_pad_kernel<T, true> writes
// them) and rows past M are zeros. One 16-byte unit per thread (units < 2^31);
// a programmatic dependent like gather_pad_kernel.
template <typename T>
__global__ void gather_tiles_kernel(const T* __restrict__ x, const int* __restrict__ perm, T* __restrict__ xt,
                                    int M, int K, int Kp, int rows, int units) {
  pdl_launch_dependents();
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= units) return;
  const int chunks = Kp / kChunkK;
  const int r = o % rows, q = o / rows;
  const int u = q & 15, ch = (q >> 4) % chunks, rt = (q >> 4) / chunks;
  const int m = rt * rows + r, i = u >> 1;  // mma k index j = 8 * (u & 1) + e of step i
  int cols[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int j = 8 * (u & 1) + e;
    const int src = ch * kChunkK + zk_chunk_row(i, j);
    cols[e] = src < K && m < M ? (perm ? __ldg(perm + src) : src) : -1;
  }
  pdl_wait();
  alignas(16) T v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = cols[e] >= 0 ? x[(size_t)m * K + cols[e]] : Traits<T>::from_float(0.f);
  reinterpret_cast<uint4*>(xt)[o] = *reinterpret_cast<const uint4*>(v);
}

// gather_tiles_kernel's output through shared memory, R (1, 2, 4 or 8) rows of
// x per block: the block copies its rows into shared memory (row stride K + 8
// values, so that the R rows of a unit sit in different banks; on sm_90 by one
// bulk copy per row, else with coalesced 16-byte loads), then writes its units,
// the R rows of one unit being R*16 contiguous bytes of xt. In order (no perm)
// a unit's pairs are read with 4-byte loads, and on sm_90 a block copies only
// its chunks' columns. gather_tiles_kernel reads each value from global
// memory where it lands: 8 scattered 2-byte loads per unit, 32 rows apart in
// a warp, which kept L2 83% busy for 34 us at M = 1024, K = 4096 (ncu, H100,
// 1.43 GHz) while the WS kernel after it took 67-425 us. Needs K % 8 == 0, x
// 16-byte aligned and perm 8-byte aligned; rows and R powers of two. Grid:
// (padded rows / R, splits): block (b, s) writes the units of chunks
// [s*cps, (s+1)*cps) (at small M, more blocks than row groups; with perm each
// still copies its whole rows, since act-order takes a chunk's columns from all
// K). Dynamic shared memory: R * (K + 8) values, then 16 bytes (the mbarrier).
template <typename T>
__global__ void __launch_bounds__(256) gather_tiles_smem_kernel(const T* __restrict__ x, const int* __restrict__ perm,
                                                               T* __restrict__ xt, int M, int K, int Kp, int rows,
                                                               int R, int cps, int bulk) {
  extern __shared__ uint4 gather_rows[];  // [R][K + 8] values, then (bulk) an mbarrier
  pdl_launch_dependents();
  const T* xs = reinterpret_cast<const T*>(gather_rows);
  const int ks = K + 8, kv = K / 8, m0 = blockIdx.x * R, chunks = Kp / kChunkK;
  const int r_shift = __ffs(R) - 1, rows_shift = __ffs(rows) - 1;  // both powers of two
  const int c0 = blockIdx.y * cps, nq = 16 * max(0, min(cps, chunks - c0));
#ifdef ZEPHYR_DEVICE_BULK
  // sm_90: one thread hands the rows to the TMA engine (one bulk copy per row, all in flight at
  // once); rows past M are zeroed by the block meanwhile. In order (no perm), only the block's
  // columns [128 c0, 128 (c0 + cps)) are copied.
  if (bulk) {
    uint64_t* bar = reinterpret_cast<uint64_t*>(gather_rows + R * (ks / 8));
    const int valid = max(0, min(R, M - m0));
    const int v0 = perm ? 0 : min(K, c0 * kChunkK), v1 = perm ? K : min(K, (c0 + cps) * kChunkK);
    if (threadIdx.x == 0) {
      mbar_init(bar, 1);
      mbar_init_fence();
    }
    for (int c = valid * (ks / 8) + threadIdx.x; c < R * (ks / 8); c += blockDim.x)
      gather_rows[c] = make_uint4(0, 0, 0, 0);
    __syncthreads();
    pdl_wait();
    if (threadIdx.x == 0) {
      mbar_arrive_expect(bar, uint32_t(valid) * uint32_t(v1 - v0) * 2u);
      for (int r = 0; r < valid && v1 > v0; ++r)
        bulk_copy(gather_rows + r * (ks / 8) + v0 / 8, x + (size_t)(m0 + r) * K + v0, uint32_t(v1 - v0) * 2u, bar);
    }
    mbar_wait(bar, 0);
    __syncthreads();
  } else
#endif
  {
    pdl_wait();
    for (int r = 0; r < R; ++r) {
      const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)(m0 + r) * K);
      for (int c = threadIdx.x; c < kv; c += blockDim.x)
        gather_rows[r * (ks / 8) + c] = m0 + r < M ? src[c] : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
  }
  // Task t: row r = t % R of unit q = t / R of the row (chunk q / 16, unit q % 16). The unit's 8 values
  // are 4 pairs of adjacent chunk columns (zk_chunk_row): 32c + 4i + 2h + {0, 1}, c = 0..3, h = u % 2.
  if (perm == nullptr) {  // in order: the pairs are adjacent values, one 4-byte load each (K % 8 == 0)
#pragma unroll 4
    for (int t = threadIdx.x; t < R * nq; t += blockDim.x) {
      const int r = t & (R - 1), q = 16 * c0 + (t >> r_shift);
      const int u = q & 15, ch = q >> 4, i = u >> 1;
      const int m = m0 + r;
      uint4 v;
      uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int src = ch * kChunkK + zk_chunk_row(i, 8 * (u & 1) + 2 * c);
        w[c] = src < K ? *reinterpret_cast<const uint32_t*>(xs + r * ks + src) : 0u;
      }
      const size_t o = ((size_t)((m >> rows_shift) * chunks + ch) * 16 + u) * rows + (m & (rows - 1));
      reinterpret_cast<uint4*>(xt)[o] = v;
    }
    return;
  }
#pragma unroll 2
  for (int t = threadIdx.x; t < R * nq; t += blockDim.x) {
    const int r = t & (R - 1), q = 16 * c0 + (t >> r_shift);
    const int u = q & 15, ch = q >> 4, i = u >> 1;
    const int m = m0 + r;
    alignas(16) T v[8];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int src = ch * kChunkK + zk_chunk_row(i, 8 * (u & 1) + 2 * c);
      int2 col = make_int2(src, src + 1);
      if (src + 1 < K) col = __ldg(reinterpret_cast<const int2*>(perm + src));
      else if (src < K) col.x = __ldg(perm + src);
      v[2 * c] = src < K ? xs[r * ks + col.x] : Traits<T>::from_float(0.f);
      v[2 * c + 1] = src + 1 < K ? xs[r * ks + col.y] : Traits<T>::from_float(0.f);
    }
    const size_t o = ((size_t)((m >> rows_shift) * chunks + ch) * 16 + u) * rows + (m & (rows - 1));
    reinterpret_cast<uint4*>(xt)[o] = *reinterpret_cast<const uint4*>(v);
  }
}

// ---------------------------------------------------------------------------
// Fused kernel. Grid: (Np/64, S). Block (nb, s) computes out[:, nb*64 : +64]
// over chunks [s*cpb, min((s+1)*cpb, chunks)) of K; warps take the block's
// chunks round-robin, each prefetching its next chunk's weights while it
// computes the current one. Lane (r = l/4, c = l%4) reads x row r, columns
// [32c, 32c+32) of the chunk in four 16-byte loads: the repack ordered K
// inside each chunk so that these are exactly the lane's A fragments of the
// chunk's 8 steps (step i uses columns 32c + 4i + {0..3}), and the lane's
// 32 rows lie in one group for group sizes 32, 64 and multiples of 128.
// Warps are reduced through shared memory in a fixed order; when S > 1 each
// block stores an fp32 partial and the last block to arrive at locks[nb]
// sums the S partials in order (deterministic), writes the output and resets
// the lock to 0 for the next call.
//   MT: m16 tiles (M <= 16*MT); PF: register double-buffering of weights.
// ---------------------------------------------------------------------------
template <typename T, int BITS, bool HAS_Z, int MT, bool PF>
__global__ void __launch_bounds__(kThreads) gptq_gemm_small_kernel(
    const T* __restrict__ x,            // [M, ldx]: x itself (ldx = K = Kp) or gathered/padded (ldx = Kp)
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32
    const T* __restrict__ scales,       // [G, Np] shuffled
    const T* __restrict__ zeros,        // [G, Np] shuffled (read only if HAS_Z)
    float* __restrict__ partial,        // [S, M, Np] fp32, used when S > 1
    int* __restrict__ locks,            // [Np/64]
    T* __restrict__ out,                // [M, N]
    int M, int N, int Kp, int Np, int G, int group_rows, int cpb, int S) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  constexpr int VPS = BITS / 4;  // 16-byte weight vectors per lane per step
  // PF: load the next chunk's weights into a second register buffer while
  // computing this one. It costs ~32 registers (occupancy), so the host uses
  // it only when warps have several chunks each.
  constexpr bool kPrefetch = PF;
  constexpr int kDefaultZero = 1 << (BITS - 1);
  __shared__ float red[kMaxMTiles * 16 * kBlockN];
  __shared__ int is_last;

  const int nb = blockIdx.x;
  const int s = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int chunks = Kp / kChunkK;
  const int c_begin = s * cpb;
  const int c_count = min(cpb, chunks - c_begin);
  const int KS = Kp / 16;
  const int r0 = lane >> 2;
  const int cl = lane & 3;

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][t][e] = 0.f;

  uint4 wq[8][VPS];
  uint4 sv = make_uint4(0, 0, 0, 0), zv = make_uint4(0, 0, 0, 0);
  auto load_chunk = [&](uint4 (&w)[8][VPS], uint4& sc, uint4& zc, int chunk) {
    const uint4* src = qweight + ((size_t)nb * KS + (size_t)chunk * 8) * VPS * 32 + lane;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int h = 0; h < VPS; ++h) w[i][h] = load_stream(src + (i * VPS + h) * 32);
    const int g = min((chunk * kChunkK + cl * 32) / group_rows, G - 1);
    const size_t off = (size_t)g * Np + nb * kBlockN + r0 * 8;
    sc = __ldg(reinterpret_cast<const uint4*>(scales + off));
    if (HAS_Z) zc = __ldg(reinterpret_cast<const uint4*>(zeros + off));
  };
  // Weights do not depend on x: request them before waiting for the gather.
  if (warp < c_count) load_chunk(wq, sv, zv, c_begin + warp);
  pdl_wait();

  for (int c = warp; c < c_count; c += kWarps) {
    const int chunk = c_begin + c;
    uint4 wn[8][VPS];
    uint4 sn = sv, zn = zv;
    if (kPrefetch && c + kWarps < c_count) load_chunk(wn, sn, zn, chunk + kWarps);
    // This lane's x: rows mt*16 + r0 (+8), columns chunk*128 + 32*cl .. +32,
    // read 16 bytes (two steps) at a time.
    const T* xrow = x + (size_t)r0 * Kp + chunk * kChunkK + cl * 32;

    const T* sp = reinterpret_cast<const T*>(&sv);
    const T* zp = reinterpret_cast<const T*>(&zv);
    // Per-tile constants (both halves of a B fragment share the column).
    T2 sc2[8], zlo2[8], zhi2[8];
    float sf[8], zf[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const float z = HAS_Z ? Tr::to_float(zp[t]) : float(kDefaultZero);
      if (BITS == 4) {
        sc2[t] = Tr::bcast(sp[t]);
        // (magic + q) - (magic + z) is an exact small integer; so is
        // (magic + 16q)/16 - (magic/16 + z): the only rounding is * scale.
        zlo2[t] = Tr::bcast(Tr::from_float(Tr::kMagicF + z));
        zhi2[t] = Tr::bcast(Tr::from_float(-(Tr::kMagicF / 16.f + z)));
      } else {
        sf[t] = Tr::to_float(sp[t]);
        zf[t] = 8388608.f + z;  // 2^23 + z: matches the fp32 magic below
      }
    }
    const T2 inv16 = Tr::bcast(Tr::from_float(1.f / 16.f));

    uint4 xq[MT][2];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i % 2 == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = mt * 16 + hh * 8 + r0;
            xq[mt][hh] = row < M ? __ldg(reinterpret_cast<const uint4*>(xrow + (size_t)(mt * 16 + hh * 8) * Kp) + i / 2)
                                 : make_uint4(0, 0, 0, 0);
          }
      }
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t* lo = reinterpret_cast<const uint32_t*>(&xq[mt][0]);
        const uint32_t* hi = reinterpret_cast<const uint32_t*>(&xq[mt][1]);
        a[mt][0] = lo[2 * (i % 2)];
        a[mt][2] = lo[2 * (i % 2) + 1];
        a[mt][1] = hi[2 * (i % 2)];
        a[mt][3] = hi[2 * (i % 2) + 1];
      }
      if (BITS == 4) {
        const uint32_t* w4 = reinterpret_cast<const uint32_t*>(&wq[i][0]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int ab = 0; ab < 2; ++ab) {
            const int t = 2 * j + ab;
            const uint32_t w = ab ? (w4[j] >> 8) : w4[j];
            T2 lo = bit_cast_to<T2>(lop3_and_or(w, 0x000f000fu, Tr::kMagic));
            lo = __hmul2(__hsub2(lo, zlo2[t]), sc2[t]);
            T2 hi;
            if constexpr (Tr::kMagicF == 1024.f) {
              // fp16 has 10 mantissa bits: the high nibble fits in place (16q).
              hi = bit_cast_to<T2>(lop3_and_or(w, 0x00f000f0u, Tr::kMagic));
              hi = __hmul2(__hfma2(hi, inv16, zhi2[t]), sc2[t]);
            } else {
              // bf16 has 7: shift the high nibble down first.
              hi = bit_cast_to<T2>(lop3_and_or(w >> 4, 0x000f000fu, Tr::kMagic));
              hi = __hmul2(__hsub2(hi, zlo2[t]), sc2[t]);
            }
            const uint32_t b0 = bit_cast_to<uint32_t>(lo);
            const uint32_t b1 = bit_cast_to<uint32_t>(hi);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) Tr::mma(acc[mt][t], a[mt], b0, b1);
          }
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wq[i][h]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int t = 4 * h + j;
            const uint32_t w = w8[j];
            // byte -> low byte of the fp32 2^23: value 2^23 + q, exact.
            const float q0 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7440)) - zf[t];
            const float q1 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7441)) - zf[t];
            const float q2 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7442)) - zf[t];
            const float q3 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7443)) - zf[t];
            const uint32_t b0 = bit_cast_to<uint32_t>(Tr::pack(q0 * sf[t], q1 * sf[t]));
            const uint32_t b1 = bit_cast_to<uint32_t>(Tr::pack(q2 * sf[t], q3 * sf[t]));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) Tr::mma(acc[mt][t], a[mt], b0, b1);
          }
        }
      }
    }
    if (kPrefetch) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int h = 0; h < VPS; ++h) wq[i][h] = wn[i][h];
      sv = sn;
      zv = zn;
    } else if (c + kWarps < c_count) {
      load_chunk(wq, sv, zv, chunk + kWarps);
    }
  }

  // ---- reduce the 4 warps in a fixed order through shared memory.
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = mt * 16 + r0 + (e >= 2 ? 8 : 0);
            const int col = t * 8 + cl * 2 + (e & 1);
            if (row < M) {
              float* d = red + row * kBlockN + col;
              *d = (w == 0) ? acc[mt][t][e] : *d + acc[mt][t][e];
            }
          }
    }
    __syncthreads();
  }

  const int n0 = nb * kBlockN;
  if (S == 1) {
    for (int i = threadIdx.x; i < M * kBlockN; i += kThreads) {
      const int m = i / kBlockN, j = i % kBlockN;
      if (n0 + j < N) out[(size_t)m * N + n0 + j] = Tr::from_float(red[i]);
    }
    return;
  }
  for (int i = threadIdx.x; i < M * kBlockN; i += kThreads) {
    const int m = i / kBlockN, j = i % kBlockN;
    __stcg(partial + ((size_t)s * M + m) * Np + n0 + j, red[i]);
  }
  __threadfence();  // make this block's partial visible before it counts itself in
  __syncthreads();
  if (threadIdx.x == 0) is_last = (atomicAdd(locks + nb, 1) == S - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < M * kBlockN; i += kThreads) {
    const int m = i / kBlockN, j = i % kBlockN;
    float v = 0.f;
    for (int ss = 0; ss < S; ++ss) v += __ldcg(partial + ((size_t)ss * M + m) * Np + n0 + j);
    if (n0 + j < N) out[(size_t)m * N + n0 + j] = Tr::from_float(v);
  }
  if (threadIdx.x == 0) locks[nb] = 0;  // ready for the next call (and graph replay)
}

// ---------------------------------------------------------------------------
// Dequantize the checkpoint layout to T [K, N] (for large M, then cuBLAS).
// One thread per (packed row w, column n): coalesced along N like qweight.
// W[k, n] = (q - ((zstored + zero_offset) & mask)) * scales[g_idx[k], n],
// computed in fp32 exactly as zephyr_plugins.reference.dequantize does.
// ---------------------------------------------------------------------------
template <typename T, int BITS, int VEC>
__global__ void gptq_dequantize_kernel(const int* __restrict__ qweight,  // [ceil(K*BITS/32), N]
                                       const int* __restrict__ qzeros,   // [G, ceil(N*BITS/32)]
                                       const T* __restrict__ scales,     // [G, N]
                                       const int* __restrict__ g_idx,    // [K]
                                       T* __restrict__ out,              // [K, N]
                                       int K, int N, int zero_offset) {
  using Tr = Traits<T>;
  constexpr int PER = 32 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;  // VEC consecutive columns (N % VEC == 0)
  const int w = blockIdx.y;
  if (n >= N) return;
  uint32_t q[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) q[v] = static_cast<uint32_t>(qweight[(size_t)w * N + n + v]);
  const int zwords = (N * BITS + 31) / 32;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int k = w * PER + j;
    if (k >= K) break;
    const int g = __ldg(g_idx + k);
    alignas(8) T o[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int nn = n + v;
      const uint32_t zw = static_cast<uint32_t>(__ldg(qzeros + (size_t)g * zwords + nn / PER));
      const int z = (int(zw >> ((nn % PER) * BITS) & MASK) + zero_offset) & MASK;
      const int val = int((q[v] >> (j * BITS)) & MASK);
      o[v] = Tr::from_float(float(val - z) * Tr::to_float(scales[(size_t)g * N + nn]));
    }
    if constexpr (VEC == 4) {
      *reinterpret_cast<uint2*>(out + (size_t)k * N + n) = *reinterpret_cast<const uint2*>(o);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[(size_t)k * N + n + v] = o[v];
    }
  }
}

// ---------------------------------------------------------------------------
// Dequantize the zk layout to T [Kp, Np], for large M: x @ W in cuBLAS (the
// checkpoint tensors are not needed). Repacked row k < K is written at row
// perm[k] (the checkpoint's order, so x is read as it is: gathering x's
// columns cost more than the whole dequantization at M = 4096); without perm,
// and for the padding rows k >= K, at row k.
// Block = one 128-row chunk x one 64-column block: its 8 steps (4 or 8 KB)
// are read with coalesced 16-byte loads into shared memory, then thread t
// writes rows (rr*16 + t/8) of the chunk, 8 columns (t%8)*8.. each, as one
// 16-byte store (a warp writes 4 rows x 128 contiguous bytes).
// W[k, n] = T(float(q - z) * float(s)), z = zeros or 2^(bits-1), the group
// of row k being min(k / group_rows, G - 1): repack.gemm_repacked_reference.
// ---------------------------------------------------------------------------
template <typename T, int BITS>
__global__ void __launch_bounds__(128) gptq_dequantize_zk_kernel(
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32
    const T* __restrict__ scales,       // [G, Np], zk column order
    const T* __restrict__ zeros,        // [G, Np] or nullptr
    const int* __restrict__ perm,       // [K] or nullptr
    T* __restrict__ out,                // [Kp, Np]
    int K, int Kp, int Np, int G, int group_rows) {
  using Tr = Traits<T>;
  constexpr int kWords = 8 * 32 * BITS;  // one chunk of one column block
  __shared__ uint32_t w[kWords];
  const int chunk = blockIdx.x, nb = blockIdx.y;
  const uint4* src = qweight + ((size_t)nb * (Kp / 16) + (size_t)chunk * 8) * (32 * BITS / 4);
  for (int i = threadIdx.x; i < kWords / 4; i += blockDim.x) reinterpret_cast<uint4*>(w)[i] = load_stream(src + i);
  __syncthreads();
  const int t = threadIdx.x % 8;  // this thread's 8 columns: n = t*8 + l, l = 0..7
  const T* sc = scales + (size_t)nb * 64 + t;  // column t*8+l is stored at l*8 + t
  const T* zc = zeros ? zeros + (size_t)nb * 64 + t : nullptr;
  int g_prev = -1;
  float s[8], z[8];
#pragma unroll 1
  for (int rr = 0; rr < 8; ++rr) {
    const int r = rr * 16 + threadIdx.x / 8;  // row in the chunk: r = c*32 + i*4 + h*2 + e
    const int c = r >> 5, i = (r >> 2) & 7, h = (r >> 1) & 1, e = r & 1;
    const int k = chunk * 128 + r;
    const int g = min(k / group_rows, G - 1);
    if (g != g_prev) {
#pragma unroll
      for (int l = 0; l < 8; ++l) {
        s[l] = Tr::to_float(sc[(size_t)g * Np + l * 8]);
        z[l] = zc ? Tr::to_float(zc[(size_t)g * Np + l * 8]) : float(1 << (BITS - 1));
      }
      g_prev = g;
    }
    alignas(16) T o[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) {  // column nn = t*8 + l of the block, held by lane l*4 + c
      const int lane = l * 4 + c;
      int q;
      if constexpr (BITS == 4) {  // tile t = 2j + ab; nibble e*4 + ab*2 + h of word lane*4 + j
        const uint32_t word = w[i * 128 + lane * 4 + (t >> 1)];
        q = int(word >> ((e * 4 + (t & 1) * 2 + h) * 4)) & 0xf;
      } else {  // tile t = 4hh + j; byte h*2 + e of word hh*128 + lane*4 + j
        const uint32_t word = w[i * 256 + (t >> 2) * 128 + lane * 4 + (t & 3)];
        q = int(word >> ((h * 2 + e) * 8)) & 0xff;
      }
      o[l] = Tr::from_float((float(q) - z[l]) * s[l]);
    }
    const int row = (perm && k < K) ? __ldg(perm + k) : k;
    *reinterpret_cast<uint4*>(out + (size_t)row * Np + nb * 64 + t * 8) = *reinterpret_cast<const uint4*>(o);
  }
}

}  // namespace zephyr
