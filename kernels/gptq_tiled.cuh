// Tiled tensor-core GEMM on the zk layout (see the top of gptq_kernels.cuh)
// for batches above the GEMV kernel's (M > 32), and its launcher. Pure CUDA.
//
// Block = 4 warps = 4 consecutive 64-column blocks ("column group", 256
// columns) x one row tile of 16*MT rows of x x a range of K chunks (split S).
// - x: each 128-column chunk of the block's rows is copied once into shared
//   memory (cp.async, kTiledStages chunks in flight) and read there by all
//   four warps, so every byte of x crosses L2 once per column group, not once
//   per 64 columns (the fused small-M kernel's cost at M = 64: as many bytes
//   of x from L2 as cuBLAS reads of fp16 weights).
// - Weights: a warp streams its own column block's steps straight into
//   registers (every weight is used by one warp only), a ring of 16-32
//   registers, 4 steps ahead (8 at 4 bits with one m16 tile). Staging them
//   through shared memory as well (cp.async, 2-3 stages) was measured slower
//   on the H100 (M = 64 sum 246 vs 213 us).
// - Swapped operands, as in the GEMV kernel: the dequantized weight is the
//   mma A operand (16 columns x 16 k, tiles 2p and 2p + 1 of the zk step)
//   and each 8-row tile of x a B operand, whose two registers are exactly the
//   8 contiguous bytes a lane reads for its row (one LDS.64). The first
//   version (x as A) needed 4 register moves per A fragment and ~10 SASS
//   instructions per HMMA; this one ~2.8 (MT = 4) to ~4.3 (MT = 2).
// - M above 16*MT: more row tiles in the grid (blockIdx.x, the fastest grid
//   dimension, so the tiles sharing a weight run together and the second read
//   comes from L2).
// - Split-K: fp32 partials and a self-resetting lock per (row tile, column
//   group); each block stores its accumulators in register order (coalesced
//   float4), and the last block sums the S partials in order
//   (deterministic) with many loads in flight. The first version stored them
//   as [S, M, N] and summed them with few loads in flight: ncu put 30% of the
//   stall samples of gate_up at M = 64 in that epilogue.
// - WG (Hopper, sm_90a): the same kernel with the 4 warps as one warpgroup
//   issuing wgmma (x from shared memory in zk order; see the kernel).
// - WS (Hopper, sm_90a): a separate kernel, gptq_gemm_ws_kernel below: the WG
//   kernel's MMA warpgroup(s) fed by a producer warp through a ring of shared
//   memory stages filled by bulk copies; 32-, 64- or 128-row tiles.
// A lane's x for step i is row r, columns 32*(l%4) + 4i + {0..3} of the chunk
// (see the layout notes): 8 bytes in 16-byte unit 4*(l%4) + i/2. Units are
// stored swizzled (tiled_swizzle) so that the 8 lanes of a quarter-warp hit 8
// different bank groups with 16-byte accesses.
//
// Where it stands (H100, benchmarks/kernels.py; kernels/README.md): about
// cuBLAS fp16's time at M = 64 and 0.75x at M = 128 (sum of the Mistral
// shapes). ncu: the main loop is latency-bound at 2 warps per scheduler
// (~0.3 instructions issued per cycle), neither the tensor pipe nor DRAM is
// busy; wgmma alone did not change that (it wins ~10% at M = 128, 4-bit).
#pragma once

#include <type_traits>

#include "gptq_kernels.cuh"

namespace zephyr {

constexpr int kTiledWarps = 4;                        // warps per block, one 64-column block each
constexpr int kTiledUnits = kChunkK * 2 / 16;         // 16-byte units per x row of a chunk

// m16 tiles per row tile for M rows: 1, 2 or 4.
__host__ __device__ constexpr int tiled_mt(int m) { return m <= 16 ? 1 : (m <= 32 ? 2 : 4); }
// x chunks held in shared memory: 4 for the mma.sync kernel (3 in flight), 5
// for the wgmma one (3 in flight: a stage is refilled only two chunks after
// it was read, once that chunk's asynchronous wgmma have surely completed).
__host__ __device__ constexpr int tiled_stages(bool wg) { return wg ? 5 : 4; }
// Dynamic shared memory of one block, bytes: the stages of 16*MT rows of x.
__host__ __device__ constexpr int tiled_smem(int mt, bool wg) { return tiled_stages(wg) * 16 * mt * kTiledUnits * 16; }

// Unit u (0..15) of tile row r lives at unit tiled_swizzle(r, u) of the row:
// lanes (r, l%4) of a quarter-warp read units 4*(l%4) + j of rows r, r + 1;
// XOR-ing bit 3 of u into bit 1 and bit 0 of r into bit 0 spreads them over
// the 8 groups of 4 banks.
__device__ __forceinline__ int tiled_swizzle(int r, int u) { return u ^ ((r & 1) | ((u >> 2) & 2)); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- Hopper warpgroup MMA (wgmma), used by the WG variant of the kernel below.
// Only sm_90a has these instructions; other targets compile the WG variant to a
// trap, and the host launches it only where it was built for sm_90a
// (tiled_wgmma_available in gptq_gemm.cu).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ZEPHYR_DEVICE_WGMMA 1
#endif

__device__ __forceinline__ void wgmma_fence() {
#ifdef ZEPHYR_DEVICE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef ZEPHYR_DEVICE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef ZEPHYR_DEVICE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared-memory writes of this thread (cp.async) become visible to the async
// proxy, which is how wgmma reads its shared-memory operand.
__device__ __forceinline__ void fence_proxy_async_smem() {
#ifdef ZEPHYR_DEVICE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Shared-memory matrix descriptor without swizzle: `lbo` bytes between the
// two 8x8 core matrices of a k16 slice (the K direction), `sbo` bytes between
// core matrices of consecutive 8-row groups (the N direction).
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((a & 0x3FFFFu) >> 4) | (uint64_t((lbo >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFFu) << 32);
}

// Pins the accumulators in place around the wgmma sequence, so that the
// compiler moves no other definition of them into it (which would make ptxas
// serialize the wgmma).
template <int NX, int NP>
__device__ __forceinline__ void wgmma_fence_acc(float (&acc)[NX][NP][4]) {
#pragma unroll
  for (int j = 0; j < NX; ++j)
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[j][p][e])::"memory");
}

#define ZEPHYR_WG_D4(j) "+f"(acc[j][P][0]), "+f"(acc[j][P][1]), "+f"(acc[j][P][2]), "+f"(acc[j][P][3])
#define ZEPHYR_WG_N32 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, q, 1, 1, 0;\n}\n"
#define ZEPHYR_WG_N64                                                                                         \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
  "%29,%30,%31}, {%32,%33,%34,%35}, %36, q, 1, 1, 0;\n}\n"
#define ZEPHYR_WG_N128                                                                                          \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
  "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,"    \
  "%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, q, 1, 1, 0;\n}\n"

// One wgmma.mma_async of shape SHAPE, f16 or bf16 by kF16: REGS numbers the D, A and descriptor
// operands, PRED is the operand number of the scale-d flag after them, and the D outputs follow.
#define ZEPHYR_WG_MMA(PRED, SHAPE, REGS, ...)                                                                  \
  if constexpr (kF16)                                                                                          \
    asm volatile("{\n.reg .pred q;\nsetp.ne.b32 q, %" #PRED ", 0;\nwgmma.mma_async.sync.aligned." SHAPE       \
                 ".f32.f16.f16 " REGS                                                                          \
                 : __VA_ARGS__                                                                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)                               \
                 : "memory");                                                                                  \
  else                                                                                                         \
    asm volatile("{\n.reg .pred q;\nsetp.ne.b32 q, %" #PRED ", 0;\nwgmma.mma_async.sync.aligned." SHAPE       \
                 ".f32.bf16.bf16 " REGS                                                                        \
                 : __VA_ARGS__                                                                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1)                               \
                 : "memory")

