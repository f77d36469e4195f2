// One decode step of attention in one kernel: rotary embedding of q and k,
// the KV-cache write of the new token, and grouped-query attention over the
// cache (split along the keys, flash-decoding style, merged by the last block).
//
// Schema (defined with its CPU reference in zephyr_plugins/kernel_ops.py):
//
//   zephyr::decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache,
//                            Tensor(b!) v_cache, Tensor slot, Tensor pad, Tensor(c!) locks,
//                            int n_heads, int n_kv_heads, int kv_len, int window,
//                            int block_keys=0, Tensor? out_index=None) -> Tensor
//
// Unfused, this is ~7 kernels per layer (rope, two cache writes, two batched
// matmuls, the masked softmax, a copy); inside a CUDA graph each costs a
// launch slot of ~1-2 us, which at batch 1 is more than the work.
//
// Grid: (key blocks S, kv heads, rows). A block owns `block_keys` cache slots
// of one (row, kv head) and all G = H / Hkv query heads that share it:
//   1. q of the G heads, rotated in fp32 and rounded to the activation type
//      (as the unfused path does), into shared memory.
//      The block whose slots hold `slot` also rotates k and writes k, v there
//      (and keeps them in shared memory for its own use).
//   2. Steps of 64 keys (32 with G > 4): each thread loads its 16-byte slices
//      of K and V for the whole step at once (one memory round trip per
//      step). The scores are tensor-core products: each warp takes KW <= 16
//      keys of the step as the rows of mma.sync.m16n8k16 tiles against the G
//      (<= 8) query heads as columns, with K read straight from global memory
//      in fragment order (below), then scaled by 1/sqrt(hd) in fp32. An online
//      softmax (block-wide running max) turns them into probabilities, once
//      per (key, head), which reach the threads holding the V slices through
//      shared memory; P @ V is fp32 FMAs. Masked keys
//      are never read: a row sees slots [lo, slot] with
//      lo = max(pad, slot - window + 1), and always itself
//      (kv_cache.attention_mask's rule).
//   3. The output goes to [B, H * hd], element i of a row at out_index[i] when
//      given (the act-order row order of the output projection that reads it).
//   4. With S > 1 (lock merge), every block writes (unnormalized output, max, sum) to an
//      fp32 scratch buffer; the last block of the (row, kv head), counted in
//      `locks` (self-resetting), merges them: one warp per head turns the
//      maxima and sums into weights with shuffles while every thread's partial
//      outputs are already requested, then each output sums in key order.
//      Deterministic (a fixed order everywhere).
//   5. Cluster merge (CL, sm_90; the launcher's plan_cluster decides): where the grid fits on the
//      SMs at once and at most 8 key blocks of 128 slots (64 with G > 4) cover the cache, the S
//      blocks of a (row, kv head) form one thread-block cluster. Each block keeps its (output,
//      max, sum) in its own shared memory; after a cluster barrier, block s merges output
//      elements [s, s + 1) * ceil(G hd / S) from every block's shared memory (distributed
//      shared memory, blocks in key order), then a second barrier keeps the memory alive until
//      all have read. No scratch buffer, no lock, no round trip through L2 after the keys.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "device_info.cuh"
#include "gptq_kernels.cuh"  // launch_kernel, pdl_wait, pdl_launch_dependents
#include "timeline.cuh"      // TlProbe: empty unless built with ZEPHYR_KERNEL_TIMELINE=1

