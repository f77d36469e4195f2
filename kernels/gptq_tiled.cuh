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
//   group); the last block sums the S partials in order (deterministic).
// A lane's x for step i is row r, columns 32*(l%4) + 4i + {0..3} of the chunk
// (see the layout notes): 8 bytes in 16-byte unit 4*(l%4) + i/2. Units are
// stored swizzled (tiled_swizzle) so that the 8 lanes of a quarter-warp hit 8
// different bank groups with 16-byte accesses.
//
// Where it stands (H100, benchmarks/kernels.py): faster than the fused
// small-M kernel from M = 33 and than dequantize + cuBLAS up to M ~ 128 (the
// backend's FUSED_MAX_M), but below cuBLAS fp16 from M = 64 on the small
// layers: mma.sync at ~50% issue utilisation (ncu) does not reach what the
// weight stream allows; wgmma is the next step.
#pragma once

#include "gptq_kernels.cuh"

namespace zephyr {

constexpr int kTiledWarps = 4;                        // warps per block, one 64-column block each
constexpr int kTiledUnits = kChunkK * 2 / 16;         // 16-byte units per x row of a chunk

// m16 tiles per row tile for M rows: 1, 2 or 4.
__host__ __device__ constexpr int tiled_mt(int m) { return m <= 16 ? 1 : (m <= 32 ? 2 : 4); }
constexpr int kTiledStages = 4;                       // x chunks in flight
// Dynamic shared memory of one block, bytes: kTiledStages chunks of 16*MT rows of x.
__host__ __device__ constexpr int tiled_smem(int mt) { return kTiledStages * 16 * mt * kTiledUnits * 16; }

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

// (a & b) | c in one LOP3 (the compiler splits it in two when b and c are both immediates).
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T, int BITS, bool HAS_Z, int MT>
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
  using T2 = typename Tr::T2;
  constexpr int VPS = BITS / 4;  // 16-byte weight vectors per lane per step
  constexpr int kRows = 16 * MT;
  constexpr int kTileUnits = kRows * kTiledUnits;
  constexpr int kDefaultZero = 1 << (BITS - 1);
  constexpr int kStages = kTiledStages;
  extern __shared__ uint4 xs[];  // [kStages][kRows][kTiledUnits], swizzled
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

  auto load_x = [&](int stage, int chunk) {
    uint4* dst = xs + stage * kTileUnits;
#pragma unroll
    for (int i = threadIdx.x; i < kTileUnits; i += kTiledWarps * 32) {
      const int r = i / kTiledUnits, u = i % kTiledUnits;
      const int row = m0 + r;
      // Rows past M are zero-filled (src_bytes 0) from a valid address.
      const T* src = x + (size_t)min(row, M - 1) * Kp + chunk * kChunkK + u * 8;
      cp_async16(dst + r * kTiledUnits + tiled_swizzle(r, u), src, row < M ? 16 : 0);
    }
  };
  const uint4* wsrc = qweight + (size_t)(active ? nb : 0) * KS * VPS * 32 + lane;
  auto load_step = [&](uint4 (&w)[VPS], int chunk, int i) {
#pragma unroll
    for (int h = 0; h < VPS; ++h) w[h] = load_stream(wsrc + ((size_t)chunk * 8 + i) * VPS * 32 + h * 32);
  };
  auto load_sz = [&](uint4& sc, uint4& zc, int chunk) {
    const int g = min((chunk * kChunkK + cl * 32) / group_rows, G - 1);
    const size_t off = (size_t)g * Np + nb * kBlockN + r0 * 8;
    sc = __ldg(reinterpret_cast<const uint4*>(scales + off));
    if (HAS_Z) zc = __ldg(reinterpret_cast<const uint4*>(zeros + off));
  };

  // Ring of the next D steps' weights (16-32 registers; fewer with 64-row tiles, whose
  // accumulators take 128): step i is taken from
  // slot i % D and step i + D requested into it.
  constexpr int D = (MT >= 2 ? 4 : 8) / VPS;
  const int swz = (r0 & 1) | (cl & 2);  // tiled_swizzle(r, 4*cl + j) = 4*cl + (j ^ swz) for rows of r0's parity
  uint4 wq[D][VPS];
  uint4 sv = make_uint4(0, 0, 0, 0), zv = make_uint4(0, 0, 0, 0);
  // Weights do not depend on x: request them before waiting for the gather.
  if (active && c_count > 0) {
#pragma unroll
    for (int i = 0; i < D; ++i) load_step(wq[i], c_begin, i);
    load_sz(sv, zv, c_begin);
  }
  pdl_wait();
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < c_count) load_x(st, c_begin + st);
    cp_async_commit();
  }

  // Swapped operands (as in the GEMV kernel): the dequantized weight is the
  // mma A operand (16 columns x 16 k: tiles 2p and 2p + 1) and 8 rows of x
  // the B operand, whose two registers are the 8 contiguous bytes a lane
  // reads for its row. acc[j][p][e]: x row 8j + 2*cl + (e & 1) of the tile,
  // column 16p + 8*(e >> 1) + r0 of the warp's 64.
  constexpr int NX = 2 * MT;  // 8-row x tiles per row tile
  constexpr bool kF16 = Tr::kMagicF == 1024.f;
  float acc[NX][4][4];
