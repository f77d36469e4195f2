// Dense (fp16/bf16 weight) GEMV for decode batches: y = x @ W^T with
// x [M <= 8, K] and W [N, K] the nn.Linear weight as it is, no repacking.
//
// Why: at one to eight rows cuBLAS serves some shapes well below the copy
// bandwidth: Mistral-7B's o projection (4096 x 4096 fp16) took 20.8 us
// (1.6 TB/s) in the decode-step profile of benchmarks/profile_decode.py and
// 16.4 us alone. This kernel takes 14.8 us there (H100, 16-warp blocks), but
// only ~2.2-2.7 TB/s on the larger layers, where cuBLAS reaches 2.4-2.9: the
// runtime uses it for small float layers only (runtime.dense_gemv_rows).
//
// How: tensor cores with swapped operands, as in gptq_gemv.cuh. A block owns
// 16 rows of W (16 outputs); its warps split K into 32-wide slices. For a
// slice, lane (g = lane / 4, c = lane % 4) loads 16 bytes of row g and of row
// g + 8 of W (k = 32s + 8c .. +7) and 16 bytes of row g of x (same k): those
// are the A operands (W rows as the mma's 16 rows) and B operands (x rows as
// its 8 columns) of two m16n8k16 mma, once the mma's k index is renamed:
// mma k {2c, 2c+1} is real k {8c, 8c+1} and {2c+8, 2c+9} is {8c+2, 8c+3} in
// the first mma, {8c+4, 8c+5} and {8c+6, 8c+7} in the second. The renaming
// depends on c and the element only, so A and B agree on it in every lane,
// and the mma sums over k in any order. No shuffles, no shared memory in the
// main loop; the warps' fp32 sums meet once in shared memory at the end.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "device_info.cuh"
#include "gptq_kernels.cuh"

namespace zephyr {

constexpr int kDenseMaxM = 8;       // x rows: one n8 tile of the mma
constexpr int kDenseRows = 16;      // W rows (outputs) per block
constexpr int kDenseSliceK = 32;    // K per slice (two mma)
constexpr int kDenseUnroll = 4;     // slices whose loads are issued together

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) dense_gemv_kernel(const T* __restrict__ x,  // [M, K]
                                                                 const T* __restrict__ w,  // [N, K]
                                                                 T* __restrict__ out,      // [M, N]
                                                                 int M, int N, int K, int slices_per_warp) {
  using Tr = Traits<T>;
  __shared__ float red[WARPS][kDenseRows * kDenseMaxM];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int n0 = blockIdx.x * kDenseRows;
  // Rows past N read row 0 (valid memory); their sums are dropped.
  const int r0 = n0 + g < N ? n0 + g : 0, r1 = n0 + g + 8 < N ? n0 + g + 8 : 0;
  const uint4* w0 = reinterpret_cast<const uint4*>(w + (size_t)r0 * K + c * 8);
  const uint4* w1 = reinterpret_cast<const uint4*>(w + (size_t)r1 * K + c * 8);
  const bool has_x = g < M;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)(has_x ? g : 0) * K + c * 8);
  const int slices = K / kDenseSliceK;
  const int s_begin = min(slices, warp * slices_per_warp);
  const int s_end = min(slices, s_begin + slices_per_warp);
  constexpr int kStride = kDenseSliceK / 8;  // uint4 per slice along a row

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  auto mma_slice = [&](const uint4& a0, const uint4& a1, const uint4& b) {
    const uint32_t fa[4] = {a0.x, a1.x, a0.y, a1.y};
    Tr::mma(acc, fa, b.x, b.y);
    const uint32_t fb[4] = {a0.z, a1.z, a0.w, a1.w};
    Tr::mma(acc, fb, b.z, b.w);
  };
  // Launched as a programmatic dependent (pdl_chain in device_info.cuh), the kernel may start while
  // the kernel that writes x still runs: the first weight loads go out before the wait, x is read
  // and the output written only after it.
  pdl_launch_dependents();
  int s = s_begin;
  for (; s + kDenseUnroll <= s_end; s += kDenseUnroll) {
    uint4 a0[kDenseUnroll], a1[kDenseUnroll], b[kDenseUnroll];
#pragma unroll
    for (int u = 0; u < kDenseUnroll; ++u) {
      a0[u] = load_stream(w0 + (size_t)(s + u) * kStride);
      a1[u] = load_stream(w1 + (size_t)(s + u) * kStride);
    }
    if (s == s_begin) pdl_wait();
#pragma unroll
    for (int u = 0; u < kDenseUnroll; ++u) b[u] = has_x ? __ldg(xr + (s + u) * kStride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kDenseUnroll; ++u) mma_slice(a0[u], a1[u], b[u]);
  }
  for (; s < s_end; ++s) {
    const uint4 a0 = load_stream(w0 + (size_t)s * kStride), a1 = load_stream(w1 + (size_t)s * kStride);
    pdl_wait();  // returns at once after the first time
    const uint4 b = has_x ? __ldg(xr + s * kStride) : make_uint4(0, 0, 0, 0);
    mma_slice(a0, a1, b);
  }

  pdl_wait();  // a warp without slices still must not write before the wait
  // C fragment: acc[e] is W row g + 8 * (e >> 1), x row 2c + (e & 1).