namespace zephyr {

namespace {

// Threads per block: 128 or 256 (a template argument, chosen by the launcher).
constexpr int kMaxGroup = 8;       // query heads per kv head served
constexpr int kMaxBlockKeys = 1024;
constexpr int kMaxClusterBlocks = 8;  // key blocks merged as one cluster (the portable cluster size)

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// A thread's 8 values of one key (or value) slice: from the new token's row in shared memory when
// `is_new` (the cache row is being written by this launch), else from the 16 bytes loaded in `r`.
template <typename T>
__device__ __forceinline__ void slice_values(const uint4& r, const float* fresh, bool is_new, float (&f)[8]) {
  if (is_new) {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = fresh[e];
  } else {
    const T* v = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_float(v[e]);
  }
}
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element d of a rotated head ("rotate half": pairs (d, d + hd/2)), in fp32
// without contraction into FMA, so the cache holds what the unfused path writes.
template <typename T, int HD>
__device__ __forceinline__ float rotate(const T* x, int d, const float* cs, const float* sn) {
  constexpr int half = HD / 2;
  if (d < half)
    return __fsub_rn(__fmul_rn(to_float(x[d]), cs[d]), __fmul_rn(to_float(x[d + half]), sn[d]));
  return __fadd_rn(__fmul_rn(to_float(x[d]), cs[d - half]), __fmul_rn(to_float(x[d - half]), sn[d - half]));
}

struct AttnArgs {
  const void* qkv;      // [B, (H + 2 Hkv) * HD]
  const float* cos;     // [B, HD / 2]
  const float* sin;     // [B, HD / 2]
  void* k_cache;        // [Bmax, Hkv, Lmax, HD]
  void* v_cache;
  const int64_t* slot;  // [1]
  const int64_t* pad;   // [B]
  int* locks;           // [>= B * Hkv], zeros
  float* partial;       // [B, Hkv, S, G, HD + 2] when S > 1
  void* out;            // [B, H * HD]
  const int64_t* out_index;  // [H * HD] or null: element i of a row is written at out_index[i]
  int H, Hkv, G, Lmax, kv_len, window, block_keys;
  float scale;
  int merge_v2;  // the one-round-trip merge (default); ZEPHYR_ATTN_MERGE=0: the serial one, for A/B runs
};

// EARLY (the 256-thread blocks of grids that fit on the SMs at once, e.g. batch 1): the block's
// first step of K and V slices is loaded before pdl_wait, and after it q, k, v, cos, sin, the slot
// and the padding are all requested at once, so the chain after the wait is one round trip to L2
// before the scores instead of three (slot; q, cos, sin; the cache from memory). Reading the
// cache before the wait is safe where the kernel before may still run: no kernel of a decode step
// writes a cache slot but this one, and only slot `slot` (whose loaded value is never used: the
// new k, v come from shared memory); every other slot was written by an earlier launch, complete
// before this step's first kernel. Masked slots are zeroed before use.
template <typename T, int HD, int GMAX, int kAttnThreads, bool EARLY, bool CL>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(const AttnArgs a) {
  constexpr int kAttnWarps = kAttnThreads / 32;
  constexpr int kLanesPerKey = HD / 8;                       // 16-byte slices of one key
  constexpr int kKeysPerPass = kAttnThreads / kLanesPerKey;  // keys the block covers per pass
  // Keys per step: every thread loads its K and V slices of the whole step at
  // once (one memory round trip per step, not one per key). CL blocks hold one step of twice that.
  constexpr int kStep = (GMAX <= 4 ? 64 : 32) * (CL ? 2 : 1);
  constexpr int kPasses = kStep / kKeysPerPass;
  static_assert(kPasses >= 1 && kStep % kKeysPerPass == 0, "a step must be whole passes of the block");
  // Scores: warp w takes keys [w KW, (w + 1) KW) of a step as rows of m16n8k16 tiles (rows >= KW
  // empty), the query heads as the 8 columns, hd / 16 k-steps. Lane (fr = lane / 4, fc = lane % 4)
  // holds A (K) rows fr and fr + 8 and B (q) column fr. The dot product does not depend on the
  // order of the dims, so k-step 2m + h's fragment columns {2fc, 2fc + 1, 2fc + 8, 2fc + 9} are
  // taken as dims 32m + 8fc + 4h + {0, 1, 2, 3}: a lane reads 16 contiguous bytes of a key (or of
  // q) per two k-steps, and a warp's load of one m covers 64 contiguous bytes of each of its keys.
  constexpr int KW = kStep / kAttnWarps;
  static_assert(kStep % kAttnWarps == 0 && KW >= 1 && KW <= 16, "a warp's keys must fit one tile");
  constexpr int kRows = KW > 8 ? 2 : 1;  // tile rows a lane loads (fr, and fr + 8 with KW > 8)
  constexpr int kMK = HD / 32;           // 16-byte pieces of a key per lane
  // Launched as a programmatic dependent (pdl_chain in device_info.cuh), the kernel may be scheduled
  // while the kernel that writes qkv still runs: it waits before reading anything. The output
  // projection after it may be scheduled as soon as every block of this one has started.
  // Timeline stamps (diagnostic builds only): 1 after the wait, 2 q staged, 3 keys and partial done, 4 lock.
  TlProbe probe(1 + 10 * int(gridDim.x) + 1000 * int(gridDim.z) + (EARLY ? 100000 : 0), kAttnThreads);
  pdl_launch_dependents();
  const int s = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, S = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = a.G, BK = a.block_keys;
  const int dl = tid % kLanesPerKey, kk = tid / kLanesPerKey;  // slice, key within a pass
  const int fr = lane >> 2, fc = lane & 3;                      // mma fragment row and column pair
  const int c0 = s * BK, c1 = min(c0 + BK, a.kv_len);
  const size_t head_off = size_t(b * a.Hkv + hk) * a.Lmax * HD;
  T* kc = reinterpret_cast<T*>(a.k_cache) + head_off;
  T* vc = reinterpret_cast<T*>(a.v_cache) + head_off;
  // This lane's 16-byte piece m of key j in fragment order (dims 32m + 8fc + [0, 8)).
  auto k_piece = [&](int j, int m) { return *reinterpret_cast<const uint4*>(kc + size_t(j) * HD + 32 * m + 8 * fc); };
  // EARLY: the step at c0, loaded before the wait (K in fragment order, V in slices)
  uint4 kr0[EARLY ? kRows : 1][EARLY ? kMK : 1], vr0[EARLY ? kPasses : 1];
  if constexpr (EARLY) {
#pragma unroll
    for (int h = 0; h < kRows; ++h) {
      const int r = fr + 8 * h, j = c0 + warp * KW + r;
#pragma unroll
      for (int m = 0; m < kMK; ++m) {
        kr0[h][m] = make_uint4(0, 0, 0, 0);
        if (r < KW && j < c1) kr0[h][m] = k_piece(j, m);
      }
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int j = c0 + p * kKeysPerPass + kk;
      vr0[p] = make_uint4(0, 0, 0, 0);
      if (j < c1) vr0[p] = *reinterpret_cast<const uint4*>(vc + size_t(j) * HD + dl * 8);
    }
  }
  pdl_wait();
  probe.mark(1);

  __shared__ __align__(16) T q_s[GMAX * HD];  // rotated q, rounded to T, unscaled
  __shared__ __align__(16) float p_s[kStep * GMAX];  // a step's probabilities [key][head]
  __shared__ float kv_new[2 * HD];  // the new token's k (rotated) and v
  __shared__ float wmax[kAttnWarps][GMAX];
  __shared__ float red[kAttnWarps][GMAX * HD];
  __shared__ int last_block;
  __shared__ float cl_out[CL ? GMAX * HD : 1];  // CL: this block's unnormalized output,
  __shared__ float2 cl_ml[GMAX];                // and its (max, sum) per head
  const T* row = reinterpret_cast<const T*>(a.qkv) + size_t(b) * (a.H + 2 * a.Hkv) * HD;
  const float* cs = a.cos + size_t(b) * (HD / 2);
  const float* sn = a.sin + size_t(b) * (HD / 2);
  // EARLY: q, k and v of the new token go to registers here, before the slot is known (their loads
  // then travel with the slot's); the block that holds the slot writes k, v below.
  T q_e[EARLY ? (GMAX * HD + kAttnThreads - 1) / kAttnThreads : 1];
  float k_e = 0.f, v_e = 0.f;
  T k_t{}, v_t{};
  if constexpr (EARLY) {
#pragma unroll
    for (int r = 0; r < (GMAX * HD + kAttnThreads - 1) / kAttnThreads; ++r) {
      const int i = tid + r * kAttnThreads, g = i / HD, d = i % HD;
      q_e[r] = g < G ? from_float<T>(rotate<T, HD>(row + (hk * G + g) * HD, d, cs, sn)) : from_float<T>(0.f);
    }
    if (tid < HD) {
      k_t = from_float<T>(rotate<T, HD>(row + (a.H + hk) * HD, tid, cs, sn));
      v_t = row[(a.H + a.Hkv + hk) * HD + tid];
      k_e = to_float(k_t), v_e = to_float(v_t);
    }
  }

  const int slot = int(*a.slot);
  int lo = int(a.pad[b]);
  if (a.window > 0) lo = max(lo, slot - a.window + 1);
  lo = min(lo, slot);
  const int j0 = max(c0, lo), j1 = min(c1, slot + 1);  // this block's keys: [j0, j1)

  float o[GMAX][8], m_run[GMAX], l_run[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m_run[g] = -INFINITY, l_run[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[g][e] = 0.f;
  }

  if (j0 < j1) {
    const bool writer = slot >= c0 && slot < c1;
    if constexpr (EARLY) {
#pragma unroll
      for (int r = 0; r < (GMAX * HD + kAttnThreads - 1) / kAttnThreads; ++r)
        if (tid + r * kAttnThreads < GMAX * HD) q_s[tid + r * kAttnThreads] = q_e[r];
      if (writer && tid < HD) {
        kc[size_t(slot) * HD + tid] = k_t;
        vc[size_t(slot) * HD + tid] = v_t;
        kv_new[tid] = k_e, kv_new[HD + tid] = v_e;
      }
    } else {
      for (int i = tid; i < G * HD; i += kAttnThreads) {
        const int g = i / HD, d = i % HD;
        q_s[i] = from_float<T>(rotate<T, HD>(row + (hk * G + g) * HD, d, cs, sn));
      }
      if (writer) {  // this block writes the new token's k and v (and reads them from shared memory)
        const T* kh = row + (a.H + hk) * HD;
        const T* vh = row + (a.H + a.Hkv + hk) * HD;
        for (int d = tid; d < HD; d += kAttnThreads) {
          const T k = from_float<T>(rotate<T, HD>(kh, d, cs, sn)), v = vh[d];
          kc[size_t(slot) * HD + d] = k;
          vc[size_t(slot) * HD + d] = v;
          kv_new[d] = to_float(k), kv_new[HD + d] = to_float(v);
        }
      }
    }
    __syncthreads();
    probe.mark(2);
    // This lane's B fragments: head fr's q (zero for fr >= G), dims 32m + 8fc + [0, 8).
    uint4 qb[kMK];
#pragma unroll
    for (int m = 0; m < kMK; ++m)
      qb[m] = fr < G ? *reinterpret_cast<const uint4*>(q_s + fr * HD + 32 * m + 8 * fc) : make_uint4(0, 0, 0, 0);

    for (int base = j0; base < j1; base += kStep) {
      // All of the step's K and V slices in flight at once (the new token's k and v come from
      // shared memory). Issuing the first step's loads before the rotation of q and k was tried: 211
      // instead of 168 registers, and batch 32 decoded 3% slower on the H100.
      const bool early = EARLY && base == c0;  // this step was loaded before the wait (j0 == c0)
      uint4 kr[kRows][kMK], vr[kPasses];
#pragma unroll
      for (int h = 0; h < kRows; ++h) {
        const int r = fr + 8 * h, j = base + warp * KW + r;
#pragma unroll
        for (int m = 0; m < kMK; ++m) {
          kr[h][m] = make_uint4(0, 0, 0, 0);
          if (r < KW && j < j1) {
            if (j == slot) {
              T f[8];
#pragma unroll
              for (int e = 0; e < 8; ++e) f[e] = from_float<T>(kv_new[32 * m + 8 * fc + e]);  // exact
              memcpy(&kr[h][m], f, sizeof(f));
            } else if (early) {
              kr[h][m] = kr0[EARLY ? h : 0][EARLY ? m : 0];
            } else {
              kr[h][m] = k_piece(j, m);
            }
          }
        }
      }
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        vr[p] = make_uint4(0, 0, 0, 0);
        const int j = base + p * kKeysPerPass + kk;
        if (j < j1 && j != slot) vr[p] = early ? vr0[EARLY ? p : 0] : *reinterpret_cast<const uint4*>(vc + size_t(j) * HD + dl * 8);
      }
      // Scores of keys (rows fr, fr + 8) x heads (2fc, 2fc + 1): two accumulators (even and odd
      // k-steps) halve the chain of dependent mma.
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int m = 0; m < kMK; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4& k0 = kr[0][m];
          const uint4& k1 = kr[kRows - 1][m];
          const uint32_t af[4] = {h ? k0.z : k0.x, kRows > 1 ? (h ? k1.z : k1.x) : 0u, h ? k0.w : k0.y,
                                  kRows > 1 ? (h ? k1.w : k1.y) : 0u};
          Traits<T>::mma(acc[h], af, h ? qb[m].z : qb[m].x, h ? qb[m].w : qb[m].y);
        }
      float sc[2][2], mx[2];  // [row][head 2fc + i]
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = fr + 8 * h, j = base + warp * KW + r;
          sc[h][i] = r < KW && j < j1 ? (acc[0][2 * h + i] + acc[1][2 * h + i]) * a.scale : -INFINITY;
        }
        // The warp's max per head: over the lanes that share fc.
        mx[i] = fmaxf(sc[0][i], sc[1][i]);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], off));
        if (fr == 0 && 2 * fc + i < GMAX) wmax[warp][2 * fc + i] = mx[i];
      }
      __syncthreads();
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float m_new = m_run[g];
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w) m_new = fmaxf(m_new, wmax[w][g]);
        const float alpha = m_run[g] == -INFINITY ? 0.f : expf(m_run[g] - m_new);
        m_run[g] = m_new;
        l_run[g] *= alpha;