// D += A * B for one warpgroup: D is 64 x 8*NX (fp32, this warp's rows
// 16*warp + [0, 16): acc[j][P][e] is element 4j + e of the warp's fragment,
// as an mma.m16n8k16 C fragment of 8-column tile j; P: which of the NP
// accumulators of the thread), A is 64 x 16 in registers (this warp's 16
// rows: an mma.m16n8k16 A fragment), B is 16 x 8*NX in shared memory,
// K-major, described by `desc`.
template <typename T, int NX, int NP, int P>
__device__ __forceinline__ void wgmma_rs(float (&acc)[NX][NP][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef ZEPHYR_DEVICE_WGMMA
  constexpr bool kF16 = std::is_same<T, __half>::value;
  if constexpr (NX == 16) {
    ZEPHYR_WG_MMA(69, "m64n128k16", ZEPHYR_WG_N128, ZEPHYR_WG_D4(0), ZEPHYR_WG_D4(1), ZEPHYR_WG_D4(2),
                  ZEPHYR_WG_D4(3), ZEPHYR_WG_D4(4), ZEPHYR_WG_D4(5), ZEPHYR_WG_D4(6), ZEPHYR_WG_D4(7),
                  ZEPHYR_WG_D4(8), ZEPHYR_WG_D4(9), ZEPHYR_WG_D4(10), ZEPHYR_WG_D4(11), ZEPHYR_WG_D4(12),
                  ZEPHYR_WG_D4(13), ZEPHYR_WG_D4(14), ZEPHYR_WG_D4(15));
  } else if constexpr (NX == 8) {
    ZEPHYR_WG_MMA(37, "m64n64k16", ZEPHYR_WG_N64, ZEPHYR_WG_D4(0), ZEPHYR_WG_D4(1), ZEPHYR_WG_D4(2),
                  ZEPHYR_WG_D4(3), ZEPHYR_WG_D4(4), ZEPHYR_WG_D4(5), ZEPHYR_WG_D4(6), ZEPHYR_WG_D4(7));
  } else {
    static_assert(NX == 4, "wgmma_rs: 32, 64 or 128 rows of x");
    ZEPHYR_WG_MMA(21, "m64n32k16", ZEPHYR_WG_N32, ZEPHYR_WG_D4(0), ZEPHYR_WG_D4(1), ZEPHYR_WG_D4(2),
                  ZEPHYR_WG_D4(3));
  }
#else
  __trap();
#endif
}
#undef ZEPHYR_WG_MMA
#undef ZEPHYR_WG_D4
#undef ZEPHYR_WG_N32
#undef ZEPHYR_WG_N64
#undef ZEPHYR_WG_N128

// A lane's scales (and zero points) of one chunk for the tiled kernels: the
// NT values of its column r0 in 8-column tiles t0 .. t0 + NT - 1 of column
// block nb (all 8 tiles, or the 4 of the WS kernel's column-split warps), for
// the group of its 32 chunk rows (cl). Groups are a shift for power-of-two
// group sizes (all the seed's), else a division. V: NT values of T.
__device__ __forceinline__ int first_set_bit(int v) { return __ffs(v); }

template <typename T, bool HAS_Z, int NT = 8>
struct ZkScales {
  static_assert(NT == 8 || NT == 4, "ZkScales: 4 or 8 tiles");
  using V = std::conditional_t<NT == 8, uint4, uint2>;
  const T* scales;
  const T* zeros;
  int Np, G, group_rows, group_shift, cl;
  bool group_pow2;
  int col;  // nb * kBlockN + r0 * 8 + t0

  __device__ __forceinline__ ZkScales(const T* s, const T* z, int np, int g, int rows, int nb, int lane, int t0 = 0)
      : scales(s), zeros(z), Np(np), G(g), group_rows(rows), group_shift(first_set_bit(rows) - 1), cl(lane & 3),
        group_pow2((rows & (rows - 1)) == 0), col(nb * kBlockN + (lane >> 2) * 8 + t0) {}

  __device__ __forceinline__ void load(V& sc, V& zc, int chunk) const {
    const int row = chunk * kChunkK + cl * 32;
    const int g = min(group_pow2 ? row >> group_shift : row / group_rows, G - 1);
    const size_t off = (size_t)g * Np + col;
    sc = __ldg(reinterpret_cast<const V*>(scales + off));
    if (HAS_Z) zc = __ldg(reinterpret_cast<const V*>(zeros + off));
  }
};

// Dequantization of zk steps for the tiled kernels. set() takes a chunk's
// scales and zero points for the lane's NT tiles (t: 8 columns each: all 8 of
// the warp's 64, or 4 of them); frag() turns a step's weight words w into mma
// A fragment p of those tiles: a[0], a[2] from tile 2p (b0, b1 halves), a[1],
// a[3] from tile 2p + 1. Words: 4 bits, w[p] holds fragment p; 8 bits, w[t]
// holds tile t.
template <typename T, int BITS, bool HAS_Z, int NT = 8>
struct ZkDequant {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  static constexpr bool kF16 = Tr::kMagicF == 1024.f;
  static constexpr int kDefaultZero = 1 << (BITS - 1);
  T2 sc2[NT], zlo2[NT], zhi2[NT];
  float sf[NT], zf[NT];

  template <typename V>
  __device__ __forceinline__ void set(const V& sv, const V& zv) {
    static_assert(sizeof(V) == NT * sizeof(T), "ZkDequant::set: NT scales");
    const T* sp = reinterpret_cast<const T*>(&sv);
    const T* zp = reinterpret_cast<const T*>(&zv);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float z = HAS_Z ? Tr::to_float(zp[t]) : float(kDefaultZero);
      if (BITS == 4 || kF16) {
        sc2[t] = Tr::bcast(sp[t]);
        zlo2[t] = Tr::bcast(Tr::from_float(Tr::kMagicF + z));
        zhi2[t] = Tr::bcast(Tr::from_float(-(Tr::kMagicF / 16.f + z)));
      } else {
        sf[t] = Tr::to_float(sp[t]);
        zf[t] = 8388608.f + z;  // 2^23 + z: byte q in the fp32 mantissa is 2^23 + q
      }
    }
  }

  __device__ __forceinline__ void frag(const uint32_t* w, int p, uint32_t (&a)[4]) const {
    const uint32_t kLo = 0x000f000fu, kHi = 0x00f000f0u, kMagic = Tr::kMagic;
    const T2 inv16 = Tr::bcast(Tr::from_float(1.f / 16.f));
#pragma unroll
    for (int ab = 0; ab < 2; ++ab) {
      const int t = 2 * p + ab;
      T2 lo, hi;
      if constexpr (BITS == 4) {
        const uint32_t wv = ab ? (w[p] >> 8) : w[p];
        lo = __hsub2(bit_cast_to<T2>(lop3_and_or(wv, kLo, kMagic)), zlo2[t]);
        if constexpr (kF16) {
          hi = __hfma2(bit_cast_to<T2>(lop3_and_or(wv, kHi, kMagic)), inv16, zhi2[t]);
        } else {
          hi = __hsub2(bit_cast_to<T2>(lop3_and_or(wv >> 4, kLo, kMagic)), zlo2[t]);
        }
        lo = __hmul2(lo, sc2[t]);
        hi = __hmul2(hi, sc2[t]);
      } else {
        // 8-bit: byte h*2 + e of word t is element (h, e).
        const uint32_t w8 = w[t];
        if constexpr (kF16) {  // byte q into the fp16 mantissa: 1024 + q, exact
          lo = __hmul2(__hsub2(bit_cast_to<T2>(__byte_perm(w8, 0x64646464u, 0x4140)), zlo2[t]), sc2[t]);
          hi = __hmul2(__hsub2(bit_cast_to<T2>(__byte_perm(w8, 0x64646464u, 0x4342)), zlo2[t]), sc2[t]);
        } else {
          const float q0 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7440)) - zf[t];
          const float q1 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7441)) - zf[t];
          const float q2 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7442)) - zf[t];
          const float q3 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7443)) - zf[t];
          lo = Tr::pack(q0 * sf[t], q1 * sf[t]);
          hi = Tr::pack(q2 * sf[t], q3 * sf[t]);
        }
      }
      a[ab] = bit_cast_to<uint32_t>(lo);
      a[2 + ab] = bit_cast_to<uint32_t>(hi);
    }
  }
};