#pragma unroll
  for (int e = 0; e < 4; ++e) red[warp][(g + 8 * (e >> 1)) * kDenseMaxM + 2 * c + (e & 1)] = acc[e];
  __syncthreads();
  for (int i = threadIdx.x; i < kDenseRows * kDenseMaxM; i += WARPS * 32) {
    const int r = i / kDenseMaxM, m = i % kDenseMaxM;
    if (m >= M || n0 + r >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) v += red[k][i];  // fixed order: deterministic
    out[(size_t)m * N + n0 + r] = Tr::from_float(v);
  }
}

// See zephyr_plugins/kernel_ops.py (zephyr::dense_gemv): x [M <= 8, K] @ weight [N, K]^T.
// block_warps: 0 = planned (16), else 4, 8 or 16 forced (benchmarks). On the H100 (benchmarks/dense_gemv.py
// --sweep, M = 1-8) 16 warps were the fastest at every Mistral-7B shape: o 14.8 us vs 17.0 (8) and 23.4 (4),
// gate_up 88 vs 108 and 116: the kernel is bound by the loads it has in flight, not by its arithmetic.
at::Tensor dense_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t block_warps) {
  TORCH_CHECK(block_warps == 0 || block_warps == 4 || block_warps == 8 || block_warps == 16,
              "dense_gemv: block_warps must be 0 (planned), 4, 8 or 16, got ", block_warps);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "dense_gemv: x must be a contiguous 2-D [M, K] tensor, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "dense_gemv: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "dense_gemv: weight must be a contiguous 2-D [N, K] tensor of x's dtype, got ", weight.scalar_type(),
              " ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M <= kDenseMaxM, "dense_gemv: serves M <= ", kDenseMaxM, " rows, got M=", M);
  TORCH_CHECK(weight.size(1) == K, "dense_gemv: weight has K=", weight.size(1), " columns but x has ", K);
  TORCH_CHECK(K % kDenseSliceK == 0, "dense_gemv: K=", K, " must be a multiple of ", kDenseSliceK);
  TORCH_CHECK(N <= INT32_MAX / 2 && K <= INT32_MAX / 2, "dense_gemv: sizes too large");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "dense_gemv: x and weight must start at 16-byte aligned addresses");
  TORCH_CHECK(weight.device() == x.device(), "dense_gemv: weight is on ", weight.device(), " but x is on ",
              x.device());
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int warps = block_warps ? int(block_warps) : 16;
  const int slices = int(K / kDenseSliceK);
  const int per_warp = (slices + warps - 1) / warps;
  const dim3 grid(unsigned((N + kDenseRows - 1) / kDenseRows));
  auto launch = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    auto* k = warps == 4 ? dense_gemv_kernel<T, 4> : (warps == 8 ? dense_gemv_kernel<T, 8> : dense_gemv_kernel<T, 16>);
    return launch_kernel(k, grid, dim3(warps * 32), stream, pdl_chain(x.get_device()), static_cast<const T*>(x.data_ptr()),
                         static_cast<const T*>(weight.data_ptr()), static_cast<T*>(out.data_ptr()), int(M), int(N),
                         int(K), per_warp);
  };
  const cudaError_t err = x.scalar_type() == at::kHalf ? launch(static_cast<__half*>(nullptr))
                                                       : launch(static_cast<__nv_bfloat16*>(nullptr));
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace zephyr
