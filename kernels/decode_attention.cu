// One decode step of attention in one kernel: rotary embedding of q and k,
// the KV-cache write of the new token, and grouped-query attention over the
// cache (split along the keys, flash-decoding style, merged by the last block).
//
// Schema (defined with its CPU reference in zephyr_plugins/kernel_ops.py):
//
//   zephyr::decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache,
//                            Tensor(b!) v_cache, Tensor slot, Tensor pad, Tensor(c!) locks,
//                            int n_heads, int n_kv_heads, int kv_len, int window,
//                            int block_keys=0) -> Tensor
//
// Unfused, this is ~7 kernels per layer (rope, two cache writes, two batched
// matmuls, the masked softmax, a copy); inside a CUDA graph each costs a
// launch slot of ~1-2 us, which at batch 1 is more than the work.
//
// Grid: (key blocks S, kv heads, rows). A block owns `block_keys` cache slots
// of one (row, kv head) and all G = H / Hkv query heads that share it:
//   1. q of the G heads, rotated in fp32 and rounded to the activation type
//      (as the unfused path does), scaled by 1/sqrt(hd), into shared memory.
//      The block whose slots hold `slot` also rotates k and writes k, v there.
//   2. Scores: lanes split a key's hd elements (16 bytes each); the G dot
//      products are reduced with shuffles. Masked keys are never read: a row
//      sees slots [lo, slot] with lo = max(pad, slot - window + 1), and always
//      itself (kv_cache.attention_mask's rule).
//   3. Softmax over the block's keys (max, exp, sum), then P @ V.
//   4. With S > 1, every block writes (unnormalized output, max, sum) to an
//      fp32 scratch buffer; the last block of the (row, kv head), counted in
//      `locks` (self-resetting), merges them in key order: deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace zephyr {

namespace {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kMaxGroup = 8;       // query heads per kv head served
constexpr int kMaxBlockKeys = 512;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
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
  int H, Hkv, G, Lmax, kv_len, window, block_keys;
  float scale;
};