// The tiled kernels' output, from the accumulators of one warpgroup (4 MMA
// warps): stored directly (S == 1), or summed over the K split. NAMED: the
// block has other threads (the WS kernel's producer warp, a second
// warpgroup), so the 128 synchronize on a named barrier instead of
// __syncthreads.
// Element (j, p, e) of a lane: tile row 8j + 2*cl + (e & 1), column
// 64*nb + 16*(p0 + p) + 8*(e >> 1) + r0 of the output (NX 8-row tiles, NP
// fragments of 16 columns: 4 from p0 = 0, or the WS column-split warps' 2).
// tid: the thread among the 128; tile / tiles: this warpgroup's output tile
// and their count (partial slots), lock: its split-K counter; bar: the named
// barrier of its 128 threads (NAMED).
template <typename T, int NX, int NP, bool NAMED>
__device__ __forceinline__ void tiled_epilogue(float (&acc)[NX][NP][4], float* __restrict__ partial,
                                               int* __restrict__ locks, T* __restrict__ out, int M, int N, int m0,
                                               int nb, int p0, bool active, int s, int S, int* is_last, int tid,
                                               size_t tile, size_t tiles, int lock, int bar) {
  using Tr = Traits<T>;
  const int lane = tid & 31;
  const int r0 = lane >> 2, cl = lane & 3;
  auto sync = [bar] {
    if constexpr (NAMED)
      asm volatile("bar.sync %0, 128;\n" ::"r"(bar) : "memory");
    else
      __syncthreads();
  };
  const int n0 = nb * kBlockN + 16 * p0 + r0;
  auto row_of = [&](int j, int e) { return m0 + 8 * j + 2 * cl + (e & 1); };
  auto col_of = [&](int p, int e) { return n0 + 16 * p + 8 * (e >> 1); };
  auto store = [&](int j, int p, int e, float v) {
    const int row = row_of(j, e), col = col_of(p, e);
    if (row < M && col < N) out[(size_t)row * N + col] = Tr::from_float(v);
  };
  if (S == 1) {
    if (!active) return;
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
      for (int p = 0; p < NP; ++p)
#pragma unroll
        for (int e = 0; e < 4; ++e) store(j, p, e, acc[j][p][e]);
    return;
  }
  // Split-K. Each block stores its accumulators as they lie in registers:
  // float4 v = (j, p) = acc[v / NP][v % NP][0..3] of every thread, thread-minor
  // (coalesced 16-byte stores), [S][tiles][NV][threads]. The last block of
  // the tile to arrive sums the S partials in order (deterministic: the same
  // order whichever block is last), loading Q float4 of up to 4 slices at
  // once (16-32 loads in flight per thread: the sum is latency-bound, not
  // bandwidth-bound), and writes the output.
  constexpr int NV = NX * NP;
  constexpr int Q = NV == 32 ? 8 : 4;  // fewer registers where the block has 3 per SM
  constexpr int kT = kTiledWarps * 32;
  float4* part4 = reinterpret_cast<float4*>(partial);
  auto slot = [&](int ss, int v) { return part4 + (((size_t)ss * tiles + tile) * NV + v) * kT + tid; };
#pragma unroll
  for (int j = 0; j < NX; ++j)
#pragma unroll
    for (int p = 0; p < NP; ++p)
      __stcg(slot(s, j * NP + p), make_float4(acc[j][p][0], acc[j][p][1], acc[j][p][2], acc[j][p][3]));
  __threadfence();  // this block's partial is visible before it counts itself in
  sync();
  if (tid == 0) *is_last = (atomicAdd(locks + lock, 1) == S - 1);
  sync();
  if (!*is_last) return;
  __threadfence();
#pragma unroll
  for (int v0 = 0; v0 < NV; v0 += Q) {
    float4 r[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) r[q] = __ldcg(slot(0, v0 + q));
    for (int ss = 1; ss < S; ss += 4) {
      float4 t[4][Q];
#pragma unroll
      for (int h = 0; h < 4; ++h)
#pragma unroll
        for (int q = 0; q < Q; ++q)
          if (ss + h < S) t[h][q] = __ldcg(slot(ss + h, v0 + q));
#pragma unroll
      for (int h = 0; h < 4; ++h)
#pragma unroll
        for (int q = 0; q < Q; ++q)
          if (ss + h < S) {
            r[q].x += t[h][q].x;
            r[q].y += t[h][q].y;
            r[q].z += t[h][q].z;
            r[q].w += t[h][q].w;
          }
    }
    if (active) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const int j = (v0 + q) / NP, p = (v0 + q) % NP;
        store(j, p, 0, r[q].x);
        store(j, p, 1, r[q].y);
        store(j, p, 2, r[q].z);
        store(j, p, 3, r[q].w);
      }
    }
  }
  if (tid == 0) locks[lock] = 0;  // ready for the next call (and graph replay)
}

