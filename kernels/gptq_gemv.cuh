// GEMV-style GPTQ kernel for decode batches (M <= 32) on the zk layout (see the
// top of gptq_kernels.cuh), and its launcher. Pure CUDA, like gptq_kernels.cuh.
//
// NT = 1, 2 or 4 "x tiles" of 8 rows each (M <= 8, 16, 32): every dequantized
// weight fragment feeds NT mma, so the dequantization cost per weight is paid
// once for up to 32 rows of x and the weight stream stays the bottleneck.
//
// Differences from the fused small-M kernel (gptq_gemm_small_kernel):
// - "Swapped" mma: the dequantized weight is the A operand (16 output columns
//   x 16 k) and x^T is B (16 k x 8 rows of x), so one m16n8k16 covers 16
//   columns for all M <= 8 rows: 4 mma per 16x64 step instead of 8, and no
//   wasted half of A. The zk B fragments of tiles 2p and 2p+1 are exactly the
//   A fragment of mma p (rows g and g+8), and a lane's x A fragment (row g)
//   is exactly its B fragment: the layout is unchanged.
// - For groups of >= 128 rows (g128, g-1) the scale is applied once per unit
//   in fp32 to the unit's accumulators: the mma sees exact (q - z) integers
//   (fewer ALU ops per weight, and one fewer rounding). It needs a second set
//   of accumulators, so NT <= 2 only (the host uses it where it measured
//   faster: see gptq_gemv_repacked_cuda).
// - Each warp owns a contiguous K-slice of "units" (8 16-byte loads per lane,
//   4 KB per warp: one chunk at 4 bits, half a chunk at 8 bits) of one 64-column
//   block and double-buffers them in registers: the next unit's loads are in
//   flight while the current one is computed.
// - Block = W warps (4 or 8) on consecutive K-slices of one column block; the
//   split S over blocks and W come from a small planner (gptq_gemm.cu).
//   Warps are summed in shared memory in a fixed order, blocks through the
//   same deterministic partial + lock scheme as the fused kernel.
// - GX ("gather x in the kernel", M <= 8; see gemv_gx_max_m): x is read as the caller passed it
//   ([M, K], any alignment, act-order columns not yet gathered) instead of
//   as a gathered, padded copy written by gather_pad_kernel (or, in order, in place). Each warp gathers
//   the x columns of its own K-slice (x[:, perm[k]], zeros past K) into its
//   own region of shared memory once, after griddepcontrol.wait (the perm
//   entries are requested before it, like the first weight unit: they are
//   fixed), and its main loop reads x there. That saves a kernel and its
//   dependency link per act-order layer at decode batches (vLLM calls the op
//   with x in the checkpoint's column order), at the price of every column
//   block gathering its own copy: M x K scalar loads per column block, so
//   only small M pays off (the host's gemv_gx_max_m).
// - SWIGLU (M <= 16, zephyr::gptq_gemv_swiglu): for a fused gate/up layer (columns: gate, then up, N / 2
//   a multiple of 64), a block owns gate column block b and up column block b + N / 128, half of its
//   warps on each over the whole K range; the epilogue writes silu(gate) * up (out [M, N / 2], column
//   j at out_index[j] when given: the act-order row order of the down projection that reads it). One
//   kernel and one round trip of the [M, N] intermediate fewer per layer at decode batches.
#pragma once

#include <type_traits>

#include "gptq_kernels.cuh"
#include "timeline.cuh"  // TlProbe: empty unless built with ZEPHYR_KERNEL_TIMELINE=1

