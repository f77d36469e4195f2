// Residual add + RMSNorm whose output is written in an act-order layer's row
// order: s = x + h, y = (rms_norm(s) * weight)[..., perm], one block per row.
//
// Why: in decode steps the norms write the input of the next act-order layer
// already permuted (ModelOps.permuted_inputs), so that layer skips its gather.
// Compiled by Inductor that is two kernels, 3.2 us for one row of 4096 on the
// H100 (decode-step profile, benchmarks/profile_decode.py), 63 times a step.
// A Triton kernel reading x and h at permuted positions was no faster
// (3.6-3.8 us, norm_kernel.py): the gather is what costs. Here the row is read
// once, coalesced; the normalized row is staged in shared memory and the
// permutation becomes a shared-memory gather before a coalesced store.
//
// Arithmetic of the reference (model_ops.add_rms_norm): the sum rounded to
// the activation type, the mean of squares in fp32, the normalized value
// rounded to the activation type, then times the weight in that type.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "device_info.cuh"   // pdl_chain
#include "timeline.cuh"      // TlProbe: empty unless built with ZEPHYR_KERNEL_TIMELINE=1
#include "gptq_kernels.cuh"  // Traits<T>: conversions to and from fp32; launch_kernel_smem, pdl_wait

namespace zephyr {

namespace {

constexpr int kNormThreads = 512;
constexpr int kNormMaxDim = 16384;  // the staged row: 32 KB of shared memory at 16 bits

// Rows of D (a multiple of 8) values; 16-byte aligned x, h, weight, s and y.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) add_rms_norm_permuted_kernel(
    const T* __restrict__ x, const T* __restrict__ h, const T* __restrict__ weight,
    const int64_t* __restrict__ perm, T* __restrict__ s_out, T* __restrict__ y_out, int D, float eps) {
  using Tr = Traits<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* row_buf = reinterpret_cast<T*>(smem_raw);  // [D]: s, then the normalized row
  __shared__ float warp_sums[kNormThreads / 32];
  const size_t base = (size_t)blockIdx.x * D;
  const int vecs = D / 8;

  // The permutation of this thread's output vector(s). In the common case (D <= 8 * threads: one
  // vector per thread) it is requested first, so its latency hides behind the row's.
  auto load_perm = [&](int v, int64_t (&p)[8]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const longlong2 pp = __ldg(reinterpret_cast<const longlong2*>(perm) + v * 4 + q);
      p[2 * q] = pp.x;
      p[2 * q + 1] = pp.y;
    }
  };
  // Launched as a programmatic dependent (pdl_chain in device_info.cuh), this kernel may start
  // while the kernel that writes h still runs, and the layer after it may be scheduled as soon as
  // this one starts: only the permutation and the weight (fixed) are read before the wait.
  TlProbe probe(3, D);  // timeline stamp 1 (diagnostic builds only): after the wait
  pdl_launch_dependents();
  const bool one_vec = vecs <= kNormThreads;
  int64_t pre[8];
  uint4 w_pre = make_uint4(0, 0, 0, 0);
  if (one_vec && int(threadIdx.x) < vecs) {
    load_perm(threadIdx.x, pre);
    w_pre = __ldg(reinterpret_cast<const uint4*>(weight) + threadIdx.x);
  }
  // In a branch of its own (D is never 0): with the wait right after the loads, ptxas moved them
  // below it (sm_90a SASS: no load above ACQBULK), where they waited for the kernel that writes h.
  // test_norm_fixed_loads_stay_above_the_wait (tests/test_cuda_backend_cpu.py) checks the order.
  if (D > 0) pdl_wait();
  probe.mark(1);