// WG (sm_90a): the same block, weight stream and dequantization, but the 4
// warps (one warpgroup) multiply with wgmma: per 16-row step, 4 instructions
// m64 n(16*MT) k16, instruction p taking from each warp its A fragment p
// (16 of its 64 columns) and x from shared memory. x must then be in "zk
// order" (gather_pad_kernel<T, true>): each step's 16 k of the chunk as one contiguous
// run of 32 bytes, in the order of the mma k index (k = 2c + e and 8 + 2c + e
// are chunk rows 32c + 4i + e and 32c + 4i + 2 + e). It is stored per stage as
// core matrices [step i][half h][row r] of 16 bytes (no swizzle), so a step is
// the descriptor's 2 (K) x 2*MT (N) core matrices. The accumulators of
// instruction p are exactly the mma.sync kernel's acc[.][p][.], so the
// epilogue is shared.
template <typename T, int BITS, bool HAS_Z, int MT, bool WG>
__global__ void __launch_bounds__(kTiledWarps * 32, MT == 4 ? 2 : 3) gptq_gemm_tiled_kernel(
    const T* __restrict__ x,            // [M, Kp] (gathered/padded unless x itself qualifies)
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32
    const T* __restrict__ scales,       // [G, Np] shuffled
    const T* __restrict__ zeros,        // [G, Np] shuffled (read only if HAS_Z)
    float* __restrict__ partial,        // [S, M, Np] fp32, used when S > 1
    int* __restrict__ locks,            // [>= row tiles x column groups] when S > 1
    T* __restrict__ out,                // [M, N]
    int M, int N, int Kp, int Np, int G, int group_rows, int cpb, int S) {
  using Tr = Traits<T>;
  constexpr int VPS = BITS / 4;  // 16-byte weight vectors per lane per step
  constexpr int kRows = 16 * MT;
  constexpr int kTileUnits = kRows * kTiledUnits;
  constexpr int kStages = tiled_stages(WG);
  constexpr int kAhead = WG ? kStages - 2 : kStages - 1;  // chunks requested ahead of the one computed
  // mma.sync: [kStages][kRows][kTiledUnits] swizzled; WG: [kStages][8 steps][2][kRows] (core matrices).
  extern __shared__ uint4 xs[];
  __shared__ int is_last;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = lane >> 2, cl = lane & 3;
  const int m0 = blockIdx.x * kRows;
  const int nb = blockIdx.y * kTiledWarps + warp;
  const bool active = nb < Np / kBlockN;  // the last column group may be partial
  const int s = blockIdx.z;
  const int chunks = Kp / kChunkK, KS = Kp / 16;
  const int c_begin = s * cpb;
  const int c_count = max(0, min(cpb, chunks - c_begin));

  static_assert(kTileUnits % (kTiledWarps * 32) == 0, "every thread copies the same number of units");
  auto load_x = [&](int stage, int chunk) {
    uint4* dst = xs + stage * kTileUnits;
#pragma unroll
    for (int it = 0; it < kTileUnits / (kTiledWarps * 32); ++it) {
      const int i = threadIdx.x + it * kTiledWarps * 32;
      // WG: 8 consecutive threads fill one 128-byte core matrix (8 rows of unit u).
      const int r = WG ? (i >> 7) * 8 + (i & 7) : i / kTiledUnits;
      const int u = WG ? (i >> 3) & 15 : i % kTiledUnits;
      const int row = m0 + r;
      // Rows past M are zero-filled (src_bytes 0) from a valid address.
      const T* src = x + (size_t)min(row, M - 1) * Kp + chunk * kChunkK + u * 8;
      cp_async16(dst + (WG ? u * kRows + r : r * kTiledUnits + tiled_swizzle(r, u)), src, row < M ? 16 : 0);
    }
  };
  const uint4* wsrc = qweight + (size_t)(active ? nb : 0) * KS * VPS * 32 + lane;
  auto load_step = [&](uint4 (&w)[VPS], int chunk, int i) {
#pragma unroll
    for (int h = 0; h < VPS; ++h) w[h] = load_stream(wsrc + ((size_t)chunk * 8 + i) * VPS * 32 + h * 32);
  };
  const ZkScales<T, HAS_Z> zk_scales(scales, zeros, Np, G, group_rows, nb, lane);

  // Ring of the next D steps' weights (16-32 registers; fewer with 64-row tiles, whose
  // accumulators take 128): step i is taken from
  // slot i % D and step i + D requested into it.
  constexpr int D = (WG || MT == 1 ? 8 : 4) / VPS;
  const int swz = (r0 & 1) | (cl & 2);  // tiled_swizzle(r, 4*cl + j) = 4*cl + (j ^ swz) for rows of r0's parity
  uint4 wq[D][VPS];
  if constexpr (WG) {  // a warp past the last column block still joins every wgmma (with zeros)
#pragma unroll
    for (int i = 0; i < D; ++i)
#pragma unroll
      for (int h = 0; h < VPS; ++h) wq[i][h] = make_uint4(0, 0, 0, 0);
  }
  uint4 sv = make_uint4(0, 0, 0, 0), zv = make_uint4(0, 0, 0, 0);
  // Weights do not depend on x: request them before waiting for the gather.
  if (active && c_count > 0) {
#pragma unroll
    for (int i = 0; i < D; ++i) load_step(wq[i], c_begin, i);
    zk_scales.load(sv, zv, c_begin);
  }
  pdl_wait();
#pragma unroll
  for (int st = 0; st < kAhead; ++st) {
    if (st < c_count) load_x(st, c_begin + st);
    cp_async_commit();
  }

  // Swapped operands (as in the GEMV kernel): the dequantized weight is the
  // mma A operand (16 columns x 16 k: tiles 2p and 2p + 1) and 8 rows of x
  // the B operand, whose two registers are the 8 contiguous bytes a lane
  // reads for its row. acc[j][p][e]: x row 8j + 2*cl + (e & 1) of the tile,
  // column 16p + 8*(e >> 1) + r0 of the warp's 64.
  constexpr int NX = 2 * MT;  // 8-row x tiles per row tile
  float acc[NX][4][4];
#pragma unroll
  for (int j = 0; j < NX; ++j)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][p][e] = 0.f;
  if constexpr (WG) wgmma_fence_acc(acc);

  for (int c = 0; c < c_count; ++c) {
    cp_async_wait<kAhead - 1>();  // chunk c's stage has landed (this thread's copies)
    if constexpr (WG) fence_proxy_async_smem();  // ... and is visible to wgmma
    // ... everyone's; and the stage refilled next is free: chunk c - 1's
    // (mma.sync), or chunk c - 2's (WG: each warp waited for all but its
    // last wgmma group, which reads chunk c - 1).
    __syncthreads();
    if (c + kAhead < c_count) load_x((c + kAhead) % kStages, c_begin + c + kAhead);
    cp_async_commit();
    if (!WG && !active) continue;
    const bool more = c + 1 < c_count;
    uint4 sn = sv, zn = zv;
    if (more && active) zk_scales.load(sn, zn, c_begin + c + 1);

    ZkDequant<T, BITS, HAS_Z> dq;
    dq.set(sv, zv);
    // This lane's row r0 in this stage; the other 8-row tiles are immediate
    // offsets. Unit 4*cl + j sits at 4*cl + (j ^ swz) (tiled_swizzle).
    const uint4* xl = xs + (c % kStages) * kTileUnits + r0 * kTiledUnits + cl * 4;
    // Chunk c + 1's weights: step i is at an immediate offset from here.
    const uint4* wnext = wsrc + (size_t)(c_begin + c + 1) * 8 * VPS * 32;

#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint4 cur[VPS];
#pragma unroll
      for (int h = 0; h < VPS; ++h) cur[h] = wq[i % D][h];
      if ((i + D < 8 || more) && (!WG || active)) {  // step i + D of this chunk, or step i + D - 8 of the next
#pragma unroll
        for (int h = 0; h < VPS; ++h) wq[i % D][h] = load_stream(wnext + ((i + D - 8) * VPS + h) * 32);
      }
      // x: one 8-byte load per 8-row tile is its B fragment (b0, b1).
      uint2 xb[WG ? 1 : NX];
      if constexpr (!WG) {
        const uint2* xp = reinterpret_cast<const uint2*>(xl + ((i >> 1) ^ swz)) + (i & 1);
#pragma unroll
        for (int j = 0; j < NX; ++j) xb[j] = xp[j * 8 * kTiledUnits * 2];
      }
      uint32_t aw[4][4];  // WG: the step's 4 A fragments, all dequantized before the wgmma
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t(&a)[4] = aw[p];
        dq.frag(reinterpret_cast<const uint32_t*>(cur), p, a);
        if constexpr (!WG) {
#pragma unroll
          for (int j = 0; j < NX; ++j) Tr::mma(acc[j][p], a, xb[j].x, xb[j].y);
        }
      }
      if constexpr (WG) {
        // Step i of this stage: core matrices (i, h, 8-row group) at
        // ((i*2 + h)*kRows + 8*group)*16 bytes: K-direction offset kRows*16, N-direction 128.
        const uint64_t desc = wgmma_desc(xs + (c % kStages) * kTileUnits + i * 2 * kRows, kRows * 16, 128);
        wgmma_fence();  // the A registers were just written
        wgmma_rs<T, NX, 4, 0>(acc, aw[0], desc);
        wgmma_rs<T, NX, 4, 1>(acc, aw[1], desc);
        wgmma_rs<T, NX, 4, 2>(acc, aw[2], desc);
        wgmma_rs<T, NX, 4, 3>(acc, aw[3], desc);
        wgmma_commit();
        wgmma_wait<1>();  // the previous step's group is done: its A registers and stage reads
      }
    }
    sv = sn;
    zv = zn;
  }
  if constexpr (WG) {
    wgmma_wait<0>();
    wgmma_fence_acc(acc);
  }
  cp_async_wait<0>();  // no copy may outlive the block (the last groups are empty)

  tiled_epilogue<T, NX, 4, false>(acc, partial, locks, out, M, N, m0, nb, 0, active, s, S, &is_last, threadIdx.x,
                               (size_t)blockIdx.y * gridDim.x + blockIdx.x, (size_t)gridDim.x * gridDim.y,
                               blockIdx.x * gridDim.y + blockIdx.y, 0);
}