namespace zephyr {

constexpr int kGemvMaxM = 32;
constexpr int kGemvSwigluMaxM = 16;  // the SWIGLU epilogue: one or two x tiles
constexpr int kGemvMaxWarps = 16;

// x tiles of 8 rows for M rows.
__host__ __device__ constexpr int gemv_tiles(int m) { return m <= 8 ? 1 : (m <= 16 ? 2 : 4); }
// Most warps per block at NT x tiles: 16 at one tile (<= 128 registers a thread), else 8.
__host__ __device__ constexpr int gemv_max_warps(int nt) { return nt == 1 ? 16 : 8; }
// Rows of x up to which the GX variant (x gathered in the kernel) is instantiated: one x tile.
constexpr int kGemvGxMaxM = 8;
// 16-byte units (8 elements) of one 128-column chunk of an x row.
constexpr int kGemvXUnits = kChunkK / 8;
// Unit u (0..15) of a chunk of x row r lives at unit gemv_x_swizzle(r, u) in the GX region: the 8
// lanes of a quarter-warp (rows r, r + 1; c = 0..3: units 4c + q) then hit 8 different 16-byte bank
// groups (bit 3 of u into bit 1, bit 0 of r into bit 0), as in the tiled kernel's x stages.
__device__ __forceinline__ int gemv_x_swizzle(int r, int u) { return u ^ ((r & 1) | ((u >> 2) & 2)); }

// Warp slots of the shared-memory reduction buffer (slots x 8*NT x 64 floats, 32 KB): with
// more warps than slots (NT = 4, 8 warps) the upper half first adds into the lower half.
__host__ __device__ constexpr int gemv_red_slots(int nt) { return nt == 1 ? 16 : (nt == 2 ? 8 : 4); }

template <typename T, int BITS, bool HAS_Z, bool SCALE_AFTER, int NT, bool GX, bool SWIGLU>
__global__ void __launch_bounds__(gemv_max_warps(NT) * 32, 1) gptq_gemv_kernel(
    const T* __restrict__ x,            // [M, Kp] (gathered/padded unless x itself qualifies); GX: [M, K] as given
    const int* __restrict__ perm,       // GX: [K] act-order permutation (x column of zk row k), or null
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32, zk layout
    const T* __restrict__ scales,       // [G, Np] shuffled
    const T* __restrict__ zeros,        // [G, Np] shuffled (read only if HAS_Z)
    float* __restrict__ partial,        // [S, M, Np] fp32, used when S > 1
    int* __restrict__ locks,            // [Np/64]
    T* __restrict__ out,                // [M, N]; SWIGLU: [M, N / 2]
    const int64_t* __restrict__ out_index,  // SWIGLU: [N / 2] or null: output column j is written at out_index[j]
    int M, int N, int K, int Kp, int Np, int G, int group_rows, int upw, int S, int xs_chunks, int pair) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  static_assert(!GX || NT == 1, "the GX variant serves one x tile (M <= 8)");
  constexpr int VPS = BITS / 4;  // 16-byte vectors per lane per 16-row step
  constexpr int SPU = 8 / VPS;   // steps per unit
  constexpr int UPC = VPS;       // units per 128-row chunk
  constexpr bool kF16 = Tr::kMagicF == 1024.f;
  constexpr int kDefaultZero = 1 << (BITS - 1);
  static_assert(!SCALE_AFTER || NT <= 2, "scale-after keeps a second accumulator set: NT <= 2 only");
  static_assert(!SWIGLU || NT <= 2, "SWIGLU sums each half's warps in their own slots: NT <= 2 only");
  constexpr int kSlots = gemv_red_slots(NT);
  __shared__ float red[kSlots][8 * NT * kBlockN];
  __shared__ int is_last;

