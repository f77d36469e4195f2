// CUDA implementations of the zephyr GPTQ kernel ops.
//
// The schemas are defined in one place, zephyr_plugins/kernel_ops.py (with
// their fake and CPU reference implementations and every argument
// documented); this file only attaches the CUDA kernels to them:
//
//   zephyr::gptq_gemm_repacked(Tensor x, Tensor qweight, Tensor scales, Tensor zeros,
//                              Tensor perm, Tensor(a!) locks, int bits, int group_size,
//                              int size_n, int kernel=0, int splits=0) -> Tensor
//   zephyr::gptq_gemv_repacked(Tensor x, Tensor qweight, Tensor scales, Tensor zeros,
//                              Tensor perm, Tensor(a!) locks, int bits, int group_size,
//                              int size_n, int block_warps=0, int splits=0) -> Tensor
//   zephyr::gptq_gemv_swiglu(Tensor x, Tensor qweight, Tensor scales, Tensor zeros,
//                            Tensor perm, Tensor(a!) locks, int bits, int group_size,
//                            int size_n, Tensor? out_index=None, int block_warps=0,
//                            int splits=0) -> Tensor
//   zephyr::gptq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx,
//                           int bits, int zero_offset) -> Tensor
//   zephyr::gptq_dequantize_repacked(Tensor qweight, Tensor scales, Tensor zeros, Tensor perm,
//                                    int bits, int group_size) -> Tensor
//   zephyr::gptq_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor perm,
//                       Tensor(a!) locks, int bits, int group_size, int size_n, int gemv_max_m,
//                       int fused_max_m) -> Tensor
//   zephyr::decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache,
//                            Tensor(b!) v_cache, Tensor slot, Tensor pad, Tensor(c!) locks,
//                            int n_heads, int n_kv_heads, int kv_len, int window,
//                            int block_keys=0, Tensor? out_index=None) -> Tensor
//   zephyr::dense_gemv(Tensor x, Tensor weight, int block_warps=0) -> Tensor
//   zephyr::add_rms_norm_permuted(Tensor x, Tensor h, Tensor weight, float eps, Tensor perm)
//                                 -> (Tensor, Tensor)
#include <ATen/ATen.h>
#include <torch/library.h>

namespace zephyr {
at::Tensor gptq_gemm_repacked_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks,
                                   int64_t bits, int64_t group_size, int64_t size_n, int64_t kernel,
                                   int64_t splits);
at::Tensor gptq_gemv_repacked_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks,
                                   int64_t bits, int64_t group_size, int64_t size_n, int64_t block_warps,
                                   int64_t splits);
at::Tensor gptq_gemv_swiglu_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks, int64_t bits,
                                 int64_t group_size, int64_t size_n, const c10::optional<at::Tensor>& out_index,
                                 int64_t block_warps, int64_t splits);
at::Tensor gptq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                                const at::Tensor& g_idx, int64_t bits, int64_t zero_offset);
at::Tensor gptq_dequantize_repacked_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                                         const at::Tensor& perm, int64_t bits, int64_t group_size);
at::Tensor gptq_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks, int64_t bits,
                            int64_t group_size, int64_t size_n, int64_t gemv_max_m, int64_t fused_max_m);
at::Tensor decode_attention_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot,
                                 const at::Tensor& pad, at::Tensor& locks, int64_t n_heads, int64_t n_kv_heads,
                                 int64_t kv_len, int64_t window, int64_t block_keys,
                                 const c10::optional<at::Tensor>& out_index);
at::Tensor dense_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t block_warps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_permuted_cuda(const at::Tensor& x, const at::Tensor& h,
                                                              const at::Tensor& weight, double eps,
                                                              const at::Tensor& perm);
}  // namespace zephyr

TORCH_LIBRARY_IMPL(zephyr, CUDA, m) {
  m.impl("gptq_gemm_repacked", &zephyr::gptq_gemm_repacked_cuda);
  m.impl("gptq_gemv_repacked", &zephyr::gptq_gemv_repacked_cuda);
  m.impl("gptq_gemv_swiglu", &zephyr::gptq_gemv_swiglu_cuda);
  m.impl("gptq_dequantize", &zephyr::gptq_dequantize_cuda);
  m.impl("gptq_dequantize_repacked", &zephyr::gptq_dequantize_repacked_cuda);
  m.impl("gptq_linear", &zephyr::gptq_linear_cuda);
  m.impl("decode_attention", &zephyr::decode_attention_cuda);
  m.impl("dense_gemv", &zephyr::dense_gemv_cuda);
  m.impl("add_rms_norm_permuted", &zephyr::add_rms_norm_permuted_cuda);
}