#pragma unroll
        for (int e = 0; e < 8; ++e) o[g][e] *= alpha;
      }
      // Probabilities, once per (key, head): the lanes holding the scores write them.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int g = 2 * fc + i;
        float m = m_run[0];
#pragma unroll
        for (int u = 1; u < GMAX; ++u)
          if (u == g) m = m_run[u];
#pragma unroll
        for (int h = 0; h < kRows; ++h) {
          const int r = fr + 8 * h;
          if (r < KW && g < G) p_s[(warp * KW + r) * GMAX + g] = expf(sc[h][i] - m);
        }
      }
      __syncthreads();  // p_s complete; wmax is rewritten by the next step
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        const int j = base + p * kKeysPerPass + kk;
        if (j >= j1) continue;
        float vf[8];
        slice_values<T>(vr[p], kv_new + HD + dl * 8, j == slot, vf);
        const float* pk = p_s + (p * kKeysPerPass + kk) * GMAX;
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g >= G) break;
          const float pr = pk[g];
          l_run[g] += pr;
#pragma unroll
          for (int e = 0; e < 8; ++e) o[g][e] = fmaf(pr, vf[e], o[g][e]);
        }
      }
    }
    // Sum over the threads holding the same slice (keys differ), then over the warps. Every
    // lane of a key's slice group carries the same l, so l is summed over key groups only.
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g >= G) break;
#pragma unroll
      for (int off = kLanesPerKey; off < 32; off <<= 1) {
        l_run[g] += __shfl_xor_sync(0xffffffffu, l_run[g], off);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[g][e] += __shfl_xor_sync(0xffffffffu, o[g][e], off);
      }
      if (lane < kLanesPerKey) {
#pragma unroll
        for (int e = 0; e < 8; ++e) red[warp][g * HD + dl * 8 + e] = o[g][e];
      }
      if (lane == 0) wmax[warp][g] = l_run[g];
    }
    __syncthreads();
    for (int i = tid; i < G * HD; i += kAttnThreads) {
      const int g = i / HD, d = i % HD;
      float v = 0.f, l = 0.f;
#pragma unroll
      for (int w = 0; w < kAttnWarps; ++w) v += red[w][i], l += wmax[w][g];
      if constexpr (CL) {
        cl_out[i] = v;
        if (d == 0) cl_ml[g] = make_float2(m_run[g], l);
      } else if (S == 1) {
        const int o_i = (hk * G + g) * HD + d;
        reinterpret_cast<T*>(a.out)[size_t(b) * a.H * HD + (a.out_index ? int(a.out_index[o_i]) : o_i)] =
            from_float<T>(v / l);
      } else {
        float* part = a.partial + ((size_t(b * a.Hkv + hk) * S + s) * G + g) * (HD + 2);
        part[d] = v;
        if (d == 0) part[HD] = m_run[g], part[HD + 1] = l;
      }
    }
  }
  probe.mark(3);
  if constexpr (CL) {
    // Blocks [s_lo, s_hi] had keys (the one holding `slot` always has); their rank in the cluster is s.
    // Block s merges output elements [s * chunk, (s + 1) * chunk) of the (row, kv head): with S >= 2,
    // at most half of G hd, so kMergeIters rounds of the block's threads.
    constexpr int kMergeIters = (GMAX * HD / 2 + kAttnThreads - 1) / kAttnThreads;
    const int s_lo = lo / BK, s_hi = min(slot, a.kv_len - 1) / BK;
    const int chunk = (G * HD + S - 1) / S, e_end = min((s + 1) * chunk, G * HD);
    int oi[kMergeIters];
#pragma unroll
    for (int r = 0; r < kMergeIters; ++r) {  // the output positions, requested before the barrier
      const int i = s * chunk + tid + r * kAttnThreads, o_i = hk * G * HD + i;
      oi[r] = i < e_end && a.out_index ? int(__ldg(a.out_index + o_i)) : o_i;
    }
    cluster_sync_all();  // every block's cl_out / cl_ml written and visible to the cluster
#pragma unroll
    for (int r = 0; r < kMergeIters; ++r) {
      const int i = s * chunk + tid + r * kAttnThreads;
      if (i >= e_end) break;
      const int g = i / HD;
      float2 ml[kMaxClusterBlocks];
      float pv[kMaxClusterBlocks];
#pragma unroll
      for (int t = 0; t < kMaxClusterBlocks; ++t) {
        ml[t] = make_float2(-INFINITY, 0.f), pv[t] = 0.f;
        if (t >= s_lo && t <= s_hi) {  // all requested before any is used: one round trip
          ml[t] = ld_cluster_f2(cluster_map(smem_addr(&cl_ml[g]), t));
          pv[t] = ld_cluster_f32(cluster_map(smem_addr(&cl_out[i]), t));
        }
      }
      float m = -INFINITY;
#pragma unroll
      for (int t = 0; t < kMaxClusterBlocks; ++t) m = fmaxf(m, ml[t].x);
      float l = 0.f, v = 0.f;
#pragma unroll
      for (int t = 0; t < kMaxClusterBlocks; ++t) {  // key order
        const float e = ml[t].x == -INFINITY ? 0.f : expf(ml[t].x - m);
        l = fmaf(e, ml[t].y, l);
        v = fmaf(e, pv[t], v);
      }
      reinterpret_cast<T*>(a.out)[size_t(b) * a.H * HD + oi[r]] = from_float<T>(v / l);
    }
    cluster_sync_relaxed();  // no block leaves (and frees its shared memory) while others read it
    return;
  }
  if (S == 1) return;  // one block per (row, kv head): it always holds `slot` and wrote the output

  // The last block of this (row, kv head) merges the blocks that had keys, in key order.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* lock = a.locks + b * a.Hkv + hk;
    last_block = atomicAdd(lock, 1) == S - 1;
    if (last_block) *lock = 0;  // ready for the next launch
  }
  __syncthreads();
  probe.mark(4);
  if (!last_block) return;
  __threadfence();
  const int s_lo = lo / BK, s_hi = min(slot, a.kv_len - 1) / BK, n = s_hi - s_lo + 1;
  const size_t stride = size_t(G) * (HD + 2);
  const float* base = a.partial + (size_t(b * a.Hkv + hk) * S + s_lo) * stride;
  if (a.merge_v2) {
    // One round trip to L2 for the whole merge: every thread first requests the partial outputs of its
    // output elements (the first kPre blocks of each; more only with forced small key blocks) and their
    // out_index entries; meanwhile warp g loads block maxima and sums of head g (lane t: block t),
    // reduces them with shuffles and writes the weights w[t][g] = exp(m_t - M) / sum_t exp(m_t - M) l_t.
    constexpr int kOut = (GMAX * HD + kAttnThreads - 1) / kAttnThreads;
    constexpr int kPre = 32 / kOut < 4 ? 4 : 32 / kOut;  // 16 (256 threads, 4 heads per kv head) or 8
    float pv[kOut][kPre];
    int oi[kOut];
#pragma unroll
    for (int r = 0; r < kOut; ++r) {
      const int i = tid + r * kAttnThreads, g = i / HD, d = i % HD;
      const bool valid = i < G * HD;
      const int o_i = (hk * G + g) * HD + d;
      oi[r] = valid && a.out_index ? int(__ldg(a.out_index + o_i)) : o_i;
#pragma unroll
      for (int u = 0; u < kPre; ++u) pv[r][u] = valid && u < n ? __ldcg(base + u * stride + g * (HD + 2) + d) : 0.f;
    }
    float* w = &red[0][0];     // [n][G]: block maxima, then weights
    float* l_all = w + n * G;  // [n][G]: block sums
    for (int g = warp; g < G; g += kAttnWarps) {
      float m = -INFINITY;
      for (int t = lane; t < n; t += 32) {
        const float* part = base + t * stride + g * (HD + 2);
        const float mt = __ldcg(part + HD), lt = __ldcg(part + HD + 1);
        w[t * G + g] = mt, l_all[t * G + g] = lt;
        m = fmaxf(m, mt);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      float l = 0.f;
      for (int t = lane; t < n; t += 32) {
        const float e = expf(w[t * G + g] - m);
        w[t * G + g] = e;
        l = fmaf(e, l_all[t * G + g], l);
      }
      // xor butterfly: every lane ends with the same bits (each pair adds the same two values)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
      for (int t = lane; t < n; t += 32) w[t * G + g] /= l;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kOut; ++r) {
      const int i = tid + r * kAttnThreads, g = i / HD, d = i % HD;
      if (i >= G * HD) break;
      float v = 0.f;
#pragma unroll
      for (int u = 0; u < kPre; ++u)
        if (u < n) v = fmaf(w[u * G + g], pv[r][u], v);
      for (int t = kPre; t < n; ++t) v = fmaf(w[t * G + g], __ldcg(base + t * stride + g * (HD + 2) + d), v);
      reinterpret_cast<T*>(a.out)[size_t(b) * a.H * HD + oi[r]] = from_float<T>(v);
    }
    return;
  }
  // Weights w[t][g] = exp(m_t - M_g) / sum_t exp(m_t - M_g) l_t, in shared memory (reusing `red`;
  // the launcher bounds S so that 2 S G floats fit).
  float* w = &red[0][0];
  float* l_all = w + n * G;
  for (int i = tid; i < n * G; i += kAttnThreads) {
    const float* part = base + (i / G) * stride + (i % G) * (HD + 2);
    w[i] = __ldcg(part + HD);
    l_all[i] = __ldcg(part + HD + 1);
  }
  __syncthreads();
  if (tid < G) {
    float m = -INFINITY, l = 0.f;
    for (int t = 0; t < n; ++t) m = fmaxf(m, w[t * G + tid]);
    for (int t = 0; t < n; ++t) {
      const float e = expf(w[t * G + tid] - m);
      w[t * G + tid] = e;
      l += e * l_all[t * G + tid];
    }
    for (int t = 0; t < n; ++t) w[t * G + tid] /= l;
  }
  __syncthreads();
  for (int i = tid; i < G * HD; i += kAttnThreads) {
    const int g = i / HD, d = i % HD;
    float v = 0.f;
#pragma unroll 4
    for (int t = 0; t < n; ++t) v = fmaf(w[t * G + g], __ldcg(base + t * stride + g * (HD + 2) + d), v);
    const int o_i = (hk * G + g) * HD + d;
    reinterpret_cast<T*>(a.out)[size_t(b) * a.H * HD + (a.out_index ? int(a.out_index[o_i]) : o_i)] = from_float<T>(v);
  }
}