  const int s = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int W = blockDim.x >> 5;
  // SWIGLU: the block's first W / 2 warps compute column block blockIdx.x (gate), the others column
  // block blockIdx.x + pair (up: N / 2 columns on), each half over the whole K range as an unfused
  // launch of W / 2 warps would.
  const int HW = SWIGLU ? W / 2 : W;  // warps per column block
  const int half = SWIGLU && warp >= HW ? 1 : 0;
  const int wk = warp - half * HW;           // this warp's K-slice among its half's
  const int nb = blockIdx.x + half * pair;   // this warp's column block
  const int g = lane >> 2;  // output column g (+8) of each 16-column mma; x row g
  const int c = lane & 3;   // k slice [32c, 32c+32) of each chunk
  const int U = (Kp / kChunkK) * UPC;
  const int u_begin = min(U, (s * HW + wk) * upw);
  const int nu = min(U, u_begin + upw) - u_begin;
  const uint4* wbase = qweight + (size_t)nb * (Kp / 16) * VPS * 32 + lane;
  // x tile j covers rows 8j..8j+7; this lane feeds row 8j + g of it.
  bool has_row[NT];
  const T* xrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    has_row[j] = 8 * j + g < M;
    xrow[j] = x + (size_t)(has_row[j] ? 8 * j + g : 0) * Kp + c * 32;
  }
  // GX: this warp's region of dynamic shared memory holds rows [0, M) x chunks [ch0, ch0 + nch) of
  // gathered x (row stride xs_chunks chunks, units swizzled by gemv_x_swizzle).
  extern __shared__ uint4 gx_smem[];
  const int ch0 = u_begin / UPC;
  const int nch = nu > 0 ? (u_begin + nu - 1) / UPC - ch0 + 1 : 0;
  uint4* xs = gx_smem + (size_t)warp * M * xs_chunks * kGemvXUnits;

  float acc[NT][4][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][p][e] = 0.f;

  auto load_unit = [&](uint4 (&w)[8], int u) {
    const uint4* src = wbase + (size_t)u * 8 * 32;
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = load_stream(src + k * 32);
  };

  auto compute_unit = [&](const uint4 (&w)[8], int u) {
    const int chunk = u / UPC;
    const int step0 = (u % UPC) * SPU;
    const int grp = min((chunk * kChunkK + c * 32) / group_rows, G - 1);
    // (the column block from special registers again, not a register kept across the loop)
    const int cb = SWIGLU ? blockIdx.x + ((threadIdx.x >> 5) >= (blockDim.x >> 6) ? pair : 0) : blockIdx.x;
    const size_t off = (size_t)grp * Np + cb * kBlockN + g * 8;
    const uint4 sv = __ldg(reinterpret_cast<const uint4*>(scales + off));
    uint4 zv = make_uint4(0, 0, 0, 0);
    if (HAS_Z) zv = __ldg(reinterpret_cast<const uint4*>(zeros + off));
    const T* sp = reinterpret_cast<const T*>(&sv);
    const T* zp = reinterpret_cast<const T*>(&zv);
    // x^T B fragments of this unit, tile j: row 8j + g, k = chunk*128 + 32c + [4*step0, +4*SPU).
    // With NT > 1 they are loaded two steps at a time (registers), from L1/L2.
    auto load_x = [&](int j, int q) {
      if constexpr (GX) {
        const int r = 8 * j + g;
        return has_row[j] ? xs[(r * xs_chunks + chunk - ch0) * kGemvXUnits + gemv_x_swizzle(r, 4 * c + step0 / 2 + q)]
                          : make_uint4(0, 0, 0, 0);
      }
      return has_row[j] ? __ldg(reinterpret_cast<const uint4*>(xrow[j] + chunk * kChunkK) + step0 / 2 + q)
                        : make_uint4(0, 0, 0, 0);
    };
    uint4 xv[NT == 1 ? SPU / 2 : 1];
    if constexpr (NT == 1) {
#pragma unroll
      for (int q = 0; q < SPU / 2; ++q) xv[q] = load_x(0, q);
    }
    // Per-tile constants: tile t is block column t*8 + g.
    T2 zlo2[8], zhi2[8], sc2[8];
    float zf[8], sf[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const float z = HAS_Z ? Tr::to_float(zp[t]) : float(kDefaultZero);
      sc2[t] = Tr::bcast(sp[t]);
      sf[t] = Tr::to_float(sp[t]);
      if (BITS == 4) {
        // (magic + q) - (magic + z) and (magic + 16q)/16 - (magic/16 + z) are exact integers.
        zlo2[t] = Tr::bcast(Tr::from_float(Tr::kMagicF + z));
        zhi2[t] = Tr::bcast(Tr::from_float(-(Tr::kMagicF / 16.f + z)));
      } else if (kF16) {
        zlo2[t] = Tr::bcast(Tr::from_float(1024.f + z));  // byte q in the fp16 mantissa: 1024 + q
      } else {
        zf[t] = 8388608.f + z;  // 2^23 + z: byte q in the fp32 mantissa is 2^23 + q
      }
    }
    const T2 inv16 = Tr::bcast(Tr::from_float(1.f / 16.f));
    float cacc[SCALE_AFTER ? NT : 1][4][4];
    if constexpr (SCALE_AFTER) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int e = 0; e < 4; ++e) cacc[j][p][e] = 0.f;
    }

#pragma unroll
    for (int i = 0; i < SPU; ++i) {
      uint32_t b0[NT], b1[NT];
      if constexpr (NT == 1) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[i / 2]);
        b0[0] = xw[2 * (i % 2)];
        b1[0] = xw[2 * (i % 2) + 1];
      } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 v = load_x(j, i / 2);
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&v);
          b0[j] = xw[2 * (i % 2)];
          b1[j] = xw[2 * (i % 2) + 1];
        }
      }
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        // a[0], a[2]: tile 2p (b0, b1 halves); a[1], a[3]: tile 2p + 1.
        uint32_t a[4];