  float ss = 0.f;
  for (int v = threadIdx.x; v < vecs; v += kNormThreads) {
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + base) + v);
    const uint4 hv = __ldg(reinterpret_cast<const uint4*>(h + base) + v);
    const T* xe = reinterpret_cast<const T*>(&xv);
    const T* he = reinterpret_cast<const T*>(&hv);
    uint4 sv;
    T* se = reinterpret_cast<T*>(&sv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      se[e] = __hadd(xe[e], he[e]);  // rounded to T, as the reference's x + h
      const float f = Tr::to_float(se[e]);
      ss += f * f;
    }
    reinterpret_cast<uint4*>(s_out + base)[v] = sv;
    reinterpret_cast<uint4*>(row_buf)[v] = sv;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];  // same order in every thread
  const float rstd = rsqrtf(total / float(D) + eps);

  // Each thread rescales the vectors it staged itself (no barrier needed before).
  for (int v = threadIdx.x; v < vecs; v += kNormThreads) {
    uint4 sv = reinterpret_cast<uint4*>(row_buf)[v];
    const uint4 wv = one_vec ? w_pre : __ldg(reinterpret_cast<const uint4*>(weight) + v);
    T* se = reinterpret_cast<T*>(&sv);
    const T* we = reinterpret_cast<const T*>(&wv);
#pragma unroll
    for (int e = 0; e < 8; ++e) se[e] = __hmul(Tr::from_float(Tr::to_float(se[e]) * rstd), we[e]);
    reinterpret_cast<uint4*>(row_buf)[v] = sv;
  }
  __syncthreads();
  for (int v = threadIdx.x; v < vecs; v += kNormThreads) {
    int64_t p[8];
    if (one_vec) {
#pragma unroll
      for (int e = 0; e < 8; ++e) p[e] = pre[e];
    } else {
      load_perm(v, p);
    }
    uint4 out;
    T* oe = reinterpret_cast<T*>(&out);
    // An index outside [0, D) (not a permutation: the caller's bug) reads element 0, never past the row.
#pragma unroll
    for (int e = 0; e < 8; ++e) oe[e] = row_buf[uint64_t(p[e]) < uint64_t(D) ? p[e] : 0];
    reinterpret_cast<uint4*>(y_out + base)[v] = out;
  }
}

}  // namespace

// See zephyr_plugins/kernel_ops.py (zephyr::add_rms_norm_permuted).
std::tuple<at::Tensor, at::Tensor> add_rms_norm_permuted_cuda(const at::Tensor& x, const at::Tensor& h,
                                                              const at::Tensor& weight, double eps,
                                                              const at::Tensor& perm) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && h.is_contiguous() && x.sizes() == h.sizes(),
              "add_rms_norm_permuted: x and h must be contiguous tensors of one shape, got ", x.sizes(), " and ",
              h.sizes());
  TORCH_CHECK((x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) && h.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              "add_rms_norm_permuted: x, h and weight must share one dtype, float16 or bfloat16");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= kNormMaxDim, "add_rms_norm_permuted: the last dimension must be a multiple "
              "of 8 up to ", kNormMaxDim, ", got ", D);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.is_contiguous(),
              "add_rms_norm_permuted: weight must be contiguous [", D, "], got ", weight.sizes());
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == D && perm.scalar_type() == at::kLong && perm.is_contiguous(),
              "add_rms_norm_permuted: perm must be contiguous int64 [", D, "], got ", perm.scalar_type(), " ",
              perm.sizes());
  for (const at::Tensor* t : {&h, &weight, &perm})
    TORCH_CHECK(t->device() == x.device(), "add_rms_norm_permuted: all tensors must be on ", x.device());
  for (const at::Tensor* t : {&x, &h, &weight, &perm})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "add_rms_norm_permuted: x, h, weight and perm must start at 16-byte aligned addresses");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor s = at::empty_like(x), y = at::empty_like(x);
  const int64_t rows = x.numel() / D;
  if (rows == 0) return {s, y};
  TORCH_CHECK(rows <= INT32_MAX, "add_rms_norm_permuted: too many rows");
  auto stream = c10::cuda::getCurrentCUDAStream();
  tl_setup(stream);
  const size_t smem = size_t(D) * x.element_size();
  const bool pdl = pdl_chain(x.get_device());
  auto launch = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return launch_kernel_smem(add_rms_norm_permuted_kernel<T>, dim3(unsigned(rows)), dim3(kNormThreads), smem,
                              stream, pdl, static_cast<const T*>(x.data_ptr()), static_cast<const T*>(h.data_ptr()),
                              static_cast<const T*>(weight.data_ptr()), perm.data_ptr<int64_t>(),
                              static_cast<T*>(s.data_ptr()), static_cast<T*>(y.data_ptr()), int(D), float(eps));
  };
  const cudaError_t err = x.scalar_type() == at::kHalf ? launch(static_cast<__half*>(nullptr))
                                                       : launch(static_cast<__nv_bfloat16*>(nullptr));
  C10_CUDA_CHECK(err);
  return {s, y};
}

}  // namespace zephyr
