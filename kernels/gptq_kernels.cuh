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
//   ("steps"); one step is exactly what a warp feeds to eight
//   mma.m16n8k16 B operands (n-tiles t = 0..7 of 8 columns each).
//
//   qweight: int32 [Np/64, Kp/16, 32*bits]: for each 64-column block, its
//     steps in K order; inside a step, lane l of the warp reads bits/4
//     16-byte vectors (coalesced: the warp reads 512 contiguous bytes each).
//     Lane l holds column n = t*8 + l/4 and rows k0 = (l%4)*2 + {0,1,8,9},
//     i.e. its B fragments {b0 = (k0, k0+1), b1 = (k0+8, k0+9)} of each tile.
//   4-bit: word j of the lane covers tiles A = 2j and B = 2j+1; nibble i
//     (bits 4i..4i+3) holds (row, tile) = 0:(k0,A) 1:(k0+8,A) 2:(k0,B)
//     3:(k0+8,B) 4:(k0+1,A) 5:(k0+9,A) 6:(k0+1,B) 7:(k0+9,B).  So
//     (w & 0x000f000f) is b0 of A as two 16-bit lanes, (w & 0x00f000f0) is
//     b1 of A (times 16), and w >> 8 gives the same for B: two LOP3s per
//     fragment, no shifts per value.
//   8-bit: vector h (0/1) holds tiles 4h..4h+3, word j tile 4h+j; byte
//     b holds row 0:k0 1:k0+1 2:k0+8 3:k0+9.
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
#include <stdint.h>

namespace zephyr {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kChunkK = 128;  // K rows a warp handles per main-loop iteration (8 steps)
constexpr int kBlockN = 64;   // columns per block
constexpr int kMaxMTiles = 4;  // fused kernel serves M <= 64

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

// Weights are read exactly once: keep them out of L1 so x and scales stay.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ---------------------------------------------------------------------------
// Fused kernel. Grid: (Np/64, S). Block (nb, s) computes out[:, nb*64 : +64]
// over chunks [s*cpb, min((s+1)*cpb, chunks)) of K; warps take the block's
// chunks round-robin. x for the block's K range is gathered (act-order) into
// shared memory once. Warps are reduced through shared memory in a fixed
// order; when S > 1 every block stores an fp32 partial and the last block to
// arrive at locks[nb] sums the S partials in order (deterministic) and writes
// the output, then resets the lock to 0 for the next call.
//   MT: m16 tiles (M <= 16*MT); GPC: groups per 128-row chunk (128 / group).
// ---------------------------------------------------------------------------
template <typename T, int BITS, bool HAS_Z, int MT, int GPC>
__global__ void __launch_bounds__(kThreads) gptq_gemm_small_kernel(
    const T* __restrict__ x,          // [M, K]
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32
    const T* __restrict__ scales,     // [G, Np] shuffled
    const T* __restrict__ zeros,      // [G, Np] shuffled, or null if HAS_Z is false
    const int* __restrict__ perm,     // [K] or null
    float* __restrict__ partial,      // [S, M, Np] fp32, used when S > 1
    int* __restrict__ locks,          // [Np/64]
    T* __restrict__ out,              // [M, N]
    int M, int K, int N, int Kp, int Np, int G, int group_rows, int cpb, int S, bool vec_x) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);

  const int nb = blockIdx.x;
  const int s = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int chunks = Kp / kChunkK;
  const int c_begin = s * cpb;
  const int c_count = min(cpb, chunks - c_begin);
  const int kb0 = c_begin * kChunkK;
  const int KB = c_count * kChunkK;
  const int ld = KB + 8;  // +16 bytes per row: A-fragment loads hit 32 distinct banks

  // ---- stage x[:, kb0 : kb0+KB] (gathered through perm) into shared memory.
  if (vec_x) {  // no perm, K % 8 == 0, x 16-byte aligned
    const int kv = KB / 8;
    for (int m = 0; m < M; ++m) {
      for (int i = threadIdx.x; i < kv; i += kThreads) {
        const int k = kb0 + i * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (k < K) v = *reinterpret_cast<const uint4*>(x + (size_t)m * K + k);
        *reinterpret_cast<uint4*>(xs + m * ld + i * 8) = v;
      }
    }
  } else {
    for (int m = 0; m < M; ++m) {
      for (int i = threadIdx.x; i < KB; i += kThreads) {
        const int k = kb0 + i;
        T v = Tr::from_float(0.f);
        if (k < K) v = x[(size_t)m * K + (perm ? __ldg(perm + k) : k)];
        xs[m * ld + i] = v;
      }
    }
  }
  __syncthreads();

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][t][e] = 0.f;

  constexpr int VPS = BITS / 4;  // 16-byte vectors per lane per step
  const int KS = Kp / 16;
  const int r0 = lane >> 2;
  const int c0 = (lane & 3) * 2;
  constexpr int kDefaultZero = 1 << (BITS - 1);

  for (int c = warp; c < c_count; c += kWarps) {
    const int chunk = c_begin + c;
    // Issue every weight load of the chunk before any math: 8 (4-bit) or 16
    // (8-bit) independent 16-byte loads in flight per lane.
    uint4 wq[8][VPS];
    const uint4* src = qweight + ((size_t)nb * KS + (size_t)chunk * 8) * VPS * 32 + lane;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int h = 0; h < VPS; ++h) wq[i][h] = load_stream(src + (i * VPS + h) * 32);

    // Scales (and zeros) of the chunk's groups: 16 bytes per lane each.
    uint4 sv[GPC], zv[GPC];