#pragma unroll
        for (int ab = 0; ab < 2; ++ab) {
          const int t = 2 * p + ab;
          T2 lo, hi;
          if constexpr (BITS == 4) {
            const uint32_t w4 = reinterpret_cast<const uint32_t*>(&w[i])[p];
            const uint32_t wv = ab ? (w4 >> 8) : w4;
            lo = __hsub2(bit_cast_to<T2>(lop3_and_or(wv, 0x000f000fu, Tr::kMagic)), zlo2[t]);
            if constexpr (kF16) {
              hi = __hfma2(bit_cast_to<T2>(lop3_and_or(wv, 0x00f000f0u, Tr::kMagic)), inv16, zhi2[t]);
            } else {
              hi = __hsub2(bit_cast_to<T2>(lop3_and_or(wv >> 4, 0x000f000fu, Tr::kMagic)), zlo2[t]);
            }
            if constexpr (!SCALE_AFTER) {
              lo = __hmul2(lo, sc2[t]);
              hi = __hmul2(hi, sc2[t]);
            }
          } else {
            // 8-bit: vector t/4 of the step, word t%4; byte h*2 + e is element (h, e).
            const uint32_t w8 = reinterpret_cast<const uint32_t*>(&w[i * 2 + t / 4])[t % 4];
            if constexpr (kF16) {
              lo = __hsub2(bit_cast_to<T2>(__byte_perm(w8, 0x64646464u, 0x4140)), zlo2[t]);
              hi = __hsub2(bit_cast_to<T2>(__byte_perm(w8, 0x64646464u, 0x4342)), zlo2[t]);
              if constexpr (!SCALE_AFTER) {
                lo = __hmul2(lo, sc2[t]);
                hi = __hmul2(hi, sc2[t]);
              }
            } else {
              float q0 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7440)) - zf[t];
              float q1 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7441)) - zf[t];
              float q2 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7442)) - zf[t];
              float q3 = __int_as_float(__byte_perm(w8, 0x4B000000u, 0x7443)) - zf[t];
              if constexpr (!SCALE_AFTER) {
                q0 *= sf[t];
                q1 *= sf[t];
                q2 *= sf[t];
                q3 *= sf[t];
              }
              lo = Tr::pack(q0, q1);  // |q - z| <= 255: exact in bf16 when unscaled
              hi = Tr::pack(q2, q3);
            }
          }
          a[ab] = bit_cast_to<uint32_t>(lo);
          a[2 + ab] = bit_cast_to<uint32_t>(hi);
        }
        if constexpr (SCALE_AFTER) {
#pragma unroll
          for (int j = 0; j < NT; ++j) Tr::mma(cacc[j][p], a, b0[j], b1[j]);
        } else {
#pragma unroll
          for (int j = 0; j < NT; ++j) Tr::mma(acc[j][p], a, b0[j], b1[j]);
        }
      }
    }
    if constexpr (SCALE_AFTER) {
      // acc[p][0..1]: column 16p + g (tile 2p); acc[p][2..3]: column 16p + 8 + g (tile 2p + 1).
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][p][e] = fmaf(sf[2 * p + (e >> 1)], cacc[j][p][e], acc[j][p][e]);
    }
  };

  // Double-buffered stream over this warp's units. Weights do not depend on
  // x: the first unit is requested before waiting for the kernel that wrote x
  // (launched as its programmatic dependent, this kernel may start while that
  // one runs; see pdl_chain in device_info.cuh). Nothing is written before the
  // wait. The next kernel may be scheduled as soon as every block has started.
  // Timeline stamps (diagnostic builds only): 1 after the wait, 2 main loop done, 3-4 around the lock.
  TlProbe probe(2 + 10 * S + 1000 * M + (SWIGLU ? 100000 : 0), N);
  pdl_launch_dependents();
  uint4 wa[8], wb[8];
  if (nu > 0) load_unit(wa, u_begin);
  if constexpr (GX) {
    // Unit t of this lane is unit lane + 32 t of the region's nch * 16 (8 x columns each, all rows).
    // Its 8 source columns: perm[k] for zk rows k < K, -1 (zero) for the padding past K.
    auto gx_cols = [&](int t, int (&col)[8]) {
      const int ui = lane + 32 * t;
      const int k0 = (ch0 + ui / kGemvXUnits) * kChunkK + (ui % kGemvXUnits) * 8;
      if (perm != nullptr && k0 + 8 <= K) {
        const int4 a = __ldg(reinterpret_cast<const int4*>(perm + k0));
        const int4 b = __ldg(reinterpret_cast<const int4*>(perm + k0) + 1);
        col[0] = a.x, col[1] = a.y, col[2] = a.z, col[3] = a.w, col[4] = b.x, col[5] = b.y, col[6] = b.z, col[7] = b.w;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) col[e] = k0 + e < K ? (perm != nullptr ? __ldg(perm + k0 + e) : k0 + e) : -1;
      }
    };
    auto gx_store = [&](int t, const int (&col)[8]) {
      const int ui = lane + 32 * t;
      if (ui >= nch * kGemvXUnits) return;
      const int cl = ui / kGemvXUnits, uc = ui % kGemvXUnits;
      for (int r = 0; r < M; ++r) {
        const T* xr = x + (size_t)r * K;
        uint4 pack;
        if (perm == nullptr && col[7] >= 0 && reinterpret_cast<uintptr_t>(xr + col[0]) % 16 == 0) {
          pack = __ldg(reinterpret_cast<const uint4*>(xr + col[0]));  // in order: 8 contiguous columns
        } else {
          T* v = reinterpret_cast<T*>(&pack);
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = col[e] >= 0 ? xr[col[e]] : Tr::from_float(0.f);
        }
        xs[(r * xs_chunks + cl) * kGemvXUnits + gemv_x_swizzle(r, uc)] = pack;
      }
    };
    // The first two units' columns are requested before the wait (the permutation is fixed data).
    constexpr int kPre = 2;
    int col[kPre][8];