template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(const AttnArgs a) {
  constexpr int kLanesPerKey = HD / 8;             // 16-byte slices of one key
  constexpr int kKeysPerStep = 32 / kLanesPerKey;  // keys per warp and step
  constexpr int kCols = HD / 8, kRows = kAttnThreads / kCols;  // P @ V thread layout
  const int s = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, S = gridDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = a.G, BK = a.block_keys;

  const int slot = int(*a.slot);
  int lo = int(a.pad[b]);
  if (a.window > 0) lo = max(lo, slot - a.window + 1);
  lo = min(lo, slot);
  const int c0 = s * BK, c1 = min(c0 + BK, a.kv_len);
  const int j0 = max(c0, lo), nk = min(c1, slot + 1) - j0;  // this block's keys: [j0, j0 + nk)

  extern __shared__ float smem[];
  float* q_s = smem;                      // [G][HD]
  float* p_s = q_s + G * HD;              // [G][BK] scores, then probabilities
  float* red = p_s + G * BK;              // [kAttnWarps][G][HD] P @ V partial sums
  float* ml = red + kAttnWarps * G * HD;  // [G][2] max, sum
  __shared__ int last_block;

  const size_t head_off = size_t(b * a.Hkv + hk) * a.Lmax * HD;
  T* kc = reinterpret_cast<T*>(a.k_cache) + head_off;
  T* vc = reinterpret_cast<T*>(a.v_cache) + head_off;

  if (nk > 0) {
    const T* row = reinterpret_cast<const T*>(a.qkv) + size_t(b) * (a.H + 2 * a.Hkv) * HD;
    const float* cs = a.cos + size_t(b) * (HD / 2);
    const float* sn = a.sin + size_t(b) * (HD / 2);
    for (int i = tid; i < G * HD; i += kAttnThreads) {
      const int g = i / HD, d = i % HD;
      q_s[i] = to_float(from_float<T>(rotate<T, HD>(row + (hk * G + g) * HD, d, cs, sn))) * a.scale;
    }
    if (slot >= c0 && slot < c1) {  // this block writes the new token's k and v
      const T* kh = row + (a.H + hk) * HD;
      const T* vh = row + (a.H + a.Hkv + hk) * HD;
      for (int d = tid; d < HD; d += kAttnThreads) {
        kc[size_t(slot) * HD + d] = from_float<T>(rotate<T, HD>(kh, d, cs, sn));
        vc[size_t(slot) * HD + d] = vh[d];
      }
    }
    __syncthreads();  // q in shared memory; the cache write visible to the block

    // Scores. Lane: key kk of the step, elements [dl * 8, dl * 8 + 8).
    const int dl = lane % kLanesPerKey, kk = lane / kLanesPerKey;
    float qr[kMaxGroup][8];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        qr[g][e] = 0.f;
        if (g < G) qr[g][e] = q_s[g * HD + dl * 8 + e];
      }
    for (int base = warp * kKeysPerStep; base < nk; base += kAttnWarps * kKeysPerStep) {
      const int jj = base + kk;
      float acc[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
      if (jj < nk) {
        const uint4 raw = *reinterpret_cast<const uint4*>(kc + size_t(j0 + jj) * HD + dl * 8);
        const T* kv = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float kf = to_float(kv[e]);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) acc[g] = fmaf(qr[g][e], kf, acc[g]);
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
#pragma unroll
        for (int o = kLanesPerKey / 2; o > 0; o >>= 1) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], o);
        if (jj < nk && dl == 0) p_s[g * BK + jj] = acc[g];
      }
    }
    __syncthreads();

    // Softmax over the block's keys: warp w takes heads w, w + 4, ...
    for (int g = warp; g < G; g += kAttnWarps) {
      float m = -INFINITY;
      for (int j = lane; j < nk; j += 32) m = fmaxf(m, p_s[g * BK + j]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float l = 0.f;
      for (int j = lane; j < nk; j += 32) {
        const float e = expf(p_s[g * BK + j] - m);
        p_s[g * BK + j] = e;
        l += e;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      if (lane == 0) ml[2 * g] = m, ml[2 * g + 1] = l;
    }
    __syncthreads();

    // P @ V: thread (row r, column c) sums keys r, r + kRows, ... over elements [c * 8, c * 8 + 8).
    const int c = tid % kCols, r = tid / kCols;
    float o[kMaxGroup][8];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) o[g][e] = 0.f;
#pragma unroll 2
    for (int jj = r; jj < nk; jj += kRows) {
      const uint4 raw = *reinterpret_cast<const uint4*>(vc + size_t(j0 + jj) * HD + c * 8);
      const T* vv = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
        const float p = p_s[g * BK + jj];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[g][e] = fmaf(p, to_float(vv[e]), o[g][e]);
      }
    }
    // Rows within a warp (lanes c, c + kCols, ...) by shuffles, then the warps in shared memory.
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= G) break;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
#pragma unroll
        for (int off = kCols; off < 32; off <<= 1) o[g][e] += __shfl_xor_sync(0xffffffffu, o[g][e], off);
        if (lane < kCols) red[(warp * G + g) * HD + c * 8 + e] = o[g][e];
      }
    }
    __syncthreads();
    for (int i = tid; i < G * HD; i += kAttnThreads) {
      const int g = i / HD, d = i % HD;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kAttnWarps; ++w) v += red[(w * G + g) * HD + d];
      if (S == 1) {
        reinterpret_cast<T*>(a.out)[size_t(b) * a.H * HD + (hk * G + g) * HD + d] = from_float<T>(v / ml[2 * g + 1]);
      } else {
        float* part = a.partial + ((size_t(b * a.Hkv + hk) * S + s) * G + g) * (HD + 2);
        part[d] = v;
        if (d == 0) part[HD] = ml[2 * g], part[HD + 1] = ml[2 * g + 1];
      }
    }
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
  if (!last_block) return;
  __threadfence();
  const int s_lo = lo / BK, s_hi = min(slot, a.kv_len - 1) / BK;
  for (int i = tid; i < G * HD; i += kAttnThreads) {
    const int g = i / HD, d = i % HD;
    const float* part = a.partial + (size_t(b * a.Hkv + hk) * S * G + g) * (HD + 2);
    const size_t stride = size_t(G) * (HD + 2);
    float m = -INFINITY;
    for (int t = s_lo; t <= s_hi; ++t) m = fmaxf(m, __ldcg(part + t * stride + HD));
    float num = 0.f, den = 0.f;
    for (int t = s_lo; t <= s_hi; ++t) {
      const float w = expf(__ldcg(part + t * stride + HD) - m);
      num += w * __ldcg(part + t * stride + d);
      den += w * __ldcg(part + t * stride + HD + 1);
    }
    reinterpret_cast<T*>(a.out)[size_t(b) * a.H * HD + (hk * G + g) * HD + d] = from_float<T>(num / den);
  }
}

