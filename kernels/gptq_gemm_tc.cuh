// Tensor-core GPTQ GEMM for medium and large M (prefill chunks, big decode
// batches) on the zk layout (see the top of gptq_kernels.cuh), and its launch.
//
// Block tile: BM = 32*WM rows of x x 128 columns (two zk column blocks);
// WM x 2 warps, warp (wm, wn) computes rows [32wm, +32) x column block wn
// (2 m16 tiles x 8 n8 tiles, 64 fp32 accumulators per lane). K advances one
// 128-row chunk at a time through a kTcStages-deep cp.async pipeline that
// stages the x tile (BM x 128) and both column blocks' packed weights (4 or
// 8 KB each) in shared memory. Each warp dequantizes its column block's B
// fragments once per 16-row step and feeds them to both of its m16 tiles;
// the two warps of a column (WM of them) share the staged weights.
//
// x in shared memory: row r holds the chunk's 16 16-byte units, unit
// j = 4c + s (columns [32c + 8s, +8): the x columns of lane c for steps 2s and
// 2s+1) stored at (4s + c) ^ (4 * (r & 1)), so the 16-byte fragment loads of
// a quarter warp (rows g, g+1; c = 0..3) hit 8 distinct bank groups.
//
// Split-K (S > 1) keeps the fused kernel's deterministic scheme: fp32
// partials, the last block of an output tile sums them in order and resets
// its lock (locks[mb * ceil(Np/128) + nb], which the planner keeps < Np/64).
#pragma once

#include <cuda_runtime.h>

#include "gptq_kernels.cuh"