#pragma unroll
    for (int t = 0; t < kPre; ++t)
      if (lane + 32 * t < nch * kGemvXUnits) gx_cols(t, col[t]);
    pdl_wait();
#pragma unroll
    for (int t = 0; t < kPre; ++t) gx_store(t, col[t]);
    for (int t = kPre; 32 * t < nch * kGemvXUnits; ++t) {
      int cn[8];
      gx_cols(t, cn);
      gx_store(t, cn);
    }
    __syncwarp();
  } else {
    // In a branch of its own: with the wait right after the loads, ptxas moved the first unit's loads
    // below it (sm_90a SASS: LDG after ACQBULK), where they waited for the kernel that writes x. M is
    // never 0 here. test_gemv_weight_loads_stay_above_the_wait (tests/test_cuda_backend_cpu.py) checks it.
    if (M > 0) pdl_wait();
  }
  probe.mark(1);
  for (int it = 0; it < nu; it += 2) {
    if (it + 1 < nu) load_unit(wb, u_begin + it + 1);
    compute_unit(wa, u_begin + it);
    if (it + 1 >= nu) break;
    if (it + 2 < nu) load_unit(wa, u_begin + it + 2);
    compute_unit(wb, u_begin + it + 1);
  }

  probe.mark(2);
  // ---- sum the W warps in a fixed order through shared memory.
  // C fragment: acc[j][p][e] is row m = 8j + 2c + (e & 1) of x, column 16p + 8*(e >> 1) + g.
  auto red_at = [&](int j, int p, int e) { return (8 * j + 2 * c + (e & 1)) * kBlockN + 16 * p + 8 * (e >> 1) + g; };
  auto store_acc = [&](int slot) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[slot][red_at(j, p, e)] = acc[j][p][e];
  };
  int Wr = W;  // warps left to sum in shared memory
  // Warp w + kSlots adds into warp w first (NT = 4 with 8 warps).
  if (kSlots < gemv_max_warps(NT) && W > kSlots) {
    if (warp >= kSlots) store_acc(warp - kSlots);
    __syncthreads();
    if (warp < W - kSlots) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][p][e] += red[warp][red_at(j, p, e)];
    }
    __syncthreads();
    Wr = kSlots;
  }
  if (warp < Wr) store_acc(warp);
  __syncthreads();

  const int blk = blockIdx.x;
  const int n0 = blk * kBlockN;
  // Split along K (S > 1), once this block's partials are stored: whether it is the last of the S blocks
  // of its column block to arrive (it then sums them in order and resets the lock; the others return).
  auto last_to_arrive = [&]() {
    probe.mark(3);
    __threadfence();  // this block's partials are visible before it counts itself in
    __syncthreads();
    if (threadIdx.x == 0) is_last = (atomicAdd(locks + blk, 1) == S - 1);
    __syncthreads();
    probe.mark(4);
    if (!is_last) return false;
    __threadfence();
    return true;
  };
  if constexpr (SWIGLU) {
    // Output column n0 + j of row m: silu(gate) * up, gate and up rounded to T first (what the
    // unfused GEMV writes), the rest in fp32 and rounded once.
    const int F = pair * kBlockN, nu0 = n0 + F;
    auto emit = [&](int i, float gate, float up) {
      const int m = i / kBlockN, col = n0 + i % kBlockN;
      const float gq = Tr::to_float(Tr::from_float(gate)), uq = Tr::to_float(Tr::from_float(up));
      out[(size_t)m * F + (out_index ? int(out_index[col]) : col)] = Tr::from_float(gq / (1.f + expf(-gq)) * uq);
    };
    auto halves = [&](int i, float& gate, float& up) {
      gate = 0.f, up = 0.f;
      for (int w = 0; w < HW; ++w) gate += red[w][i];
      for (int w = HW; w < W; ++w) up += red[w][i];
    };
    if (S == 1) {
      for (int i = threadIdx.x; i < M * kBlockN; i += blockDim.x) {
        float gate, up;
        halves(i, gate, up);
        emit(i, gate, up);
      }
      return;
    }
    for (int i = threadIdx.x; i < M * kBlockN; i += blockDim.x) {
      float gate, up;
      halves(i, gate, up);
      const int m = i / kBlockN, j = i % kBlockN;
      __stcg(partial + ((size_t)s * M + m) * Np + n0 + j, gate);
      __stcg(partial + ((size_t)s * M + m) * Np + nu0 + j, up);
    }
    if (!last_to_arrive()) return;
    for (int i = threadIdx.x; i < M * kBlockN; i += blockDim.x) {
      const int m = i / kBlockN, j = i % kBlockN;
      float gate = 0.f, up = 0.f;
      for (int ss = 0; ss < S; ++ss) {
        gate += __ldcg(partial + ((size_t)ss * M + m) * Np + n0 + j);
        up += __ldcg(partial + ((size_t)ss * M + m) * Np + nu0 + j);
      }
      emit(i, gate, up);
    }
    if (threadIdx.x == 0) locks[blk] = 0;
    return;
  }
  if (S == 1) {
    for (int i = threadIdx.x; i < M * kBlockN; i += blockDim.x) {
      float v = 0.f;
      for (int w = 0; w < Wr; ++w) v += red[w][i];
      const int m = i / kBlockN, j = i % kBlockN;
      if (n0 + j < N) out[(size_t)m * N + n0 + j] = Tr::from_float(v);
    }
    return;
  }
  for (int i = threadIdx.x; i < M * kBlockN; i += blockDim.x) {
    float v = 0.f;
    for (int w = 0; w < Wr; ++w) v += red[w][i];
    const int m = i / kBlockN, j = i % kBlockN;
    __stcg(partial + ((size_t)s * M + m) * Np + n0 + j, v);
  }
  if (!last_to_arrive()) return;
  for (int i = threadIdx.x; i < M * kBlockN; i += blockDim.x) {
    const int m = i / kBlockN, j = i % kBlockN;
    float v = 0.f;
    for (int ss = 0; ss < S; ++ss) v += __ldcg(partial + ((size_t)ss * M + m) * Np + n0 + j);
    if (n0 + j < N) out[(size_t)m * N + n0 + j] = Tr::from_float(v);
  }
  if (threadIdx.x == 0) locks[blk] = 0;  // ready for the next call (and graph replay)
}