// ---- WS (sm_90a): the WG kernel, warp-specialized.
// Block = the 4 MMA warps (one warpgroup, the same column group, row tile and
// K range as above) + 1 producer warp. One lane of the producer moves each
// chunk into a ring of stages in shared memory with bulk copies (the TMA
// engine): the 4 column blocks' weights (4 or 8 KB each, contiguous in the zk
// layout) and the row tile's x, which gather_tiles_kernel laid out in global
// memory exactly as the stage holds it (core matrices [step][half][row]). A
// stage's "full" barrier completes when its bytes have landed; each MMA warp
// waits on it, reads its weights with one LDS.128 per step (two at 8 bits),
// dequantizes them into the 4 A fragments and issues the 4 wgmma as the WG
// kernel does, then arrives on the stage's "empty" barrier once its wgmma
// reading the stage have completed (one step into the next chunk), which
// lets the producer refill it.
// Why: the WG and mma.sync kernels stream the weights into registers, so each
// MMA warp waits for its own loads, and with 8 warps per SM the loop is bound
// by that latency (kernels/README.md). Here the copies run ahead by the whole
// ring and the MMA warps only compute.
// WGS = 2 (a 128-row tile): each weight byte serves twice the rows, and the
// L2 traffic per flop drops (ncu: at M = 1024 the 32-row WS kernel kept L2
// 78% busy at 97% hits while the tensor pipes idled). The two MMA warpgroups
// split the columns, not the rows: warpgroup g multiplies column blocks 2g
// and 2g + 1 by all 128 rows (two wgmma m64n128k16 per step), so every
// weight is dequantized once per block. The first version split the rows (64
// each, the 4 column blocks each) and so dequantized every weight twice; ncu
// had its main loop stalled on the dequantization and the half2 pipe.
// The same column split serves 64- and 32-row tiles (MT = 2 or 1 per warpgroup, WGS = 2: two wgmma
// m64n64k16 or m64n32k16 per step): at one warpgroup each of its warps dequantizes all 4 fragments of a
// step, one warp per scheduler, and the loop is bound by that warp's latency (ncu: ~0.3 instructions
// per cycle); two warpgroups halve each warp's share and interleave. Sweeps on the H100 (4-bit, the
// Mistral shapes, best split each): 64-row tiles -3..-14% at M = 48-1024 (gate_up M = 64 45.6 -> 41.6
// us), 32-row tiles -3..-11% at M = 16-32 (ab_H100_2026-11-28/ws_plan_sweep_2wg.log).
// Threads: the MMA warpgroups and one producer warp; with two warpgroups the producer is a whole
// warpgroup (3 of its warps idle), which lets the block move registers from it to the MMA warpgroups
// (setmaxnreg, warpgroup-wide): 40 for the producer, 232 for each MMA thread.
__host__ __device__ constexpr int ws_threads(int wgs) { return wgs == 1 ? (kTiledWarps + 1) * 32 : (wgs + 1) * 128; }
__host__ __device__ constexpr int ws_x_bytes(int mt) { return 16 * mt * kChunkK * 2; }
__host__ __device__ constexpr int ws_w_bytes(int bits) { return 8 * (bits / 4) * 512; }  // one column block's chunk
__host__ __device__ constexpr int ws_stage_bytes(int mt, int bits, int wgs) {
  return wgs * ws_x_bytes(mt) + kTiledWarps * ws_w_bytes(bits);
}
// Blocks per SM: 2 at 32-row tiles, else 1 (the 128 accumulators of a 64-row warpgroup leave no room
// for two blocks' registers). Stages: as many as fit, at most 6.
__host__ __device__ constexpr int ws_blocks(int mt, int wgs) { return mt == 4 || wgs > 1 ? 1 : 2; }
__host__ __device__ constexpr int ws_stages(int mt, int bits, int wgs) {
  return (220 * 1024 / ws_blocks(mt, wgs)) / ws_stage_bytes(mt, bits, wgs) < 6
             ? (220 * 1024 / ws_blocks(mt, wgs)) / ws_stage_bytes(mt, bits, wgs)
             : 6;
}
__host__ __device__ constexpr int ws_smem(int mt, int bits, int wgs) {
  return ws_stages(mt, bits, wgs) * ws_stage_bytes(mt, bits, wgs);
}