// Keys per block: a multiple of the step (64 keys) up to 1024, doubled while
// the grid holds more than four blocks per SM (long contexts, big batches) or
// a (row, kv head) more than 16 key blocks, so that the merge stays short; at
// batch 1 the keys spread over many SMs. Measured on the H100 (benchmarks/
// attention.py --sweep, batch 1, 256 threads): slot 2000 15.6 us at 128 keys
// per block vs 21.7 at 64; slot 4000 21.4 at 256 vs 39.4 at 64.
int plan_block_keys(int B, int Hkv, int kv_len, int sms) {
  int bk = 64;
  auto blocks = [&](int k) { return (kv_len + k - 1) / k; };
  while (bk < kMaxBlockKeys && (long(B) * Hkv * blocks(bk) > 4L * sms || blocks(bk) > 16)) bk *= 2;
  return bk;
}

// Threads per block: 256 (8 warps share a block's keys, so each thread has half as many per
// step) when the grid does not fill the SMs once, as at batch 1; else 128, which keeps more
// blocks resident (H100, batch 1, slot 540: 10.7 vs 13.2 us; batch 8, 384 blocks: 28.2 vs
// 20.2; 512 threads: 11.4 at batch 1).
int plan_threads(long blocks, int sms) { return blocks <= sms ? 256 : 128; }