struct GemvArgs {
  const void* x;      // [M, Kp]; GX: [M, K] as given
  const int* perm;    // GX: [K] or null (in order)
  const void* qweight;
  const void* scales;
  const void* zeros;  // null: every zero point is 2^(bits-1)
  float* partial;     // null when S == 1
  int* locks;
  void* out;
  const int64_t* out_index;  // SWIGLU: [N / 2] or null
  int M, N, K, Kp, Np, G, group_rows, upw, S, warps;
  bool scale_after;  // group_rows is a multiple of 128 (or one group)
  bool gx;           // gather x in the kernel (M <= kGemvGxMaxM)
  int xs_chunks;     // GX: chunks of x per warp region (gemv_gx_chunks)
  bool swiglu;       // out = silu(gate) * up of the two halves of N (M <= 16, N / 2 a multiple of 64)
  bool pdl;
  cudaStream_t stream;
};

template <typename T>
using GemvKernel = void (*)(const T*, const int*, const uint4*, const T*, const T*, float*, int*, T*, const int64_t*,
                            int, int, int, int, int, int, int, int, int, int, int);

// Chunks of 128 x columns a warp's region must hold: its `upw` units may straddle one more chunk
// than they fill when a chunk has two units (8-bit weights).
__host__ __device__ constexpr int gemv_gx_chunks(int upw, int bits) {
  return (upw + 2 * (bits / 4) - 2) / (bits / 4);
}