template <typename T, int BITS, bool HAS_Z, int MT, int WGS>
__global__ void __launch_bounds__(ws_threads(WGS), ws_blocks(MT, WGS)) gptq_gemm_ws_kernel(
    const T* __restrict__ xt,           // x tiles (gather_tiles_kernel, rows = 16*MT*WGS)
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32
    const T* __restrict__ scales,       // [G, Np] shuffled
    const T* __restrict__ zeros,        // [G, Np] shuffled (read only if HAS_Z)
    float* __restrict__ partial,        // split-K partials, used when S > 1
    int* __restrict__ locks,            // [>= row tiles x column groups x WGS] when S > 1
    T* __restrict__ out,                // [M, N]
    int M, int N, int Kp, int Np, int G, int group_rows, int cpb, int S) {
#ifdef ZEPHYR_DEVICE_WGMMA
  constexpr int VPS = BITS / 4;
  constexpr int kRows = 16 * MT;          // per warpgroup
  constexpr int kBlockRows = kRows * WGS;  // per block (the x tile)
  constexpr int kStages = ws_stages(MT, BITS, WGS);
  static_assert(kStages >= 2, "the ring needs two stages");
  constexpr int kXBytes = WGS * ws_x_bytes(MT), kWBytes = ws_w_bytes(BITS);
  constexpr int kStageBytes = ws_stage_bytes(MT, BITS, WGS);
  constexpr int kConsumers = kTiledWarps * WGS;  // MMA warps
  constexpr bool kColSplit = WGS > 1;            // two warpgroups: two column blocks each, all rows
  constexpr int NP = kColSplit ? 2 : 4;          // wgmma per step (A fragments a warp dequantizes)
  constexpr int NT = 2 * NP;                     // 8-column tiles of a lane's scales
  constexpr int NX = kColSplit ? 2 * MT * WGS : 2 * MT;  // 8-row x tiles of a wgmma
  // [kStages][x tile (kXBytes), 4 column blocks (kWBytes each)]. 128-byte aligned: with the default
  // 16 bytes the ring began right after the static barriers (80-112 bytes in), and ncu counted ~1.3
  // sectors per L2 request for the kernel's bulk copies instead of 4 (the tag lookups, not the bytes,
  // then bound the kernel at M >= 256).
  extern __shared__ __align__(128) uint4 ws_ring[];
  __shared__ uint64_t full[kStages], empty[kStages];
  __shared__ int is_last[WGS];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s = blockIdx.z;
  const int chunks = Kp / kChunkK, KS = Kp / 16;
  const int c_begin = s * cpb;
  const int c_count = max(0, min(cpb, chunks - c_begin));
  const int nb_first = blockIdx.y * kTiledWarps;
  const int nb_count = min(kTiledWarps, Np / kBlockN - nb_first);  // the last column group may be partial
  // Split along K without partials in global memory: the S blocks of the tile are one cluster (launched
  // so: grid.z = S = the cluster's size) and sum their accumulators through shared memory (below).
  const bool cluster_sum = S > 1 && partial == nullptr;
  uint8_t* ring = reinterpret_cast<uint8_t*>(ws_ring);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&full[st], 1);
      mbar_init(&empty[st], kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if constexpr (WGS > 1) {
    if (warp >= kConsumers)
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    else
      asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  }
  if (warp >= kConsumers) {  // the producer
    if (warp == kConsumers && lane == 0 && c_count > 0) {
      const uint8_t* wsrc = reinterpret_cast<const uint8_t*>(qweight);
      const T* xsrc = xt + (size_t)blockIdx.x * chunks * kBlockRows * kChunkK;
      auto load_w = [&](int c) {
        uint8_t* dst = ring + (c % kStages) * kStageBytes + kXBytes;
        uint64_t* bar = &full[c % kStages];
        mbar_arrive_expect(bar, nb_count * kWBytes + kXBytes);
        for (int w = 0; w < nb_count; ++w)
          bulk_copy(dst + w * kWBytes, wsrc + ((size_t)(nb_first + w) * KS + (size_t)(c_begin + c) * 8) * VPS * 512,
                    kWBytes, bar);
      };
      auto load_x = [&](int c) {
        bulk_copy(ring + (c % kStages) * kStageBytes, xsrc + (size_t)(c_begin + c) * kBlockRows * kChunkK, kXBytes,
                  &full[c % kStages]);
      };
      // Weights do not depend on the kernel before: request the first stages' before waiting for it.
      const int pre = min(kStages, c_count);
      for (int c = 0; c < pre; ++c) load_w(c);
      pdl_wait();
      for (int c = 0; c < pre; ++c) load_x(c);
      for (int c = pre; c < c_count; ++c) {
        mbar_wait(&empty[c % kStages], (c / kStages - 1) & 1);  // its previous chunk's wgmma are done
        load_w(c);
        load_x(c);
      }
    }
    __syncwarp();
    if (cluster_sum) {  // the producer threads take part in the MMA warps' two cluster barriers
      cluster_sync_all();
      cluster_sync_all();
    }
    return;
  }

  // Warpgroup (made visibly warp-uniform by the shuffle, so that ptxas keeps the wgmma descriptors,
  // which depend on it, in uniform registers instead of moving them there at every step) and warp in it.
  const int wg = __shfl_sync(0xffffffffu, warp / kTiledWarps, 0), wwarp = warp % kTiledWarps;
  // One warpgroup: warp w, column block w, all 4 fragments (wgmma p = fragment p of every warp).
  // Column split (WGS = 2): warpgroup g takes column blocks 2g and 2g + 1 for all the tile's rows;
  // warp w dequantizes fragments 2*(w%2) and 2*(w%2) + 1 of block 2g + w/2, the A rows of its two
  // wgmma m64n128k16.
  const int blk = kColSplit ? 2 * wg + (wwarp >> 1) : wwarp;  // column block in the group
  const int half = wwarp & 1;
  const int p0 = kColSplit ? 2 * half : 0;  // the warp's first fragment of its block
  const int row_off = kColSplit ? 0 : wg * kRows;  // the warpgroup's first row in the x tile
  const int m0 = blockIdx.x * kBlockRows + row_off;
  const int nb = nb_first + blk;
  const bool active = blk < nb_count;
  const ZkScales<T, HAS_Z, NT> zk_scales(scales, zeros, Np, G, group_rows, nb, lane, 2 * p0);
  using SV = typename ZkScales<T, HAS_Z, NT>::V;
  SV sv{}, zv{};
  if (active && c_count > 0) zk_scales.load(sv, zv, c_begin);

  float acc[NX][NP][4];
#pragma unroll
  for (int j = 0; j < NX; ++j)
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][p][e] = 0.f;
  wgmma_fence_acc(acc);

  // The weight words a lane dequantizes per step (ZkDequant::frag): its 16-byte vector(s) of the step,
  // or with the column split half of them (4 bits: words 2*half, 2*half + 1; 8 bits: vector half).
  constexpr int kWords = NP * VPS;
  auto load_words = [&](uint32_t(&wd)[kWords], const uint4* wl, int i) {
    if constexpr (!kColSplit) {
#pragma unroll
      for (int h = 0; h < VPS; ++h) {
        const uint4 v = wl[(i * VPS + h) * 32];
        wd[4 * h] = v.x, wd[4 * h + 1] = v.y, wd[4 * h + 2] = v.z, wd[4 * h + 3] = v.w;
      }
    } else if constexpr (BITS == 4) {
      const uint2 v = reinterpret_cast<const uint2*>(wl + i * 32)[half];
      wd[0] = v.x, wd[1] = v.y;
    } else {
      const uint4 v = wl[(i * 2 + half) * 32];
      wd[0] = v.x, wd[1] = v.y, wd[2] = v.z, wd[3] = v.w;
    }
  };

  for (int c = 0; c < c_count; ++c) {
    const int st = c % kStages;
    SV sn = sv, zn = zv;
    if (c + 1 < c_count && active) zk_scales.load(sn, zn, c_begin + c + 1);
    ZkDequant<T, BITS, HAS_Z, NT> dq;
    dq.set(sv, zv);
    // The stage's x: core matrices (unit, 8-row group) at (unit * kBlockRows + row) * 16 bytes; this
    // warpgroup's rows start at row wg * kRows (all rows with the column split); step i's descriptor is
    // the chunk's plus i * 2 * kBlockRows * 16 bytes (in its 16-byte address field).
    const uint64_t desc0 = wgmma_desc(reinterpret_cast<const uint4*>(ring + st * kStageBytes) + row_off,
                                      kBlockRows * 16, 128);
    // A warp past the last column block reads the slot's stale bytes: they reach only its own rows of
    // the wgmma (output columns that are never stored).
    const uint4* wl = reinterpret_cast<const uint4*>(ring + st * kStageBytes + kXBytes + blk * kWBytes) + lane;
    mbar_wait(&full[st], (c / kStages) & 1);
    // Step i + 1's weights are read before step i's wgmma are issued (the asm's memory clobbers would
    // otherwise keep the load behind them, and its latency in front of the dequantization).
    uint32_t next[kWords];
    load_words(next, wl, 0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint32_t cur[kWords];
#pragma unroll
      for (int h = 0; h < kWords; ++h) cur[h] = next[h];
      if (i + 1 < 8) load_words(next, wl, i + 1);
      uint32_t aw[NP][4];
#pragma unroll
      for (int p = 0; p < NP; ++p) dq.frag(cur, p, aw[p]);
      const uint64_t desc = desc0 + uint64_t((i * 2 * kBlockRows * 16) >> 4);
      wgmma_fence();
      wgmma_rs<T, NX, NP, 0>(acc, aw[0], desc);
      wgmma_rs<T, NX, NP, 1>(acc, aw[1], desc);
      if constexpr (NP == 4) {
        wgmma_rs<T, NX, NP, 2>(acc, aw[2], desc);
        wgmma_rs<T, NX, NP, 3>(acc, aw[3], desc);
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous step's group is done
      // ... so the previous chunk's stage is no longer read: hand it back.
      if (i == 0) mbar_arrive_if(&empty[(c + kStages - 1) % kStages], c > 0 && lane == 0);
    }
    sv = sn;
    zv = zn;
  }
  wgmma_wait<0>();
  wgmma_fence_acc(acc);
  if (cluster_sum) {
    // Split-K through the cluster: every block stores its accumulators in its own ring as they lie in
    // registers (float4 (wg, v = j * NP + p, thread of the warpgroup), thread-minor), then block r of the
    // S sums part r of the tile over the S blocks in order (deterministic) from their shared memory and
    // writes it. Its ring is free: every stage has been waited for, and both warpgroups are past their
    // last wgmma (the barrier over the MMA threads) before either overwrites it.
    constexpr int NV = NX * NP, kT = kTiledWarps * 32;
    static_assert(WGS * NV * kT * 16 <= kStages * kStageBytes, "WS: the block's accumulators must fit in its ring");
    float4* red = reinterpret_cast<float4*>(ring);
    asm volatile("bar.sync 3, %0;\n" ::"r"(kConsumers * 32) : "memory");
    const int tid = threadIdx.x - wg * kT;
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
      for (int p = 0; p < NP; ++p)
        red[(wg * NV + j * NP + p) * kT + tid] = make_float4(acc[j][p][0], acc[j][p][1], acc[j][p][2], acc[j][p][3]);
    cluster_sync_all();
    constexpr int kAll = WGS * NV * kT;  // float4 per block
    const int per = kAll / S;            // S is 2, 4 or 8 (the host's choice)
    const uint32_t base = smem_addr(red);
    const uint32_t rank = cluster_rank();
    using Tr = Traits<T>;
    for (int i = int(rank) * per + int(threadIdx.x); i < (int(rank) + 1) * per; i += kConsumers * 32) {
      float4 t[8];  // the S blocks' values, all loads in flight before the sum
#pragma unroll
      for (int ss = 0; ss < 8; ++ss)
        if (ss < S) t[ss] = ld_cluster_f4(cluster_map(base + uint32_t(i) * 16u, uint32_t(ss)));
      float4 v = t[0];
#pragma unroll
      for (int ss = 1; ss < 8; ++ss)
        if (ss < S) v.x += t[ss].x, v.y += t[ss].y, v.z += t[ss].z, v.w += t[ss].w;
      // Whose accumulators these are: warpgroup g, its thread th (warp th / 32, lane th % 32), element
      // vv = j * NP + p; row and column as tiled_epilogue's row_of / col_of place them (keep the two alike).
      const int g = i / (NV * kT), vv = (i / kT) % NV, th = i % kT;
      const int w4 = th >> 5, ln = th & 31;
      const int b = kColSplit ? 2 * g + (w4 >> 1) : w4;
      const int q0 = kColSplit ? 2 * (w4 & 1) : 0;
      const int row = blockIdx.x * kBlockRows + (kColSplit ? 0 : g * kRows) + 8 * (vv / NP) + 2 * (ln & 3);
      const int col = (nb_first + b) * kBlockN + 16 * (q0 + vv % NP) + (ln >> 2);
      const float e4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row + (e & 1), cc = col + 8 * (e >> 1);
        if (r < M && cc < N) out[(size_t)r * N + cc] = Tr::from_float(e4[e]);
      }
    }
    cluster_sync_all();  // no block leaves while another still reads its shared memory
    return;
  }
  // Output tile (rows, column group; one per warpgroup): warpgroup wg of block (x, y).
  const size_t tiles = (size_t)gridDim.x * gridDim.y * WGS;
  const size_t tile = ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * WGS + wg;
  const int lock = (blockIdx.x * gridDim.y + blockIdx.y) * WGS + wg;
  tiled_epilogue<T, NX, NP, true>(acc, partial, locks, out, M, N, m0, nb, p0, active, s, S, &is_last[wg],
                                  threadIdx.x - wg * kTiledWarps * 32, tile, tiles, lock, 1 + wg);