namespace zephyr {

constexpr int kTcStages = 3;
constexpr int kTcBlockN = 2 * kBlockN;  // 128 columns per block

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int BITS, int WM>
struct TcShape {
  static constexpr int kBM = 32 * WM;
  static constexpr int kThreads = 64 * WM;
  static constexpr int kVPS = BITS / 4;
  static constexpr int kXU4 = kBM * 16;             // x tile, 16-byte units
  static constexpr int kWU4CB = 8 * 32 * kVPS;      // one column block's chunk of weights
  static constexpr int kStageU4 = kXU4 + 2 * kWU4CB;
  static constexpr int kSmemBytes = kTcStages * kStageU4 * 16;
};

template <typename T, int BITS, bool HAS_Z, int WM>
__global__ void __launch_bounds__(64 * WM) gptq_gemm_tc_kernel(
    const T* __restrict__ x,            // [M, Kp] gathered/padded (or x itself when it qualifies)
    const uint4* __restrict__ qweight,  // [Np/64, Kp/16, 32*BITS] int32, zk layout
    const T* __restrict__ scales,       // [G, Np] shuffled
    const T* __restrict__ zeros,        // [G, Np] shuffled (read only if HAS_Z)
    float* __restrict__ partial,        // [S, M, Np] fp32, used when S > 1
    int* __restrict__ locks,            // [>= Np/64]
    T* __restrict__ out,                // [M, N]
    int M, int N, int Kp, int Np, int G, int group_rows, int cpb, int S) {
  using Tr = Traits<T>;
  using T2 = typename Tr::T2;
  using Sh = TcShape<BITS, WM>;
  constexpr int VPS = Sh::kVPS;
  constexpr int kDefaultZero = 1 << (BITS - 1);
  extern __shared__ uint4 smem[];
  __shared__ int is_last;

  const int nb = blockIdx.x, mb = blockIdx.y, s = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM;
  const int ncb = Np / kBlockN;
  const int cb = nb * 2 + wn;  // this warp's 64-column block
  const bool has_cols = cb < ncb;
  const int m0 = mb * Sh::kBM;
  const int chunks = Kp / kChunkK;
  const int c_begin = s * cpb;
  const int c_count = max(0, min(cpb, chunks - c_begin));
  const int KS = Kp / 16;
  const int g = lane >> 2, c = lane & 3;

  auto load_stage = [&](int st, int chunk) {
    uint4* xs = smem + st * Sh::kStageU4;
    uint4* ws = xs + Sh::kXU4;
    for (int i = tid; i < Sh::kXU4; i += Sh::kThreads) {
      const int r = i >> 4, j = i & 15;
      const bool ok = m0 + r < M;
      const T* src = x + (size_t)(ok ? m0 + r : 0) * Kp + chunk * kChunkK + j * 8;
      cp_async16(xs + r * 16 + ((((j & 3) << 2) | (j >> 2)) ^ ((r & 1) << 2)), src, ok);
    }
    for (int i = tid; i < 2 * Sh::kWU4CB; i += Sh::kThreads) {
      const int b = i / Sh::kWU4CB, o = i % Sh::kWU4CB;
      const bool ok = nb * 2 + b < ncb;
      const uint4* src = qweight + ((size_t)(ok ? nb * 2 + b : 0) * KS + (size_t)chunk * 8) * VPS * 32 + o;
      cp_async16(ws + i, src, ok);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][t][e] = 0.f;

  // This lane's 8 scales (and zeros) of a chunk: one group per lane and chunk.
  auto load_sz = [&](int chunk, uint4& sv, uint4& zv) {
    const int grp = min((chunk * kChunkK + c * 32) / group_rows, G - 1);
    const size_t off = (size_t)grp * Np + (has_cols ? cb : 0) * kBlockN + g * 8;
    sv = __ldg(reinterpret_cast<const uint4*>(scales + off));
    if (HAS_Z) zv = __ldg(reinterpret_cast<const uint4*>(zeros + off));
  };

  pdl_wait();  // x may come from the gather kernel just before
#pragma unroll
  for (int st = 0; st < kTcStages - 1; ++st) {
    if (st < c_count) load_stage(st, c_begin + st);
    cp_async_commit();
  }
  uint4 sv = make_uint4(0, 0, 0, 0), zv = make_uint4(0, 0, 0, 0);
  if (c_count > 0) load_sz(c_begin, sv, zv);

  for (int it = 0; it < c_count; ++it) {
    cp_async_wait<kTcStages - 2>();
    __syncthreads();  // stage it is visible to all; stage it-1 is free again
    {
      const int nx = it + kTcStages - 1;
      if (nx < c_count) load_stage(nx % kTcStages, c_begin + nx);
      cp_async_commit();
    }
    uint4 sn = sv, zn = zv;
    if (it + 1 < c_count) load_sz(c_begin + it + 1, sn, zn);  // next chunk's, in flight meanwhile
    if (has_cols) {
      const uint4* xs = smem + (it % kTcStages) * Sh::kStageU4;
      const uint4* ws = xs + Sh::kXU4 + wn * Sh::kWU4CB;
      const T* sp = reinterpret_cast<const T*>(&sv);
      const T* zp = reinterpret_cast<const T*>(&zv);
      T2 sc2[8], zlo2[8], zhi2[8];
      float sf[8], zf[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const float z = HAS_Z ? Tr::to_float(zp[t]) : float(kDefaultZero);
        if (BITS == 4) {
          sc2[t] = Tr::bcast(sp[t]);
          zlo2[t] = Tr::bcast(Tr::from_float(Tr::kMagicF + z));
          zhi2[t] = Tr::bcast(Tr::from_float(-(Tr::kMagicF / 16.f + z)));
        } else {
          sf[t] = Tr::to_float(sp[t]);
          zf[t] = 8388608.f + z;
        }
      }
      const T2 inv16 = Tr::bcast(Tr::from_float(1.f / 16.f));
      uint4 xq[2][2];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i % 2 == 0) {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              const int r = wm * 32 + mt * 16 + hh * 8 + g;
              xq[mt][hh] = xs[r * 16 + ((((i / 2) << 2) | c) ^ ((g & 1) << 2))];
            }
        }
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const uint32_t* lo = reinterpret_cast<const uint32_t*>(&xq[mt][0]);
          const uint32_t* hi = reinterpret_cast<const uint32_t*>(&xq[mt][1]);
          a[mt][0] = lo[2 * (i % 2)];
          a[mt][2] = lo[2 * (i % 2) + 1];
          a[mt][1] = hi[2 * (i % 2)];
          a[mt][3] = hi[2 * (i % 2) + 1];
        }
        if constexpr (BITS == 4) {
          const uint4 wv = ws[i * 32 + lane];
          const uint32_t* w4 = reinterpret_cast<const uint32_t*>(&wv);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int ab = 0; ab < 2; ++ab) {
              const int t = 2 * j + ab;
              const uint32_t w = ab ? (w4[j] >> 8) : w4[j];
              T2 lo = __hmul2(__hsub2(bit_cast_to<T2>((w & 0x000f000fu) | Tr::kMagic), zlo2[t]), sc2[t]);
              T2 hi;
              if constexpr (Tr::kMagicF == 1024.f) {
                hi = __hmul2(__hfma2(bit_cast_to<T2>((w & 0x00f000f0u) | Tr::kMagic), inv16, zhi2[t]), sc2[t]);
              } else {
                hi = __hmul2(__hsub2(bit_cast_to<T2>(((w >> 4) & 0x000f000fu) | Tr::kMagic), zlo2[t]), sc2[t]);
              }
              const uint32_t b0 = bit_cast_to<uint32_t>(lo), b1 = bit_cast_to<uint32_t>(hi);
#pragma unroll
              for (int mt = 0; mt < 2; ++mt) Tr::mma(acc[mt][t], a[mt], b0, b1);
            }
          }
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 wv = ws[(i * 2 + h) * 32 + lane];
            const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wv);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int t = 4 * h + j;
              const uint32_t w = w8[j];
              const float q0 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7440)) - zf[t];
              const float q1 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7441)) - zf[t];
              const float q2 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7442)) - zf[t];
              const float q3 = __int_as_float(__byte_perm(w, 0x4B000000u, 0x7443)) - zf[t];
              const uint32_t b0 = bit_cast_to<uint32_t>(Tr::pack(q0 * sf[t], q1 * sf[t]));
              const uint32_t b1 = bit_cast_to<uint32_t>(Tr::pack(q2 * sf[t], q3 * sf[t]));