#pragma unroll
  for (int j = 0; j < NX; ++j)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][p][e] = 0.f;
  const uint32_t kLo = 0x000f000fu, kHi = 0x00f000f0u, kMagic = Tr::kMagic;

  for (int c = 0; c < c_count; ++c) {
    cp_async_wait<kStages - 2>();  // chunk c's stage has landed (this thread's copies)
    __syncthreads();               // ... everyone's, and chunk c - 1's stage is free again
    if (c + kStages - 1 < c_count) load_x((c + kStages - 1) % kStages, c_begin + c + kStages - 1);
    cp_async_commit();
    if (!active) continue;
    const bool more = c + 1 < c_count;
    uint4 sn = sv, zn = zv;
    if (more) load_sz(sn, zn, c_begin + c + 1);

    const T* sp = reinterpret_cast<const T*>(&sv);
    const T* zp = reinterpret_cast<const T*>(&zv);
    T2 sc2[8], zlo2[8], zhi2[8];
    float sf[8], zf[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
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
    const T2 inv16 = Tr::bcast(Tr::from_float(1.f / 16.f));
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
      if (i + D < 8 || more) {  // step i + D of this chunk, or step i + D - 8 of the next
#pragma unroll
        for (int h = 0; h < VPS; ++h) wq[i % D][h] = load_stream(wnext + ((i + D - 8) * VPS + h) * 32);
      }
      // x: one 8-byte load per 8-row tile is its B fragment (b0, b1).
      uint2 xb[NX];
      const uint2* xp = reinterpret_cast<const uint2*>(xl + ((i >> 1) ^ swz)) + (i & 1);
#pragma unroll
      for (int j = 0; j < NX; ++j) xb[j] = xp[j * 8 * kTiledUnits * 2];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        // a[0], a[2]: tile 2p (b0, b1 halves); a[1], a[3]: tile 2p + 1.
        uint32_t a[4];
#pragma unroll
        for (int ab = 0; ab < 2; ++ab) {
          const int t = 2 * p + ab;
          T2 lo, hi;
          if constexpr (BITS == 4) {
            const uint32_t w4 = reinterpret_cast<const uint32_t*>(&cur[0])[p];
            const uint32_t wv = ab ? (w4 >> 8) : w4;
            lo = __hsub2(bit_cast_to<T2>(lop3_and_or(wv, kLo, kMagic)), zlo2[t]);
            if constexpr (kF16) {
              hi = __hfma2(bit_cast_to<T2>(lop3_and_or(wv, kHi, kMagic)), inv16, zhi2[t]);
            } else {
              hi = __hsub2(bit_cast_to<T2>(lop3_and_or(wv >> 4, kLo, kMagic)), zlo2[t]);
            }
            lo = __hmul2(lo, sc2[t]);
            hi = __hmul2(hi, sc2[t]);
          } else {
            // 8-bit: vector t/4 of the step, word t%4; byte h*2 + e is element (h, e).
            const uint32_t w8 = reinterpret_cast<const uint32_t*>(&cur[t / 4])[t % 4];
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
#pragma unroll
        for (int j = 0; j < NX; ++j) Tr::mma(acc[j][p], a, xb[j].x, xb[j].y);
      }
    }
    sv = sn;
    zv = zn;
  }
  cp_async_wait<0>();  // no copy may outlive the block (the last groups are empty)

  // Element (j, p, e) of this lane: tile row 8j + 2*cl + (e & 1), column n0 + 16p + 8*(e >> 1) + r0.
  const int n0 = nb * kBlockN + r0;
  auto row_of = [&](int j, int e) { return m0 + 8 * j + 2 * cl + (e & 1); };
  auto col_of = [&](int p, int e) { return n0 + 16 * p + 8 * (e >> 1); };
  if (S == 1) {
    if (!active) return;
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_of(j, e), col = col_of(p, e);
          if (row < M && col < N) out[(size_t)row * N + col] = Tr::from_float(acc[j][p][e]);
        }
    return;
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_of(j, e);
          if (row < M) __stcg(partial + ((size_t)s * M + row) * Np + col_of(p, e), acc[j][p][e]);
        }
  }
  __threadfence();  // this block's partial is visible before it counts itself in
  __syncthreads();
  const int lock = blockIdx.x * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) is_last = (atomicAdd(locks + lock, 1) == S - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The block's tile of out: rows [m0, m0 + 16*MT) x 256 columns, 4 columns
  // (one float4 of each partial) per thread and pass, the S partials summed in
  // order (deterministic), written as 4 outputs.
  const int c0 = blockIdx.y * kTiledWarps * kBlockN;
  const int rows = min(kRows, M - m0);
  const int width = min(kTiledWarps * kBlockN, Np - c0);
  for (int idx = threadIdx.x; idx < rows * (width / 4); idx += kTiledWarps * 32) {
    const int row = m0 + idx / (width / 4), col = c0 + (idx % (width / 4)) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int ss = 0; ss < S; ++ss) {
      const float4 q = __ldcg(reinterpret_cast<const float4*>(partial + ((size_t)ss * M + row) * Np + col));
      v.x += q.x;
      v.y += q.y;
      v.z += q.z;
      v.w += q.w;
    }
    T* o = out + (size_t)row * N + col;
    if ((N & 3) == 0 && col + 3 < N) {
      const typename Tr::T2 lo = Tr::pack(v.x, v.y), hi = Tr::pack(v.z, v.w);
      uint2 pk;
      pk.x = bit_cast_to<uint32_t>(lo);
      pk.y = bit_cast_to<uint32_t>(hi);
      *reinterpret_cast<uint2*>(o) = pk;
    } else {
      if (col < N) o[0] = Tr::from_float(v.x);
      if (col + 1 < N) o[1] = Tr::from_float(v.y);
      if (col + 2 < N) o[2] = Tr::from_float(v.z);
      if (col + 3 < N) o[3] = Tr::from_float(v.w);
    }
  }
  if (threadIdx.x == 0) locks[lock] = 0;  // ready for the next call (and graph replay)
}