#pragma unroll
    for (int gi = 0; gi < GPC; ++gi) {
      const int g = min((chunk * kChunkK + gi * (kChunkK / GPC)) / group_rows, G - 1);
      sv[gi] = __ldg(reinterpret_cast<const uint4*>(scales + (size_t)g * Np + nb * kBlockN + r0 * 8));
      if (HAS_Z) zv[gi] = __ldg(reinterpret_cast<const uint4*>(zeros + (size_t)g * Np + nb * kBlockN + r0 * 8));
    }

#pragma unroll
    for (int gi = 0; gi < GPC; ++gi) {
      const T* sp = reinterpret_cast<const T*>(&sv[gi]);
      const T* zp = reinterpret_cast<const T*>(&zv[gi]);
      // Per-tile constants of this group, as pairs (both halves of a B
      // fragment share the column, hence the scale and zero point).
      T2 sc2[8], zlo2[8], zhi2[8];
      float sf[8], zf[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const float z = HAS_Z ? Tr::to_float(zp[t]) : float(kDefaultZero);
        if (BITS == 4) {
          sc2[t] = Tr::bcast(sp[t]);
          // (magic + q) - (magic + z) and (magic + 16q)/16 - (magic/16 + z) are
          // exact small integers, so the only rounding is the final * scale.
          zlo2[t] = Tr::bcast(Tr::from_float(Tr::kMagicF + z));
          zhi2[t] = Tr::bcast(Tr::from_float(-(Tr::kMagicF / 16.f + z)));
        } else {
          sf[t] = Tr::to_float(sp[t]);
          zf[t] = 8388608.f + z;  // 2^23 + z: matches the fp32 magic below
        }
      }
      const T2 inv16 = Tr::bcast(Tr::from_float(1.f / 16.f));

#pragma unroll
      for (int ii = 0; ii < 8 / GPC; ++ii) {
        const int i = gi * (8 / GPC) + ii;
        const int kk = c * kChunkK + i * 16;  // column in xs
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int r = mt * 16 + r0;
          const T* p = xs + r * ld + kk + c0;
          a[mt][0] = r < M ? *reinterpret_cast<const uint32_t*>(p) : 0u;
          a[mt][2] = r < M ? *reinterpret_cast<const uint32_t*>(p + 8) : 0u;
          a[mt][1] = r + 8 < M ? *reinterpret_cast<const uint32_t*>(p + 8 * ld) : 0u;
          a[mt][3] = r + 8 < M ? *reinterpret_cast<const uint32_t*>(p + 8 * ld + 8) : 0u;
        }
        if (BITS == 4) {
          const uint32_t* w4 = reinterpret_cast<const uint32_t*>(&wq[i][0]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int ab = 0; ab < 2; ++ab) {
              const int t = 2 * j + ab;
              const uint32_t w = ab ? (w4[j] >> 8) : w4[j];
              T2 lo = bit_cast_to<T2>((w & 0x000f000fu) | Tr::kMagic);
              T2 hi = bit_cast_to<T2>((w & 0x00f000f0u) | Tr::kMagic);
              lo = __hmul2(__hsub2(lo, zlo2[t]), sc2[t]);
              hi = __hmul2(__hfma2(hi, inv16, zhi2[t]), sc2[t]);
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
    }
  }

  // ---- reduce the 4 warps in a fixed order through shared memory.
  __syncthreads();  // xs is dead from here on; reuse it as red[M][64] fp32
  float* red = reinterpret_cast<float*>(smem_raw);
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = mt * 16 + r0 + (e >= 2 ? 8 : 0);
            const int col = t * 8 + c0 + (e & 1);
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
  __shared__ int is_last;
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
template <typename T, int BITS>
__global__ void gptq_dequantize_kernel(const int* __restrict__ qweight,  // [ceil(K*BITS/32), N]
                                       const int* __restrict__ qzeros,   // [G, ceil(N*BITS/32)]
                                       const T* __restrict__ scales,     // [G, N]
                                       const int* __restrict__ g_idx,    // [K]
                                       T* __restrict__ out,              // [K, N]
                                       int K, int N, int zero_offset) {
  using Tr = Traits<T>;
  constexpr int PER = 32 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const int w = blockIdx.y;
  if (n >= N) return;
  const uint32_t q = static_cast<uint32_t>(qweight[(size_t)w * N + n]);
  const int zwords = (N * BITS + 31) / 32;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int k = w * PER + j;
    if (k >= K) break;
    const int g = g_idx[k];
    const uint32_t zw = static_cast<uint32_t>(qzeros[(size_t)g * zwords + n / PER]);
    const int z = (int(zw >> ((n % PER) * BITS) & MASK) + zero_offset) & MASK;
    const int v = int((q >> (j * BITS)) & MASK);
    out[(size_t)k * N + n] = Tr::from_float(float(v - z) * Tr::to_float(scales[(size_t)g * N + n]));
  }
}

}  // namespace zephyr