size_t attn_smem_bytes(int G, int HD, int BK) {
  return sizeof(float) * (size_t(G) * HD + size_t(G) * BK + size_t(kAttnWarps) * G * HD + 2 * G);
}

// Keys per block: the largest power of two in [32, 512] that still gives
// every SM two blocks (fewer, longer blocks waste less on the merge).
int plan_block_keys(int B, int Hkv, int kv_len, int sms) {
  int bk = kMaxBlockKeys;
  while (bk > 32 && long(B) * Hkv * ((kv_len + bk - 1) / bk) < 2L * sms) bk /= 2;
  return bk;
}

}  // namespace

// See zephyr_plugins/kernel_ops.py for the schema and the meaning of each argument.
at::Tensor decode_attention_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot,
                                 const at::Tensor& pad, at::Tensor& locks, int64_t n_heads, int64_t n_kv_heads,
                                 int64_t kv_len, int64_t window, int64_t block_keys) {
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
  const c10::cuda::OptionalCUDAGuard guard(qkv.device());
  auto out = at::empty({B, H * HD}, qkv.options());
  if (B == 0) return out;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, qkv.get_device()));
  const int BK = block_keys > 0 ? int(block_keys) : plan_block_keys(B, Hkv, int(kv_len), sms);
  TORCH_CHECK(BK % 32 == 0 && BK >= 32 && BK <= kMaxBlockKeys, "decode_attention: block_keys must be a multiple of 32 in [32, ",
              kMaxBlockKeys, "], got ", BK);
  const int S = (int(kv_len) + BK - 1) / BK;
  at::Tensor partial;
  if (S > 1) partial = at::empty({B, Hkv, S, G, HD + 2}, qkv.options().dtype(at::kFloat));
  AttnArgs args{qkv.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr(),
                v_cache.data_ptr(), slot.data_ptr<int64_t>(), pad.data_ptr<int64_t>(), locks.data_ptr<int>(),
                S > 1 ? partial.data_ptr<float>() : nullptr, out.data_ptr(),
                H, Hkv, G, Lmax, int(kv_len), int(window), BK, float(1.0 / std::sqrt(double(HD)))};
  const dim3 grid(S, Hkv, B);
  const size_t smem = attn_smem_bytes(G, HD, BK);
  auto stream = c10::cuda::getCurrentCUDAStream();
#define ZK_ATTN(T, D) decode_attention_kernel<T, D><<<grid, kAttnThreads, smem, stream>>>(args)
  const bool half = qkv.scalar_type() == at::kHalf;
  if (half && HD == 128) { ZK_ATTN(__half, 128); }
  else if (half) { ZK_ATTN(__half, 64); }
  else if (HD == 128) { ZK_ATTN(__nv_bfloat16, 128); }
  else { ZK_ATTN(__nv_bfloat16, 64); }
#undef ZK_ATTN
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace zephyr