#else
  __trap();
#endif
}

struct TiledArgs {
  const void* x;  // [M, Kp] (zk order for the WG variant; x tiles for WS, gather_tiles_kernel)
  const void* qweight;
  const void* scales;
  const void* zeros;  // null: every zero point is 2^(bits-1)
  float* partial;     // null when S == 1
  int* locks;
  void* out;
  int M, N, Kp, Np, G, group_rows, cpb, S, mt;  // mt: m16 tiles per row tile (1, 2, 4; WG: 2, 4; WS: 2, 4, 8)
  int wgs;                                      // WS: MMA warpgroups per block (1; 2 at mt 2, 4 and 8), else 1
  int variant;                                  // kTiledMma, kTiledWg or kTiledWs (sm_90a builds on sm_90 only)
  bool pdl;
  bool cluster;  // WS with S = 2, 4 or 8 and no partials: the S blocks of a tile are one cluster
  cudaStream_t stream;
};

template <typename T>
using TiledKernel = void (*)(const T*, const uint4*, const T*, const T*, float*, int*, T*, int, int, int, int, int,
                             int, int, int);

// The tiled kernel's variants (TiledArgs::variant).
constexpr int kTiledMma = 0;  // mma.sync
constexpr int kTiledWg = 1;   // wgmma (sm_90a)
constexpr int kTiledWs = 2;   // wgmma, warp-specialized (sm_90a)

template <typename T, int BITS, bool WG>
TiledKernel<T> tiled_kernel_for_wg(int mt, bool has_z) {
  switch (mt) {
    case 1:
      if constexpr (!WG)
        return has_z ? gptq_gemm_tiled_kernel<T, BITS, true, 1, false> : gptq_gemm_tiled_kernel<T, BITS, false, 1, false>;
      return nullptr;  // wgmma needs 32 or 64 rows
    case 2: return has_z ? gptq_gemm_tiled_kernel<T, BITS, true, 2, WG> : gptq_gemm_tiled_kernel<T, BITS, false, 2, WG>;
    default: return has_z ? gptq_gemm_tiled_kernel<T, BITS, true, 4, WG> : gptq_gemm_tiled_kernel<T, BITS, false, 4, WG>;
  }
}