// Blocks of `kernel` (256 threads) resident at once as clusters of S along x on `device` (the current
// one): resident_cluster_blocks, queried once per (device, kernel, S).
int cluster_slots(int device, void (*kernel)(AttnArgs), int S) {
  static std::mutex mu;
  static std::map<std::tuple<int, void (*)(AttnArgs), int>, int> cache;
  const std::lock_guard<std::mutex> hold(mu);
  const auto key = std::make_tuple(device, kernel, S);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  return cache[key] = resident_cluster_blocks(reinterpret_cast<const void*>(kernel), dim3(256), 0, dim3(S, 1, 1));
}

// Key blocks S for the cluster merge (step 5 at the top), or 0 for the lock merge: sm_90, the
// planned split (block_keys 0), one step of `cl_keys` slots per block, 2 <= S <= 8, and all
// B * Hkv clusters resident at once (the merge waits on every block of its cluster).
int plan_cluster(int B, int Hkv, int kv_len, int cl_keys, int sms, int device, int block_keys) {
  static const bool off = env_off("ZEPHYR_ATTN_CLUSTER");
  if (off || block_keys != 0 || cc_major(device) < 9) return 0;
  const int S = (kv_len + cl_keys - 1) / cl_keys;
  if (S < 2 || S > kMaxClusterBlocks || long(B) * Hkv * S > sms) return 0;
  return S;
}

}  // namespace