struct TiledArgs {
  const void* x;  // [M, Kp]
  const void* qweight;
  const void* scales;
  const void* zeros;  // null: every zero point is 2^(bits-1)
  float* partial;     // null when S == 1
  int* locks;
  void* out;
  int M, N, Kp, Np, G, group_rows, cpb, S, mt;  // mt: m16 tiles per row tile (1, 2, 4)
  bool pdl;
  cudaStream_t stream;
};

template <typename T>
using TiledKernel = void (*)(const T*, const uint4*, const T*, const T*, float*, int*, T*, int, int, int, int, int,
                             int, int, int);

template <typename T, int BITS>
TiledKernel<T> tiled_kernel_for(int mt, bool has_z) {
  switch (mt) {
    case 1: return has_z ? gptq_gemm_tiled_kernel<T, BITS, true, 1> : gptq_gemm_tiled_kernel<T, BITS, false, 1>;
    case 2: return has_z ? gptq_gemm_tiled_kernel<T, BITS, true, 2> : gptq_gemm_tiled_kernel<T, BITS, false, 2>;
    default: return has_z ? gptq_gemm_tiled_kernel<T, BITS, true, 4> : gptq_gemm_tiled_kernel<T, BITS, false, 4>;
  }
}

// Opts the instantiation into its dynamic shared memory (once) and returns the
// resident blocks per SM (cached).
template <typename T, int BITS>
int gptq_tiled_occupancy(int mt, bool has_z) {
  static int occ[3][2] = {};  // [MT 1/2/4][has_z]
  int& v = occ[mt / 2][has_z];
  if (v == 0) {
    const TiledKernel<T> k = tiled_kernel_for<T, BITS>(mt, has_z);
    const int smem = tiled_smem(mt);
    int r = 0;
    if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r, k, kTiledWarps * 32, smem) != cudaSuccess)
      r = 1;
    v = r < 1 ? 1 : r;
  }
  return v;
}

// Explicitly instantiated once per (dtype, bits) in gptq_gemm_<dtype>_u<bits>.cu.
template <typename T, int BITS>
cudaError_t gptq_tiled_launch(const TiledArgs& a) {
  const int mt = a.mt;
  gptq_tiled_occupancy<T, BITS>(mt, a.zeros != nullptr);  // sets the shared-memory attribute
  const dim3 grid((a.M + 16 * mt - 1) / (16 * mt), (a.Np / kBlockN + kTiledWarps - 1) / kTiledWarps, a.S);
  return launch_kernel_smem(tiled_kernel_for<T, BITS>(mt, a.zeros != nullptr), grid, dim3(kTiledWarps * 32),
                            tiled_smem(mt), a.stream, a.pdl, static_cast<const T*>(a.x),
                            static_cast<const uint4*>(a.qweight), static_cast<const T*>(a.scales),
                            static_cast<const T*>(a.zeros), a.partial, a.locks, static_cast<T*>(a.out), a.M, a.N,
                            a.Kp, a.Np, a.G, a.group_rows, a.cpb, a.S);
}

extern template int gptq_tiled_occupancy<__half, 4>(int, bool);
extern template int gptq_tiled_occupancy<__half, 8>(int, bool);
extern template int gptq_tiled_occupancy<__nv_bfloat16, 4>(int, bool);
extern template int gptq_tiled_occupancy<__nv_bfloat16, 8>(int, bool);
extern template cudaError_t gptq_tiled_launch<__half, 4>(const TiledArgs&);
extern template cudaError_t gptq_tiled_launch<__half, 8>(const TiledArgs&);
extern template cudaError_t gptq_tiled_launch<__nv_bfloat16, 4>(const TiledArgs&);
extern template cudaError_t gptq_tiled_launch<__nv_bfloat16, 8>(const TiledArgs&);

}  // namespace zephyr