#pragma unroll
              for (int mt = 0; mt < 2; ++mt) Tr::mma(acc[mt][t], a[mt], b0, b1);
            }
          }
        }
      }
    }
    sv = sn;
    zv = zn;
  }
  cp_async_wait<0>();

  // ---- epilogue. C fragment: acc[mt][t][e] is row wm*32 + mt*16 + g + 8*(e >= 2),
  // column cb*64 + t*8 + 2c + (e & 1).
  const bool pair_store = (N % 2) == 0;
  if (S == 1) {
    if (!has_cols) return;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = m0 + wm * 32 + mt * 16 + g + 8 * hh;
          const int col = cb * kBlockN + t * 8 + 2 * c;
          if (row >= M) continue;
          const float v0 = acc[mt][t][2 * hh], v1 = acc[mt][t][2 * hh + 1];
          T* dst = out + (size_t)row * N + col;
          if (pair_store && col + 1 < N) {
            *reinterpret_cast<T2*>(dst) = Tr::pack(v0, v1);
          } else {
            if (col < N) dst[0] = Tr::from_float(v0);
            if (col + 1 < N) dst[1] = Tr::from_float(v1);
          }
        }
    return;
  }
  if (has_cols) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + wm * 32 + mt * 16 + g + 8 * (e >> 1);
          const int col = cb * kBlockN + t * 8 + 2 * c + (e & 1);
          if (row < M) __stcg(partial + ((size_t)s * M + row) * Np + col, acc[mt][t][e]);
        }
  }
  __threadfence();  // this block's partial is visible before it counts itself in
  __syncthreads();
  int* lock = locks + mb * ((ncb + 1) / 2) + nb;
  if (tid == 0) is_last = (atomicAdd(lock, 1) == S - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int cols = min(kTcBlockN, Np - nb * kTcBlockN);
  for (int i = tid; i < Sh::kBM * cols; i += Sh::kThreads) {
    const int r = i / cols, j = i % cols;
    const int row = m0 + r, col = nb * kTcBlockN + j;
    if (row >= M) break;
    float v = 0.f;
    for (int ss = 0; ss < S; ++ss) v += __ldcg(partial + ((size_t)ss * M + row) * Np + col);
    if (col < N) out[(size_t)row * N + col] = Tr::from_float(v);
  }
  if (tid == 0) *lock = 0;  // ready for the next call (and graph replay)
}