// WS row tiles (16 x mt rows) and MMA warpgroups per block: one warpgroup at 32 and 64 rows, two
// (each half the columns, all the rows) at 128 rows, and optionally at 32 and 64 rows as well.
inline bool ws_config_exists(int mt, int wgs) {
  return (wgs == 1 && (mt == 2 || mt == 4)) || (wgs == 2 && (mt == 2 || mt == 4 || mt == 8));
}

template <typename T, int BITS>
TiledKernel<T> tiled_kernel_for(int mt, bool has_z, int variant, int wgs = 1) {
  if (variant == kTiledWs) {  // the kernel's MT is per warpgroup: 16 x mt / wgs rows each
    if (!ws_config_exists(mt, wgs)) return nullptr;
#define ZK_WS(MT, WGS) (has_z ? gptq_gemm_ws_kernel<T, BITS, true, MT, WGS> : gptq_gemm_ws_kernel<T, BITS, false, MT, WGS>)
    if (wgs == 1) return mt == 2 ? ZK_WS(2, 1) : ZK_WS(4, 1);
    return mt == 2 ? ZK_WS(1, 2) : (mt == 4 ? ZK_WS(2, 2) : ZK_WS(4, 2));
#undef ZK_WS
  }
  if (mt == 8 || wgs != 1) return nullptr;
  return variant == kTiledWg ? tiled_kernel_for_wg<T, BITS, true>(mt, has_z)
                             : tiled_kernel_for_wg<T, BITS, false>(mt, has_z);
}

// Threads and dynamic shared memory of a block of a variant (WS: wgs warpgroups of 16 x mt / wgs rows).
inline int tiled_threads(int variant, int wgs = 1) { return variant == kTiledWs ? ws_threads(wgs) : kTiledWarps * 32; }
template <int BITS>
int tiled_block_smem(int mt, int variant, int wgs = 1) {
  return variant == kTiledWs ? ws_smem(mt / wgs, BITS, wgs) : tiled_smem(mt, variant == kTiledWg);
}

// Opts the instantiation into its dynamic shared memory (once) and returns the
// resident blocks per SM (cached); 0 for a variant that does not exist (WG, WS: mt = 1; mt = 8 is WS only).
template <typename T, int BITS>
int gptq_tiled_occupancy(int mt, bool has_z, int variant, int wgs) {
  static int occ[4][2][3][2] = {};  // [MT 1/2/4/8][has_z][variant][wgs 1/2]
  if ((mt != 1 && mt != 2 && mt != 4 && mt != 8) || (wgs != 1 && wgs != 2)) return 0;
  int& v = occ[mt == 8 ? 3 : mt / 2][has_z][variant][wgs - 1];
  if (v == 0) {
    const TiledKernel<T> k = tiled_kernel_for<T, BITS>(mt, has_z, variant, wgs);
    if (k == nullptr) return 0;
    const int smem = tiled_block_smem<BITS>(mt, variant, wgs);
    int r = 0;
    if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, k, tiled_threads(variant, wgs), smem) != cudaSuccess)
      r = 1;
    v = r < 1 ? 1 : r;
  }
  return v;
}

// WS blocks resident at once when the S blocks of a tile form a cluster (S = 2, 4 or 8):
// resident_cluster_blocks, cached; 0 where the query fails. On the H100 a grid of 128 such blocks in
// clusters of 4 or 8 needed a second wave (ab_H100_2026-11-28/ws_cluster_sum.log).
template <typename T, int BITS>
int gptq_ws_cluster_slots(int mt, bool has_z, int S, int wgs) {
  static int slots[3][2][3][2] = {};  // [MT 2/4/8][has_z][S 2/4/8][wgs 1/2]; -1: failed
  if (!ws_config_exists(mt, wgs) || (S != 2 && S != 4 && S != 8)) return 0;
  int& v = slots[mt == 8 ? 2 : mt / 2 - 1][has_z][S == 8 ? 2 : S / 4][wgs - 1];
  if (v == 0) {
    const TiledKernel<T> k = tiled_kernel_for<T, BITS>(mt, has_z, kTiledWs, wgs);
    gptq_tiled_occupancy<T, BITS>(mt, has_z, kTiledWs, wgs);  // sets the shared-memory attribute
    v = resident_cluster_blocks(reinterpret_cast<const void*>(k), dim3(tiled_threads(kTiledWs, wgs)),
                                tiled_block_smem<BITS>(mt, kTiledWs, wgs), dim3(1, 1, unsigned(S)));
    if (v == 0) v = -1;
  }
  return v < 0 ? 0 : v;
}

// Explicitly instantiated once per (dtype, bits) in gptq_gemm_<dtype>_u<bits>.cu.
template <typename T, int BITS>
cudaError_t gptq_tiled_launch(const TiledArgs& a) {
  const int mt = a.mt;
  const TiledKernel<T> k = tiled_kernel_for<T, BITS>(mt, a.zeros != nullptr, a.variant, a.wgs);
  if (k == nullptr) return cudaErrorInvalidValue;
  gptq_tiled_occupancy<T, BITS>(mt, a.zeros != nullptr, a.variant, a.wgs);  // sets the shared-memory attribute
  const dim3 grid((a.M + 16 * mt - 1) / (16 * mt), (a.Np / kBlockN + kTiledWarps - 1) / kTiledWarps, a.S);
  return launch_kernel_clusters(k, grid, dim3(tiled_threads(a.variant, a.wgs)),
                                tiled_block_smem<BITS>(mt, a.variant, a.wgs), a.stream, a.pdl,
                                dim3(1, 1, a.cluster ? unsigned(a.S) : 1u), static_cast<const T*>(a.x),
                                static_cast<const uint4*>(a.qweight), static_cast<const T*>(a.scales),
                                static_cast<const T*>(a.zeros), a.partial, a.locks, static_cast<T*>(a.out), a.M, a.N,
                                a.Kp, a.Np, a.G, a.group_rows, a.cpb, a.S);
}

extern template int gptq_ws_cluster_slots<__half, 4>(int, bool, int, int);
extern template int gptq_ws_cluster_slots<__half, 8>(int, bool, int, int);
extern template int gptq_ws_cluster_slots<__nv_bfloat16, 4>(int, bool, int, int);
extern template int gptq_ws_cluster_slots<__nv_bfloat16, 8>(int, bool, int, int);
extern template int gptq_tiled_occupancy<__half, 4>(int, bool, int, int);
extern template int gptq_tiled_occupancy<__half, 8>(int, bool, int, int);
extern template int gptq_tiled_occupancy<__nv_bfloat16, 4>(int, bool, int, int);
extern template int gptq_tiled_occupancy<__nv_bfloat16, 8>(int, bool, int, int);
extern template cudaError_t gptq_tiled_launch<__half, 4>(const TiledArgs&);
extern template cudaError_t gptq_tiled_launch<__half, 8>(const TiledArgs&);
extern template cudaError_t gptq_tiled_launch<__nv_bfloat16, 4>(const TiledArgs&);
extern template cudaError_t gptq_tiled_launch<__nv_bfloat16, 8>(const TiledArgs&);

}  // namespace zephyr