// Bytes of dynamic shared memory a GX block of `warps` warps takes for M rows: each warp's region of
// `xs_chunks` chunks of x (`elem` bytes per value). The launch and the host's GX decision both use it.
__host__ __device__ constexpr size_t gemv_gx_smem_bytes(int warps, int m, int xs_chunks, size_t elem) {
  return size_t(warps) * m * xs_chunks * kChunkK * elem;
}

// The kernel instantiation for M rows: NT from M; scale_after is honoured for
// M <= 16 only (one or two x tiles), larger M scale in the dequantization; gx for M <= 8 only;
// swiglu for M <= 16 only (null above).
template <typename T, int BITS>
GemvKernel<T> gemv_kernel_for(int m, bool has_z, bool scale_after, bool gx, bool swiglu = false) {
  auto pick = [&](auto nt_c, auto gx_c) -> GemvKernel<T> {
    constexpr int NT = decltype(nt_c)::value;
    constexpr bool GXV = decltype(gx_c)::value;
    if constexpr (NT == 4) {
      if (swiglu) return nullptr;
      return has_z ? gptq_gemv_kernel<T, BITS, true, false, 4, false, false>
                   : gptq_gemv_kernel<T, BITS, false, false, 4, false, false>;
    } else {
      auto with = [&](auto sw_c) -> GemvKernel<T> {
        constexpr bool SW = decltype(sw_c)::value;
        if (has_z)
          return scale_after ? gptq_gemv_kernel<T, BITS, true, true, NT, GXV, SW>
                             : gptq_gemv_kernel<T, BITS, true, false, NT, GXV, SW>;
        return scale_after ? gptq_gemv_kernel<T, BITS, false, true, NT, GXV, SW>
                           : gptq_gemv_kernel<T, BITS, false, false, NT, GXV, SW>;
      };
      return swiglu ? with(std::true_type{}) : with(std::false_type{});
    }
  };
  using F = std::false_type;
  using Tr = std::true_type;
  switch (gemv_tiles(m)) {
    case 4: return pick(std::integral_constant<int, 4>{}, F{});
    case 2: return pick(std::integral_constant<int, 2>{}, F{});
    default: return gx ? pick(std::integral_constant<int, 1>{}, Tr{}) : pick(std::integral_constant<int, 1>{}, F{});
  }
}

// Explicitly instantiated once per (dtype, bits) in gptq_gemm_<dtype>_u<bits>.cu.
template <typename T, int BITS>
cudaError_t gptq_gemv_launch(const GemvArgs& a) {
  tl_setup(a.stream);
  if (a.warps > gemv_max_warps(gemv_tiles(a.M)) || (a.gx && a.M > kGemvGxMaxM)) return cudaErrorInvalidValue;
  // SWIGLU: a block per pair of column blocks (gate, up), an even number of warps.
  if (a.swiglu && (a.M > 16 || a.warps % 2 || a.N % (2 * kBlockN) || a.Np != a.N)) return cudaErrorInvalidValue;
  const GemvKernel<T> k = gemv_kernel_for<T, BITS>(a.M, a.zeros != nullptr, a.scale_after, a.gx, a.swiglu);
  if (k == nullptr) return cudaErrorInvalidValue;
  const int pair = a.swiglu ? a.N / 2 / kBlockN : 0;
  const size_t smem = a.gx ? gemv_gx_smem_bytes(a.warps, a.M, a.xs_chunks, sizeof(T)) : 0;
  return launch_kernel_smem(k, dim3(a.swiglu ? pair : a.Np / kBlockN, a.S), dim3(a.warps * 32), smem, a.stream,
                            a.pdl, static_cast<const T*>(a.x), a.perm, static_cast<const uint4*>(a.qweight),
                            static_cast<const T*>(a.scales), static_cast<const T*>(a.zeros), a.partial, a.locks,
                            static_cast<T*>(a.out), a.out_index, a.M, a.N, a.K, a.Kp, a.Np, a.G, a.group_rows,
                            a.upw, a.S, a.xs_chunks, pair);
}