struct TcArgs {
  const void* x;  // [M, Kp]
  const void* qweight;
  const void* scales;
  const void* zeros;  // null: every zero point is 2^(bits-1)
  float* partial;     // null when S == 1
  int* locks;
  void* out;
  int M, N, Kp, Np, G, group_rows, cpb, S, wm;
  bool pdl;
  cudaStream_t stream;
};

template <typename T, int BITS, bool HAS_Z, int WM>
cudaError_t launch_tc(const TcArgs& a) {
  using Sh = TcShape<BITS, WM>;
  auto kernel = gptq_gemm_tc_kernel<T, BITS, HAS_Z, WM>;
  static bool configured = false;  // per instantiation: allow > 48 KB of dynamic shared memory
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Sh::kSmemBytes);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((a.Np / kBlockN + 1) / 2, (a.M + Sh::kBM - 1) / Sh::kBM, a.S);
  cfg.blockDim = dim3(Sh::kThreads);
  cfg.dynamicSmemBytes = Sh::kSmemBytes;
  cfg.stream = a.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = a.pdl ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<const T*>(a.x),
                                       static_cast<const uint4*>(a.qweight), static_cast<const T*>(a.scales),
                                       static_cast<const T*>(a.zeros), a.partial, a.locks, static_cast<T*>(a.out),
                                       a.M, a.N, a.Kp, a.Np, a.G, a.group_rows, a.cpb, a.S);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T, int BITS, bool HAS_Z, int WM>
int occupancy_tc() {
  using Sh = TcShape<BITS, WM>;
  static int occ = 0;
  if (occ == 0) {
    auto kernel = gptq_gemm_tc_kernel<T, BITS, HAS_Z, WM>;
    int v = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Sh::kSmemBytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, Sh::kThreads, Sh::kSmemBytes) != cudaSuccess)
      v = 1;
    occ = v < 1 ? 1 : v;
  }
  return occ;
}

// Explicitly instantiated once per (dtype, bits) in gptq_gemm_<dtype>_u<bits>.cu.
template <typename T, int BITS>
cudaError_t gptq_gemm_tc_launch(const TcArgs& a) {
  if (a.wm == 4) return a.zeros ? launch_tc<T, BITS, true, 4>(a) : launch_tc<T, BITS, false, 4>(a);
  return a.zeros ? launch_tc<T, BITS, true, 2>(a) : launch_tc<T, BITS, false, 2>(a);
}

template <typename T, int BITS>
int gptq_gemm_tc_occupancy(int wm, bool has_z) {
  if (wm == 4) return has_z ? occupancy_tc<T, BITS, true, 4>() : occupancy_tc<T, BITS, false, 4>();
  return has_z ? occupancy_tc<T, BITS, true, 2>() : occupancy_tc<T, BITS, false, 2>();
}

extern template int gptq_gemm_tc_occupancy<__half, 4>(int, bool);
extern template int gptq_gemm_tc_occupancy<__half, 8>(int, bool);
extern template int gptq_gemm_tc_occupancy<__nv_bfloat16, 4>(int, bool);
extern template int gptq_gemm_tc_occupancy<__nv_bfloat16, 8>(int, bool);
extern template cudaError_t gptq_gemm_tc_launch<__half, 4>(const TcArgs&);
extern template cudaError_t gptq_gemm_tc_launch<__half, 8>(const TcArgs&);
extern template cudaError_t gptq_gemm_tc_launch<__nv_bfloat16, 4>(const TcArgs&);
extern template cudaError_t gptq_gemm_tc_launch<__nv_bfloat16, 8>(const TcArgs&);

}  // namespace zephyr