// See zephyr_plugins/kernel_ops.py for the schema and the meaning of each argument.
at::Tensor decode_attention_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot,
                                 const at::Tensor& pad, at::Tensor& locks, int64_t n_heads, int64_t n_kv_heads,
                                 int64_t kv_len, int64_t window, int64_t block_keys,
                                 const c10::optional<at::Tensor>& out_index) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() &&
                  (qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16),
              "decode_attention: qkv must be contiguous float16/bfloat16 [B, (H + 2 Hkv) hd]");
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && n_heads / n_kv_heads <= kMaxGroup,
              "decode_attention: n_heads must be a multiple of n_kv_heads, at most ", kMaxGroup, " times");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.scalar_type() == qkv.scalar_type(),
              "decode_attention: k_cache and v_cache must be contiguous [Bmax, Hkv, Lmax, hd] of qkv's dtype");
  const int B = qkv.size(0), H = n_heads, Hkv = n_kv_heads, HD = k_cache.size(3), Lmax = k_cache.size(2);
  TORCH_CHECK(HD == 64 || HD == 128, "decode_attention: head_dim must be 64 or 128, got ", HD);
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * HD && k_cache.size(0) >= B && k_cache.size(1) == Hkv,
              "decode_attention: qkv ", qkv.sizes(), " and cache ", k_cache.sizes(), " disagree");
  TORCH_CHECK(kv_len >= 1 && kv_len <= Lmax, "decode_attention: kv_len=", kv_len, " outside [1, ", Lmax, "]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == B * HD / 2 && sin.numel() == B * HD / 2,
              "decode_attention: cos and sin must be contiguous float32 [B, hd / 2]");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1 && pad.scalar_type() == at::kLong &&
                  pad.numel() == B && pad.is_contiguous(),
              "decode_attention: slot must be int64 [1] and pad int64 [B]");
  TORCH_CHECK(locks.scalar_type() == at::kInt && locks.numel() >= B * Hkv,
              "decode_attention: locks must be int32 [>= B * Hkv] zeros");
  const int G = H / Hkv;
  const bool scatter = out_index.has_value() && out_index->defined();
  TORCH_CHECK(!scatter || (out_index->scalar_type() == at::kLong && out_index->numel() == H * HD &&
                           out_index->is_contiguous() && out_index->device() == qkv.device()),
              "decode_attention: out_index must be contiguous int64 [H * hd] on qkv's device");
  const c10::cuda::OptionalCUDAGuard guard(qkv.device());
  auto out = at::empty({B, H * HD}, qkv.options());
  if (B == 0) return out;
  const int device = qkv.get_device(), sms = sm_count(device);
  const int gmax = G <= 4 ? 4 : 8;
  // The 256-thread blocks load their first step of the cache before waiting for the kernel before
  // (EARLY, above); ZEPHYR_ATTN_EARLY=0 (read once, for A/B runs) keeps them waiting first.
  static const bool early = !env_off("ZEPHYR_ATTN_EARLY");
  const bool half = qkv.scalar_type() == at::kHalf;
  // The instantiation for (dtype, head dim, group bound, threads, merge).
  auto kernel_for = [&](int threads, bool cl) {
    auto pick = [&](auto* type, auto head_dim) -> void (*)(AttnArgs) {
      using T = std::remove_pointer_t<decltype(type)>;
      constexpr int D = decltype(head_dim)::value;
      if (cl)
        return gmax == 4 ? (early ? decode_attention_kernel<T, D, 4, 256, true, true>
                                  : decode_attention_kernel<T, D, 4, 256, false, true>)
                         : (early ? decode_attention_kernel<T, D, 8, 256, true, true>
                                  : decode_attention_kernel<T, D, 8, 256, false, true>);
      if (gmax == 4)
        return threads == 256 ? (early ? decode_attention_kernel<T, D, 4, 256, true, false>
                                       : decode_attention_kernel<T, D, 4, 256, false, false>)
                              : decode_attention_kernel<T, D, 4, 128, false, false>;
      return threads == 256 ? (early ? decode_attention_kernel<T, D, 8, 256, true, false>
                                     : decode_attention_kernel<T, D, 8, 256, false, false>)
                            : decode_attention_kernel<T, D, 8, 128, false, false>;
    };
    using D64 = std::integral_constant<int, 64>;
    using D128 = std::integral_constant<int, 128>;
    if (half) return HD == 128 ? pick(static_cast<__half*>(nullptr), D128{}) : pick(static_cast<__half*>(nullptr), D64{});
    return HD == 128 ? pick(static_cast<__nv_bfloat16*>(nullptr), D128{})
                     : pick(static_cast<__nv_bfloat16*>(nullptr), D64{});
  };
  const int cl_keys = gmax == 4 ? 128 : 64;  // the CL kernels' step: one per block
  int S_cl = plan_cluster(B, Hkv, int(kv_len), cl_keys, sms, device, int(block_keys));
  if (S_cl > 0 && long(B) * Hkv * S_cl > cluster_slots(device, kernel_for(256, true), S_cl)) S_cl = 0;  // not all resident
  const int BK = block_keys > 0 ? int(block_keys) : S_cl > 0 ? cl_keys : plan_block_keys(B, Hkv, int(kv_len), sms);
  TORCH_CHECK(BK % 64 == 0 && BK >= 64 && BK <= kMaxBlockKeys,
              "decode_attention: block_keys must be a multiple of 64 in [64, ", kMaxBlockKeys, "], got ", BK);
  const int S = (int(kv_len) + BK - 1) / BK;
  const int threads = S_cl > 0 ? 256 : plan_threads(long(B) * Hkv * S, sms);
  TORCH_CHECK(S_cl > 0 || 2 * S * G <= threads / 32 * gmax * HD, "decode_attention: ", S, " key blocks of ", BK,
              " slots are too many to merge; use larger block_keys");
  at::Tensor partial;
  if (S > 1 && S_cl == 0) partial = at::empty({B, Hkv, S, G, HD + 2}, qkv.options().dtype(at::kFloat));
  AttnArgs args{qkv.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr(),
                v_cache.data_ptr(), slot.data_ptr<int64_t>(), pad.data_ptr<int64_t>(), locks.data_ptr<int>(),
                partial.defined() ? partial.data_ptr<float>() : nullptr, out.data_ptr(),
                scatter ? out_index->data_ptr<int64_t>() : nullptr, H, Hkv, G, Lmax, int(kv_len), int(window), BK,
                float(1.0 / std::sqrt(double(HD))),
                !env_off("ZEPHYR_ATTN_MERGE")};  // read per launch: the GPU test switches it in-process
  const dim3 grid(S, Hkv, B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  tl_setup(stream);
  const cudaError_t err =
      launch_kernel_clusters(kernel_for(threads, S_cl > 0), grid, dim3(threads), 0, stream, pdl_chain(device),
                             dim3(S_cl > 0 ? S : 1, 1, 1), args);
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace zephyr