// Resident blocks per SM of `warps`-warp blocks of the kernel serving M rows (cached), without
// dynamic shared memory.
template <typename T, int BITS>
int gptq_gemv_occupancy(int m, int warps, bool has_z, bool scale_after, bool swiglu) {
  const int nt = gemv_tiles(m);
  if (warps < 1 || warps > gemv_max_warps(nt) || (swiglu && nt > 2)) return 1;
  static int occ[3][2][2][2][kGemvMaxWarps + 1] = {};  // [NT 1/2/4][has_z][scale_after][swiglu][warps]
  int& v = occ[nt / 2][has_z][scale_after][swiglu][warps];
  if (v == 0) {
    int r = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &r, gemv_kernel_for<T, BITS>(m, has_z, scale_after, false, swiglu), warps * 32, 0) != cudaSuccess)
      r = 1;
    v = r < 1 ? 1 : r;
  }
  return v;
}

// Bytes of dynamic shared memory the GX kernel for M rows may use per `warps`-warp block and keep
// as many blocks resident per SM as without it (cached per kernel and block size, for the current
// device: one kind of card per process is assumed, as for the other cached occupancies; 0 if none
// or on error). Also raises the kernel's dynamic shared memory limit (a function attribute, once).
template <typename T, int BITS>
int gptq_gemv_gx_smem_cap(int m, int warps, bool has_z, bool scale_after, bool swiglu) {
  if (m > kGemvGxMaxM || warps < 1 || warps > gemv_max_warps(1)) return 0;
  static int cap[2][2][2][kGemvMaxWarps + 1] = {};  // [has_z][scale_after][swiglu][warps], value + 1
  int& v = cap[has_z][scale_after][swiglu][warps];
  if (v == 0) {
    const GemvKernel<T> k = gemv_kernel_for<T, BITS>(m, has_z, scale_after, true, swiglu);
    // The kernel's dynamic shared memory limit is first raised to all a block may have (the
    // occupancy query honours the limit: at the default 48 KB less the 32 KB reduction buffer,
    // M = 2 at 16 warps would not fit), then the query says what keeps the blocks per SM.
    int device = 0, optin = 0, blocks = 0;
    cudaFuncAttributes fa{};
    size_t bytes = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
        cudaFuncGetAttributes(&fa, k) != cudaSuccess || optin <= int(fa.sharedSizeBytes) ||
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - int(fa.sharedSizeBytes)) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, warps * 32, 0) != cudaSuccess || blocks < 1 ||
        cudaOccupancyAvailableDynamicSMemPerBlock(&bytes, k, blocks, warps * 32) != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky error of a failed query; GX is then not used
      bytes = 0;
    }
    v = int(bytes) + 1;
  }
  return v - 1;
}

extern template int gptq_gemv_occupancy<__half, 4>(int, int, bool, bool, bool);
extern template int gptq_gemv_occupancy<__half, 8>(int, int, bool, bool, bool);
extern template int gptq_gemv_occupancy<__nv_bfloat16, 4>(int, int, bool, bool, bool);
extern template int gptq_gemv_occupancy<__nv_bfloat16, 8>(int, int, bool, bool, bool);
extern template int gptq_gemv_gx_smem_cap<__half, 4>(int, int, bool, bool, bool);
extern template int gptq_gemv_gx_smem_cap<__half, 8>(int, int, bool, bool, bool);
extern template int gptq_gemv_gx_smem_cap<__nv_bfloat16, 4>(int, int, bool, bool, bool);
extern template int gptq_gemv_gx_smem_cap<__nv_bfloat16, 8>(int, int, bool, bool, bool);
extern template cudaError_t gptq_gemv_launch<__half, 4>(const GemvArgs&);
extern template cudaError_t gptq_gemv_launch<__half, 8>(const GemvArgs&);
extern template cudaError_t gptq_gemv_launch<__nv_bfloat16, 4>(const GemvArgs&);
extern template cudaError_t gptq_gemv_launch<__nv_bfloat16, 8>(const GemvArgs&);

}  // namespace zephyr
