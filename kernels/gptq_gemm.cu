// Launchers and argument checks of the GPTQ CUDA ops. The op schemas are
// defined in one place, zephyr_plugins/kernel_ops.py; bindings.cpp registers
// these functions as their CUDA implementations.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "device_info.cuh"
#include "gptq_gemv.cuh"
#include "gptq_launch.cuh"
#include "gptq_tiled.cuh"

namespace zephyr {

namespace {

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Sizes of one call on the zk layout, after the argument checks.
struct ZkShape {
  int M, K, N, Kp, Np, G, group_rows;
  bool has_z;
};

// Checks of the zk weight tensors alone (`op` names the op in messages).
void check_zk_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kInt && qweight.is_contiguous() &&
                  qweight.size(1) % 8 == 0,
              op, ": qweight must be contiguous int32 [Np/64, Kp/16, 32*bits], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(qweight.size(2) == 32 * bits, op, ": qweight.size(2)=", qweight.size(2),
              " but bits=", bits, " needs ", 32 * bits);
  const int64_t Np = qweight.size(0) * kBlockN;
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == Np && scales.is_contiguous() &&
                  (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16),
              op, ": scales must be contiguous float16/bfloat16 [G, ", Np, "], got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(zeros.numel() == 0 || (zeros.sizes() == scales.sizes() && zeros.scalar_type() == scales.scalar_type() &&
                                     zeros.is_contiguous()),
              op, ": zeros must be empty or like scales ", scales.sizes(), ", got ", zeros.sizes());
  TORCH_CHECK(group_size == -1 || group_size >= 1, op, ": group_size must be -1 or positive, got ", group_size);
  TORCH_CHECK(scales.device() == qweight.device() && (zeros.numel() == 0 || zeros.device() == qweight.device()),
              op, ": all tensors must be on ", qweight.device());
}

// Checks shared by the fused and the GEMV op (`op` names the op in messages).
ZkShape check_zk_args(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, const at::Tensor& perm, const at::Tensor& locks, int64_t bits,
                      int64_t group_size, int64_t size_n, int max_m, const char* above) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float16 or bfloat16, got ", x.scalar_type());
  const int M = x.size(0), K = x.size(1), N = size_n;
  TORCH_CHECK(M <= max_m, op, ": x has M=", M, " rows; this kernel serves M <= ", max_m, " (", above, ")");
  check_zk_weight(op, qweight, scales, zeros, bits, group_size);
  const int Np = qweight.size(0) * kBlockN, Kp = qweight.size(1) * 16;
  TORCH_CHECK(Kp >= K && Kp < K + kChunkK, op, ": qweight covers Kp=", Kp,
              " rows but x has K=", K, " (Kp must be K rounded up to a multiple of 128)");
  TORCH_CHECK(Np >= N && Np < N + kBlockN, op, ": qweight covers Np=", Np,
              " columns but size_n=", N);
  TORCH_CHECK(scales.scalar_type() == x.scalar_type(), op, ": scales must be ", x.scalar_type(), " like x, got ",
              scales.scalar_type());
  const int G = scales.size(0);
  const bool has_z = zeros.numel() > 0;
  TORCH_CHECK(perm.numel() == 0 ||
                  (perm.dim() == 1 && perm.size(0) == K && perm.scalar_type() == at::kInt && perm.is_contiguous()),
              op, ": perm must be empty or int32 [K=", K, "], contiguous, got ", perm.scalar_type(), " ",
              perm.sizes(), perm.numel() && !perm.is_contiguous() ? " (not contiguous)" : "");
  TORCH_CHECK(locks.dim() == 1 && locks.size(0) >= Np / kBlockN && locks.scalar_type() == at::kInt,
              op, ": locks must be int32 [>= ", Np / kBlockN, "] zeros, got ", locks.sizes());
  const int group_rows = group_size == -1 ? K : int(group_size);
  // A lane's 32 rows of a chunk must lie in one group (see gptq_kernels.cuh).
  TORCH_CHECK(group_size == -1 || group_rows == 32 || group_rows == 64 || group_rows % kChunkK == 0,
              op, ": group_size=", group_size, " not served (allowed: -1, 32, 64, multiples of 128)");
  TORCH_CHECK(G == (K + group_rows - 1) / group_rows, op, ": scales has ", G,
              " groups but K=", K, ", group_size=", group_size, " needs ", (K + group_rows - 1) / group_rows);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qweight, &scales, &perm, &locks})
    TORCH_CHECK(t->numel() == 0 || t->device() == x.device(), op, ": all tensors must be on ", x.device());
  return ZkShape{M, K, N, Kp, Np, G, group_rows, has_z};
}

// A forced choice from environment variable `name` (benchmarks, A/B runs): its value when that is a
// power of two up to `max`, else 0 (not forced).
int forced_from_env(const char* name, int max) {
  const char* e = std::getenv(name);
  const int v = e ? std::atoi(e) : 0;
  return v > 0 && v <= max && (v & (v - 1)) == 0 ? v : 0;
}

// A GX row override from environment variable `name`: its value clamped to [0, kGemvGxMaxM], or -1
// when it is unset or empty (the callers below read it once per process).
int gx_rows_from_env(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return -1;
  return std::max(0, std::min(kGemvGxMaxM, std::atoi(e)));
}

// Most rows of act-order x for which the GEMV kernel gathers x itself (GX, see gptq_gemv.cuh) rather
// than after a gather_pad_kernel launch: 1 for 4-bit weights, none for 8-bit. H100, sums over the four
// Mistral shapes, 4-bit g128 act-order, same run: M = 1 52.4 us vs 58.5 with the gather kernel (in
// order, then: 52.5), but M = 2 60.0 vs 59.0, M = 4 63.3 vs 60.9, M = 8 83.2 vs 63.9 (8-bit M = 8: 112.7
// vs 90.7): every column block gathers its own copy of x, M scattered loads per element. 8-bit at M = 1
// gained nothing (87.2 / 87.6 vs 87.4 / 87.9) and in the full run at 7f267f6 read 90.7 us, against
// 86.1 at M = 2 on the gather kernel. ZEPHYR_GEMV_GX_MAX_M overrides it for both (0: never; at most
// kGemvGxMaxM; read once per process), for A/B runs and tests.
int gemv_gx_max_m(int bits) {
  static const int v = gx_rows_from_env("ZEPHYR_GEMV_GX_MAX_M");
  return v >= 0 ? v : (bits == 4 ? 1 : 0);
}

// The same for x in order (no permutation; in our runtime's decode steps every layer's input is, the
// act-order permutations being folded into the producers), where staging costs contiguous loads
// only: 4 for 4-bit weights, 0 for 8-bit. H100, same machine (ZEPHYR_GEMV_GX_INORDER_MAX_M 8 vs 0):
// 4-bit g128 sums over the Mistral shapes M = 1 48.2 vs 52.8 / 53.8 us, M = 2 50.8 vs 54.5, M = 4
// 52.4 vs 55.2 / 56.2, M = 8 57.8 vs 58.0 / 59.5; end to end (benchmarks/e2e.py --quick) 4-bit
// batch 1 420.6 / 419.3 vs 389.4 / 404.5 tok/s, but batch 8 2,511 / 2,520 vs 2,613 / 2,613 and
// 8-bit batch 1 286.5 / 287.7 vs 290.8 / 290.4, batch 8 1,915 vs 2,039 / 2,045.
// ZEPHYR_GEMV_GX_INORDER_MAX_M overrides it for both (0: x read in place, or copied if it must be padded).
int gemv_gx_inorder_max_m(int bits) {
  static const int v = gx_rows_from_env("ZEPHYR_GEMV_GX_INORDER_MAX_M");
  return v >= 0 ? v : (bits == 4 ? 4 : 0);
}

// x as the kernels read it: [M, Kp] rows of 16-byte aligned, zero-padded,
// act-order-gathered columns. Only a plain, 128-aligned x is read in place.
// Returns the tensor to read and sets `pdl` when the kernel that follows may
// be launched as a programmatic dependent of the gather (sm_90).
// zk: in zk order (gather_pad_kernel<T, true>), for the wgmma kernel; always a copy.
at::Tensor gather_x(const at::Tensor& x, const at::Tensor& perm, int K, int Kp, cudaStream_t stream, bool& pdl,
                    bool zk = false) {
  pdl = false;
  const bool direct =
      !zk && perm.numel() == 0 && K == Kp && reinterpret_cast<uintptr_t>(x.data_ptr()) % kXAlign == 0;
  if (direct) return x;
  const int M = x.size(0);
  at::Tensor xg = at::empty({M, Kp}, x.options());
  dim3 grid(ceil_div(Kp, 256), M);
  const int* p = perm.numel() ? perm.data_ptr<int>() : nullptr;
  // A programmatic dependent of the kernel before it where the decode-step chain is on.
  const bool dep = pdl_chain(x.get_device());
  cudaError_t err;
  if (x.scalar_type() == at::kHalf) {
    auto* k = zk ? gather_pad_kernel<__half, true> : gather_pad_kernel<__half, false>;
    err = launch_kernel(k, grid, dim3(256), stream, dep, reinterpret_cast<const __half*>(x.data_ptr()), p,
                        reinterpret_cast<__half*>(xg.data_ptr()), K, Kp);
  } else {
    auto* k = zk ? gather_pad_kernel<__nv_bfloat16, true> : gather_pad_kernel<__nv_bfloat16, false>;
    err = launch_kernel(k, grid, dim3(256), stream, dep, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), p,
                        reinterpret_cast<__nv_bfloat16*>(xg.data_ptr()), K, Kp);
  }
  C10_CUDA_CHECK(err);
  pdl = cc_major(x.get_device()) >= 9;
  return xg;
}

// gather_tiles_smem_kernel where x's rows are 16-byte vectors and perm's pairs 8-byte aligned, else
// gather_tiles_kernel. R rows per block: 8, or fewer where 8 do not fit in 116 KB (two blocks per SM)
// or give fewer than two blocks per SM; then splits of the chunks up to two blocks per SM.
template <typename T>
cudaError_t launch_gather_tiles(const T* x, const int* perm, T* xt, int M, int K, int Kp, int rows, long padded,
                                int device, cudaStream_t stream, bool dep) {
  const long target = 2L * sm_count(device);
  int R = 8;
  while (R > 1 && (long(R) * (K + 8) * 2 > 116 * 1024 || padded / R < target)) R /= 2;
  const long row_blocks = padded / R;
  const int chunks = Kp / kChunkK;
  const int cps = ceil_div(chunks, int(std::min<long>(chunks, (target + row_blocks - 1) / row_blocks)));
  const size_t smem = size_t(R) * (K + 8) * 2 + 16;  // the rows, then an mbarrier (bulk copies)
  // Beyond the default 48 KB, up to the device's opt-in limit (227 KB on the H100), to which the
  // kernel's limit is raised once (a failed raise is cleared, so that no later launch reports it).
  const size_t max_smem = size_t(cached_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, 48 * 1024));
  static const bool raised = [max_smem] {
    if (cudaFuncSetAttribute(gather_tiles_smem_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(max_smem)) == cudaSuccess)
      return true;
    (void)cudaGetLastError();
    return false;
  }();
  // sm_90: the rows reach shared memory by bulk copies (ZEPHYR_GATHER_BULK=0, read once: the
  // threads' 16-byte loads, for A/B runs).
  static const bool bulk_off = env_off("ZEPHYR_GATHER_BULK");
  const bool bulk = !bulk_off && cc_major(device) >= 9;
  const bool aligned = K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(perm) % 8 == 0;
  if (aligned && (smem <= 48 * 1024 || (raised && smem <= max_smem))) {
    return launch_kernel_smem(gather_tiles_smem_kernel<T>, dim3(unsigned(row_blocks), unsigned(ceil_div(chunks, cps))),
                              dim3(256), smem, stream, dep, x, perm, xt, M, K, Kp, rows, R, cps, int(bulk));
  }
  const int units = int(padded * Kp / 8);
  return launch_kernel(gather_tiles_kernel<T>, dim3(unsigned(ceil_div(units, 256))), dim3(256), stream, dep, x, perm,
                       xt, M, K, Kp, rows, units);
}

// x as the WS kernel reads it: its x tiles of `rows` rows, a copy always. Sets `pdl` as gather_x does.
at::Tensor gather_x_tiles(const at::Tensor& x, const at::Tensor& perm, int K, int Kp, int rows, cudaStream_t stream,
                          bool& pdl) {
  const int M = x.size(0);
  const long padded = long(ceil_div(M, rows)) * rows;
  TORCH_CHECK(padded * Kp / 8 < INT_MAX, "gptq_gemm_repacked: x has too many elements for the WS kernel (", M, " x ",
              Kp, ")");
  at::Tensor xt = at::empty({padded, Kp}, x.options());
  const int* p = perm.numel() ? perm.data_ptr<int>() : nullptr;
  const int device = x.get_device();
  const bool dep = pdl_chain(device);
  const cudaError_t err =
      x.scalar_type() == at::kHalf
          ? launch_gather_tiles(reinterpret_cast<const __half*>(x.data_ptr()), p,
                                reinterpret_cast<__half*>(xt.data_ptr()), M, K, Kp, rows, padded, device, stream, dep)
          : launch_gather_tiles(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), p,
                                reinterpret_cast<__nv_bfloat16*>(xt.data_ptr()), M, K, Kp, rows, padded, device,
                                stream, dep);
  C10_CUDA_CHECK(err);
  pdl = cc_major(device) >= 9;
  return xt;
}

}  // namespace

namespace {

// Whether the wgmma variant of the tiled kernel can run on `device`: an
// sm_90 card, and a build that included sm_90a (kernel_build.py defines
// ZEPHYR_HAVE_SM90A then).
bool tiled_wgmma_available(int device) {
#ifdef ZEPHYR_HAVE_SM90A
  return cc_major(device) == 9 && cc_minor(device) == 0;
#else
  (void)device;
  return false;
#endif
}

// The tiled kernel (gptq_tiled.cuh) for any M; variant: kTiledMma, kTiledWg or kTiledWs.
// splits: 0 = planned, else forced (benchmarks).
at::Tensor tiled_gemm(const at::Tensor& x, const ZkShape& z, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks, int bits, int splits,
                      int variant) {
  const bool wg = variant != kTiledMma;  // the wgmma variants: row tiles of 32 or 64 rows
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty({z.M, z.N}, x.options());
  if (z.M == 0 || z.N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool half = x.scalar_type() == at::kHalf;
  // ZEPHYR_TILED_MT=1/2/4/8 (benchmarks) forces the row tile (16 x that many rows) where M allows it
  // (8: the WS variant's two warpgroups of 64 rows).
  static const int force_mt = forced_from_env("ZEPHYR_TILED_MT", 8);
  // ZEPHYR_WS_WGS=1/2 (benchmarks) forces the WS kernel's MMA warpgroups per block where the row tile has
  // that variant (two at 128 rows always; one or two at 32 and 64 rows).
  static const int force_wgs = forced_from_env("ZEPHYR_WS_WGS", 2);
  auto occupancy = [&](int mt, int wgs) {
    if (half)
      return bits == 4 ? gptq_tiled_occupancy<__half, 4>(mt, z.has_z, variant, wgs)
                       : gptq_tiled_occupancy<__half, 8>(mt, z.has_z, variant, wgs);
    return bits == 4 ? gptq_tiled_occupancy<__nv_bfloat16, 4>(mt, z.has_z, variant, wgs)
                     : gptq_tiled_occupancy<__nv_bfloat16, 8>(mt, z.has_z, variant, wgs);
  };
  // Plan: row tile (16*MT rows) and split S along K. Cost in microseconds,
  // calibrated on the H100 (benchmarks/kernels.py, ZEPHYR_TILED_MT forced):
  // a block's 128-row chunk takes ~3.2 us at MT = 4 (2 blocks per SM) and
  // ~2.3 us at MT <= 2 (3 per SM); waves x (chunks per block + ~2 of pipeline
  // fill and epilogue) x that, plus the split's partial round trip (~2.0 /
  // 1.5 us per slice). With these, the plan was the faster of MT = 2 and 4 on
  // all four Mistral shapes at M = 64 and 128. Splits need a lock per (row
  // tile, column group).
  const int chunks = z.Kp / kChunkK, groups = ceil_div(z.Np / kBlockN, kTiledWarps);
  const int sms = sm_count(x.get_device());
  // The wgmma variants have row tiles of 32 or 64 rows, WS also of 128 (two warpgroups) above 64 rows.
  const int mt_fit = variant == kTiledWs && z.M > 64 ? 8 : tiled_mt(z.M);
  const int mt_max = std::max(wg ? 2 : 1, force_mt ? std::min(force_mt, mt_fit) : mt_fit);
  int mt = mt_max, S = 1, cpb = std::max(chunks, 1);
  double best = -1;
  // WS: row tiles of 32, 64 or 128 rows, each block two MMA warpgroups that split its columns, each
  // tile with its own cost terms (microseconds), fitted to sweeps of forced row tiles and splits on the
  // H100 (4-bit g128 act-order, the four Mistral shapes, S = 1, 2, 3, 4, 6, 8, splits of 2/4/8 through
  // clusters where they fit: ab_H100_2026-11-28/ws_plan_sweep_2wg.log): per wave of blocks, chunks x
  // `chunk` + `block` (pipeline fill, epilogue), with a split also `partial` (its sum) and `slice` per
  // slice, plus `launch` once. Over the sweep the model's pick is within 2% of the fastest forced plan
  // in the sum over the four shapes at every M (M = 16-1024). 32-row tiles are fitted up to 64 rows, so
  // they are not tried above; 128-row tiles only above 64 rows.
  // One warpgroup per block at 32 and 64 rows (ZEPHYR_WS_WGS=1, for A/B runs) keeps the plan it had
  // before: its own fitted terms above 64 rows (ws_plan_sweep.log), the older per-chunk cost below.
  struct WsCost {
    double chunk, block, partial, slice, launch;
  };
  constexpr WsCost kWs128{1.63, 4.85, 4.84, 1.97, -6.14}, kWs64x2{1.12, 2.00, 3.85, 1.20, -0.48},
      kWs32x2{0.87, 1.48, 2.54, 0.59, 2.53}, kWs64x1{1.29, 0.12, 5.21, 1.21, 1.97};
  // ZEPHYR_WS_CLUSTER_SUM=0 (read once; A/B and tests) keeps every WS split on partials in global memory.
  static const bool cluster_off = env_off("ZEPHYR_WS_CLUSTER_SUM");
  const bool ws_cluster = variant == kTiledWs && !cluster_off;
  int wgs = 1;
  // WS: two warpgroups per block, or one at 32 and 64 rows where forced (ZEPHYR_WS_WGS=1); the 128-row
  // tile has only two. Other variants: one.
  const int want_wgs = force_wgs ? force_wgs : 2;
  auto wgs_for = [&](int m) {
    return variant != kTiledWs ? 1 : ws_config_exists(m, want_wgs) ? want_wgs : 3 - want_wgs;
  };
  for (int mt_try : {8, 4, 2, 1}) {
    if (mt_try > mt_max || (force_mt && mt_try != mt_max) || (mt_try == 1 && (mt_max > 1 || wg))) continue;
    if (variant == kTiledWs && z.M > 64 && mt_try < 4) continue;
    const int wgs_try = wgs_for(mt_try);
    if (variant == kTiledWs && !ws_config_exists(mt_try, wgs_try)) continue;
    const int tiles = ceil_div(z.M, 16 * mt_try) * groups;
    const int slots = sms * occupancy(mt_try, wgs_try);
    // The fitted WS terms, or (other variants; WS with one warpgroup up to 64 rows) one cost per
    // block-chunk: for WS from its forced row tiles at M = 1024 (gate_up, 4-bit, H100), ~3.7 us at 32
    // rows (2 blocks per SM) and ~1.75 at 64.
    const WsCost* fitted = variant != kTiledWs ? nullptr
                           : mt_try == 8       ? &kWs128
                           : wgs_try == 2      ? (mt_try == 4 ? &kWs64x2 : &kWs32x2)
                           : mt_try == 4 && z.M > 64 ? &kWs64x1
                                                     : nullptr;
    const double t_chunk = variant == kTiledWs ? (mt_try == 4 ? 1.75 : 3.7) : (mt_try == 4 ? 3.2 : 2.3);
    const double t_split = mt_try >= 4 ? 2.0 : 1.5;
    // A lock per (row tile, column group) and warpgroup.
    const int s_max = (chunks > 1 && tiles * wgs_try <= locks.size(0)) ? std::min(chunks, 64) : 1;
    for (int s_try = splits ? std::min(splits, s_max) : 1; s_try <= s_max; ++s_try) {
      const int c_try = ceil_div(chunks, s_try);
      const int s_real = c_try ? ceil_div(chunks, c_try) : 1;
      const int waves = ceil_div(tiles * s_real, slots);
      const double cost =
          fitted ? waves * (c_try * fitted->chunk + fitted->block) +
                       (s_real > 1 ? waves * fitted->partial + s_real * fitted->slice : 0) + fitted->launch
                 : waves * (c_try + 2) * t_chunk + (s_real > 1 ? s_real * t_split : 0);
      if (best < 0 || cost < best) best = cost, mt = mt_try, wgs = wgs_try, S = s_real, cpb = std::max(c_try, 1);
      if (splits) break;
    }
  }
  bool pdl = false;
  const at::Tensor xg = variant == kTiledWs ? gather_x_tiles(x, perm, z.K, z.Kp, 16 * mt, stream, pdl)
                                            : gather_x(x, perm, z.K, z.Kp, stream, pdl, wg);
  // WS with S = 2, 4 or 8: the S blocks of a tile form a cluster and sum through their shared memory
  // (no partials in global memory, no locks; gptq_tiled.cuh), where that takes no more waves of blocks
  // than the partials do (clusters sit within a GPC: fewer may fit at once). Same plan either way: the
  // cluster sum, at the same split, was the faster wherever its grid fit (ws_cluster_sum.log).
  bool cluster = false;
  if (ws_cluster && (S == 2 || S == 4 || S == 8)) {
    int cslots;
    if (half)
      cslots = bits == 4 ? gptq_ws_cluster_slots<__half, 4>(mt, z.has_z, S, wgs)
                         : gptq_ws_cluster_slots<__half, 8>(mt, z.has_z, S, wgs);
    else
      cslots = bits == 4 ? gptq_ws_cluster_slots<__nv_bfloat16, 4>(mt, z.has_z, S, wgs)
                         : gptq_ws_cluster_slots<__nv_bfloat16, 8>(mt, z.has_z, S, wgs);
    const long blocks = long(ceil_div(z.M, 16 * mt)) * groups * S;
    const long slots = long(sms) * occupancy(mt, wgs);
    cluster = cslots > 0 && (blocks + cslots - 1) / cslots <= (blocks + slots - 1) / slots;
  }
  // Split partials: S x (row tiles x column groups) tiles of 16*mt x 256 fp32 (gptq_tiled.cuh).
  at::Tensor partial;
  if (S > 1 && !cluster)
    partial = at::empty({S, long(ceil_div(z.M, 16 * mt)) * groups * 16 * mt * kTiledWarps * kBlockN},
                        x.options().dtype(at::kFloat));
  TiledArgs args{xg.data_ptr(), qweight.data_ptr(), scales.data_ptr(), z.has_z ? zeros.data_ptr() : nullptr,
                 S > 1 && !cluster ? partial.data_ptr<float>() : nullptr, locks.data_ptr<int>(), out.data_ptr(),
                 z.M, z.N, z.Kp, z.Np, z.G, z.group_rows, cpb, S, mt, wgs, variant, pdl, cluster, stream};
  cudaError_t err;
  if (half)
    err = bits == 4 ? gptq_tiled_launch<__half, 4>(args) : gptq_tiled_launch<__half, 8>(args);
  else
    err = bits == 4 ? gptq_tiled_launch<__nv_bfloat16, 4>(args) : gptq_tiled_launch<__nv_bfloat16, 8>(args);
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace

// See zephyr_plugins/kernel_ops.py for the schema and the meaning of each argument.
// kernel: 0 = planned (the fused small-M kernel for M <= kSmallMaxM, else the tiled one: its wgmma
// variant where available), 1 = the fused small-M kernel (M <= 64), 2 = the tiled kernel (mma.sync),
// 3 = its wgmma variant (sm_90a), 4 = its warp-specialized wgmma variant (WS, sm_90a). splits (tiled
// kernels only): 0 = planned, else forced.
at::Tensor gptq_gemm_repacked_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks,
                                   int64_t bits, int64_t group_size, int64_t size_n, int64_t kernel,
                                   int64_t splits) {
  TORCH_CHECK(kernel >= 0 && kernel <= 4,
              "gptq_gemm_repacked: kernel must be 0 (planned), 1 (small), 2 (tiled), 3 (tiled, wgmma) or 4 (tiled, "
              "warp-specialized wgmma), got ", kernel);
  TORCH_CHECK(kernel < 3 || !x.is_cuda() || tiled_wgmma_available(x.get_device()), "gptq_gemm_repacked: kernel=",
              kernel, " (wgmma) needs an sm_90 card and kernels built for sm_90a (ZEPHYR_CUDA_ARCHS with 90a)");
  TORCH_CHECK(splits >= 0 && splits <= 256, "gptq_gemm_repacked: splits must be in [0, 256], got ", splits);
  TORCH_CHECK(x.dim() == 2, "gptq_gemm_repacked: x must be 2-D [M, K], got ", x.sizes());
  const bool small = kernel == 1 || (kernel == 0 && x.size(0) <= kSmallMaxM);
  const ZkShape z = check_zk_args("gptq_gemm_repacked", x, qweight, scales, zeros, perm, locks, bits, group_size,
                                  size_n, small ? 16 * kMaxMTiles : INT32_MAX, "the tiled kernel, kernel=2, serves any M");
  // Planned, on sm_90 with an sm_90a build: the warp-specialized wgmma variant (WS) above 16 rows, for
  // both widths (the history of that threshold and the figures behind it: kernels/README.md). Since WS
  // blocks have two MMA warpgroups at 32 and 64 rows too (2026-11-28), WS at M = 24 took ~92 us over the
  // four Mistral shapes (4-bit g128 act-order, H100) against ~103 for the GEMV kernel. In a layer the
  // GEMV kernel still serves M <= gemv_max_m (gptq_linear); the rows below it reach here only as direct calls.
  const bool ws_planned = kernel == 0 && z.M > 16 && tiled_wgmma_available(x.get_device());
  const int variant = kernel == 4 || ws_planned ? kTiledWs : (kernel == 3 ? kTiledWg : kTiledMma);
  if (!small) return tiled_gemm(x, z, qweight, scales, zeros, perm, locks, int(bits), int(splits), variant);
  const int M = z.M, K = z.K, N = z.N, Kp = z.Kp, Np = z.Np, G = z.G, group_rows = z.group_rows;
  const bool has_z = z.has_z;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int mt = M <= 16 ? 1 : (M <= 32 ? 2 : 4);
  auto stream = c10::cuda::getCurrentCUDAStream();
  bool pdl = false;
  const at::Tensor xg = gather_x(x, perm, K, Kp, stream, pdl);

  const int chunks = Kp / kChunkK, nblk = Np / kBlockN;
  auto occupancy = [&](bool pf) {
    if (x.scalar_type() == at::kHalf)
      return bits == 4 ? gptq_gemm_small_occupancy<__half, 4>(mt, has_z, pf)
                       : gptq_gemm_small_occupancy<__half, 8>(mt, has_z, pf);
    return bits == 4 ? gptq_gemm_small_occupancy<__nv_bfloat16, 4>(mt, has_z, pf)
                     : gptq_gemm_small_occupancy<__nv_bfloat16, 8>(mt, has_z, pf);
  };
  // Pick the split S of K minimizing (waves of resident blocks) x (chunks of
  // the busiest warp + about one chunk of fixed cost per block): a partial
  // last wave leaves the memory system idle. Returns {cost, S, cpb}.
  auto plan = [&](int occ) {
    const int slots = sm_count(x.get_device()) * occ;
    std::array<long, 3> best = {-1, 1, chunks};
    for (int s_try = 1; s_try <= std::min(chunks, 64); ++s_try) {
      const int c_try = ceil_div(chunks, s_try);
      const int s_real = ceil_div(chunks, c_try);
      const long cost = long(ceil_div(nblk * s_real, slots)) * (ceil_div(c_try, kWarps) + 1);
      if (best[0] < 0 || cost < best[0]) best = {cost, s_real, c_try};
    }
    return best;
  };
  auto p = plan(occupancy(false));
  // The prefetching variant (one m-tile only) costs occupancy; on the H100 it
  // paid off only for 8-bit weights on long layers (gate_up: 54 vs 61 us) and
  // lost 5-15% on every 4-bit shape. ZEPHYR_CUDA_PREFETCH=0/1 forces it off/on.
  static const int pf_env = [] {
    const char* e = std::getenv("ZEPHYR_CUDA_PREFETCH");
    return e ? std::atoi(e) : -1;
  }();
  const bool pf = mt == 1 && (pf_env == 1 || (pf_env != 0 && bits == 8 &&
                                              long(nblk) * chunks >= 64L * sm_count(x.get_device())));
  if (pf) p = plan(occupancy(true));
  const int S = int(p[1]), cpb = int(p[2]);
  at::Tensor partial;
  if (S > 1) partial = at::empty({S, M, Np}, x.options().dtype(at::kFloat));
  SmallArgs args{xg.data_ptr(), qweight.data_ptr(), scales.data_ptr(), has_z ? zeros.data_ptr() : nullptr,
                 S > 1 ? partial.data_ptr<float>() : nullptr, locks.data_ptr<int>(), out.data_ptr(),
                 M, N, Kp, Np, G, group_rows, cpb, S, mt, pf, pdl, stream};
  cudaError_t err;
  if (x.scalar_type() == at::kHalf)
    err = bits == 4 ? gptq_gemm_small_launch<__half, 4>(args) : gptq_gemm_small_launch<__half, 8>(args);
  else
    err = bits == 4 ? gptq_gemm_small_launch<__nv_bfloat16, 4>(args)
                    : gptq_gemm_small_launch<__nv_bfloat16, 8>(args);
  C10_CUDA_CHECK(err);
  return out;
}

namespace {

// gptq_gemv_repacked (swiglu false) and gptq_gemv_swiglu (true: out [M, N / 2] = silu(gate) * up of the
// product's two halves, column j at out_index[j] when given).
at::Tensor gemv_repacked(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks, int64_t bits,
                         int64_t group_size, int64_t size_n, int64_t block_warps, int64_t splits, bool swiglu,
                         const int64_t* out_index) {
  const ZkShape z = check_zk_args(op, x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                                  swiglu ? kGemvSwigluMaxM : kGemvMaxM, "use gptq_gemm_repacked above");
  const int max_warps = gemv_max_warps(gemv_tiles(z.M));
  TORCH_CHECK(block_warps == 0 || ((block_warps == 4 || block_warps == 8 || block_warps == 16) && block_warps <= max_warps),
              op, ": block_warps must be 0 (planned), 4, 8 or 16 (16 for M <= 8 only), got ", block_warps, " at M=",
              z.M);
  TORCH_CHECK(splits >= 0 && splits <= 256, op, ": splits must be in [0, 256], got ", splits);
  TORCH_CHECK(!swiglu || (z.N % (2 * kBlockN) == 0), op, ": size_n must be a multiple of ", 2 * kBlockN,
              " (two halves of whole 64-column blocks), got ", z.N);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty({z.M, swiglu ? z.N / 2 : z.N}, x.options());
  if (z.M == 0 || z.N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // With >= 128-row groups a chunk has one scale per column: applied after the
  // mma, in fp32, once per unit. It needs a second set of accumulators, so one
  // or two x tiles only (M <= 16). At two tiles it paid off for 8-bit weights
  // (H100, sums over the Mistral shapes, same run: M = 9 / 12 / 16 96.0 /
  // 98.0 / 101.5 us vs 111.2 / 115.4 / 122.6 scaling each weight) and for
  // 4-bit up to M = 12 (M = 9: -4.7%, 12: -2.6%, 16: +1.1%).
  const int nt = gemv_tiles(z.M);
  const bool scale_after =
      (z.group_rows % kChunkK == 0 || z.G == 1) && (nt == 1 || (nt == 2 && (bits == 8 || z.M <= 12)));
  const bool half = x.scalar_type() == at::kHalf;
  auto occupancy = [&](int w) {
    if (half)
      return bits == 4 ? gptq_gemv_occupancy<__half, 4>(z.M, w, z.has_z, scale_after, swiglu)
                       : gptq_gemv_occupancy<__half, 8>(z.M, w, z.has_z, scale_after, swiglu);
    return bits == 4 ? gptq_gemv_occupancy<__nv_bfloat16, 4>(z.M, w, z.has_z, scale_after, swiglu)
                     : gptq_gemv_occupancy<__nv_bfloat16, 8>(z.M, w, z.has_z, scale_after, swiglu);
  };
  // Plan: W warps per block, `upw` 4 KB units per warp, S blocks per column
  // block. Cost = waves of resident blocks x (units per warp + ~2 units of
  // fixed cost: launch, first round trip, reduction) + 5 when split over
  // blocks (the partial + lock round trip). The 5 is measured: on the H100 a
  // sweep of forced plans (benchmarks/kernels.py --sweep) found S = 1 best
  // for qkv and o (e.g. qkv 4-bit 10.1 us vs 10.9 at S = 2; o 8-bit 10.1 vs
  // 10.5 at S = 4) and S = 4 best for down (16.4 us vs 22.8 at S = 1); this
  // model picks the measured best plan (within 0.3 us) for all four shapes,
  // 4- and 8-bit, M = 1 and 8. Ties keep the larger block.
  // 16-warp blocks (one x tile only) are a candidate only unsplit and with at
  // most 4 units per warp (qkv and o): there a 16-warp block has a column
  // block's whole slice in flight at once (H100 sweep at M = 1, act-order:
  // o 4-bit 9.0 us vs 9.6 at 8 warps, 8-bit 9.3 vs 9.9; qkv 10.1 vs 10.35).
  // Elsewhere the model overrates them (down 4-bit: 19.3 us at 16 x 1 vs
  // 16.6 at 8 warps x 4 splits), as it prices neither the SMs a 64-block
  // grid leaves idle nor the per-SM dequantization work.
  //
  // SWIGLU: a block holds a pair of column blocks (gate, up), half of its warps on each: priced as
  // nblk / 2 blocks of w warps, w / 2 warps per column block (so the per-warp work matches an
  // unfused plan of w / 2-warp blocks), without the 16-warp rule (the pair has twice the work).
  const int units = (z.Kp / kChunkK) * int(bits / 4), nblk = swiglu ? z.Np / kBlockN / 2 : z.Np / kBlockN;
  const int sms = sm_count(x.get_device());
  long best = -1;
  int W = 8, upw = units, S = 1;
  for (int w : {16, 8, 4}) {
    if (w > max_warps || (block_warps && w != block_warps)) continue;
    if (!swiglu && w == 16 && !block_warps && units > 4 * 16) continue;
    const int hw = swiglu ? w / 2 : w;  // warps per column block
    const int slots = sms * occupancy(w);
    const int most = ceil_div(units, hw);
    for (int s_try = splits ? std::min<int>(splits, most) : 1; s_try <= most; ++s_try) {
      if (!swiglu && w == 16 && !block_warps && s_try > 1) break;
      const int u = ceil_div(units, hw * s_try);
      const int s_real = ceil_div(units, hw * u);
      const long cost = long(ceil_div(nblk * s_real, slots)) * (u + 2) + (s_real > 1 ? 5 : 0);
      if (best < 0 || cost < best) best = cost, W = w, upw = u, S = s_real;
      if (splits) break;
    }
  }
  // x staged by the kernel itself (GX: each warp gathers or copies its K-slice into shared memory once)
  // instead of read in place (in order) or from a copy gathered by gather_pad_kernel, where M is small
  // enough for the case (act-order: scattered loads, gemv_gx_max_m; in order: contiguous ones) and the
  // warps' regions fit in the shared memory the block can have without fewer blocks per SM.
  const int xs_chunks = std::min(gemv_gx_chunks(upw, int(bits)), z.Kp / kChunkK);
  bool gx = false;
  const int gx_max = perm.numel() ? gemv_gx_max_m(int(bits)) : gemv_gx_inorder_max_m(int(bits));
  if (z.M <= gx_max && reinterpret_cast<uintptr_t>(perm.numel() ? perm.data_ptr() : nullptr) % 16 == 0) {
    const long bytes = long(gemv_gx_smem_bytes(W, z.M, xs_chunks, x.element_size()));
    int cap;
    if (half)
      cap = bits == 4 ? gptq_gemv_gx_smem_cap<__half, 4>(z.M, W, z.has_z, scale_after, swiglu)
                      : gptq_gemv_gx_smem_cap<__half, 8>(z.M, W, z.has_z, scale_after, swiglu);
    else
      cap = bits == 4 ? gptq_gemv_gx_smem_cap<__nv_bfloat16, 4>(z.M, W, z.has_z, scale_after, swiglu)
                      : gptq_gemv_gx_smem_cap<__nv_bfloat16, 8>(z.M, W, z.has_z, scale_after, swiglu);
    gx = bytes <= cap;
  }
  bool pdl = false;
  const at::Tensor xg = gx ? x : gather_x(x, perm, z.K, z.Kp, stream, pdl);
  pdl = pdl || pdl_chain(x.get_device());
  at::Tensor partial;
  if (S > 1) partial = at::empty({S, z.M, z.Np}, x.options().dtype(at::kFloat));
  GemvArgs args{xg.data_ptr(), gx && perm.numel() ? perm.data_ptr<int>() : nullptr, qweight.data_ptr(),
                scales.data_ptr(), z.has_z ? zeros.data_ptr() : nullptr, S > 1 ? partial.data_ptr<float>() : nullptr,
                locks.data_ptr<int>(), out.data_ptr(), out_index, z.M, z.N, z.K, z.Kp, z.Np, z.G, z.group_rows,
                upw, S, W, scale_after, gx, xs_chunks, swiglu, pdl, stream};
  cudaError_t err;
  if (half)
    err = bits == 4 ? gptq_gemv_launch<__half, 4>(args) : gptq_gemv_launch<__half, 8>(args);
  else
    err = bits == 4 ? gptq_gemv_launch<__nv_bfloat16, 4>(args) : gptq_gemv_launch<__nv_bfloat16, 8>(args);
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace

// See zephyr_plugins/kernel_ops.py. block_warps / splits: 0 = planned here, else forced (benchmarks).
at::Tensor gptq_gemv_repacked_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks,
                                   int64_t bits, int64_t group_size, int64_t size_n, int64_t block_warps,
                                   int64_t splits) {
  return gemv_repacked("gptq_gemv_repacked", x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                       block_warps, splits, false, nullptr);
}

// See zephyr_plugins/kernel_ops.py: silu(gate) * up of the GEMV's two output halves, in its epilogue.
// block_warps counts both halves' warps (8 or 16; 4 at M > 8 is allowed too); splits as above.
at::Tensor gptq_gemv_swiglu_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks, int64_t bits,
                                 int64_t group_size, int64_t size_n, const c10::optional<at::Tensor>& out_index,
                                 int64_t block_warps, int64_t splits) {
  const bool scatter = out_index.has_value() && out_index->defined();
  TORCH_CHECK(!scatter || (out_index->scalar_type() == at::kLong && out_index->dim() == 1 &&
                           out_index->numel() == size_n / 2 && out_index->is_contiguous() &&
                           out_index->device() == x.device()),
              "gptq_gemv_swiglu: out_index must be contiguous int64 [size_n / 2] on x's device");
  return gemv_repacked("gptq_gemv_swiglu", x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                       block_warps, splits, true, scatter ? out_index->data_ptr<int64_t>() : nullptr);
}

namespace {

// Launch the zk dequantize kernel into out [Kp, Np] (rows k < K at perm[k] when perm is given).
void launch_dequantize_zk(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                          const at::Tensor& perm, int bits, int group_size, at::Tensor& out, cudaStream_t stream) {
  const int Kp = qweight.size(1) * 16, Np = qweight.size(0) * kBlockN, G = scales.size(0);
  if (Kp == 0 || Np == 0) return;  // nothing to write (an empty grid is a launch error)
  const int group_rows = group_size == -1 ? Kp : int(group_size);
  const dim3 grid(Kp / kChunkK, Np / kBlockN);
  const bool has_z = zeros.numel() > 0;
  const int* p = perm.numel() ? perm.data_ptr<int>() : nullptr;
  const int K = perm.numel() ? int(perm.size(0)) : Kp;
#define ZK_DQ(T, B)                                                                                          \
  gptq_dequantize_zk_kernel<T, B><<<grid, 128, 0, stream>>>(                                                 \
      reinterpret_cast<const uint4*>(qweight.data_ptr()), reinterpret_cast<const T*>(scales.data_ptr()),     \
      has_z ? reinterpret_cast<const T*>(zeros.data_ptr()) : nullptr, p, reinterpret_cast<T*>(out.data_ptr()), \
      K, Kp, Np, G, group_rows)
  if (scales.scalar_type() == at::kHalf) {
    if (bits == 4) ZK_DQ(__half, 4); else ZK_DQ(__half, 8);
  } else {
    if (bits == 4) ZK_DQ(__nv_bfloat16, 4); else ZK_DQ(__nv_bfloat16, 8);
  }
#undef ZK_DQ
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// See zephyr_plugins/kernel_ops.py: the zk layout dequantized to scales.dtype [Kp, Np].
at::Tensor gptq_dequantize_repacked_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                                         const at::Tensor& perm, int64_t bits, int64_t group_size) {
  check_zk_weight("gptq_dequantize_repacked", qweight, scales, zeros, bits, group_size);
  const int Kp = qweight.size(1) * 16, Np = qweight.size(0) * kBlockN;
  TORCH_CHECK(perm.numel() == 0 || (perm.dim() == 1 && perm.scalar_type() == at::kInt && perm.is_contiguous() &&
                                    perm.size(0) <= Kp && perm.size(0) > Kp - kChunkK &&
                                    perm.device() == qweight.device()),
              "gptq_dequantize_repacked: perm must be empty or int32 [K] (Kp - 128 < K <= Kp=", Kp, ") on ",
              qweight.device(), ", got ", perm.scalar_type(), " ", perm.sizes());
  TORCH_CHECK(scales.size(0) >= 1 || Kp == 0, "gptq_dequantize_repacked: scales has no groups for Kp=", Kp, " rows");
  const c10::cuda::OptionalCUDAGuard guard(qweight.device());
  auto out = at::empty({Kp, Np}, scales.options());
  launch_dequantize_zk(qweight, scales, zeros, perm, int(bits), int(group_size), out,
                       c10::cuda::getCurrentCUDAStream());
  return out;
}

// One linear layer, the path chosen by M at run time (see kernel_ops.py): traced by torch.compile or
// captured in a graph it stays one op, so a graph traced at one M serves every M. Large M: x @ the zk
// weight dequantized into x's row order (rows scattered by perm), in cuBLAS.
at::Tensor gptq_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, const at::Tensor& perm, at::Tensor& locks, int64_t bits,
                            int64_t group_size, int64_t size_n, int64_t gemv_max_m, int64_t fused_max_m) {
  TORCH_CHECK(x.dim() == 2, "gptq_linear: x must be 2-D [M, K], got ", x.sizes());
  const int64_t M = x.size(0);
  if (M <= std::min<int64_t>(gemv_max_m, kGemvMaxM))
    return gptq_gemv_repacked_cuda(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, 0, 0);
  if (M <= fused_max_m)
    return gptq_gemm_repacked_cuda(x, qweight, scales, zeros, perm, locks, bits, group_size, size_n, 0, 0);
  const ZkShape z = check_zk_args("gptq_linear", x, qweight, scales, zeros, perm, locks, bits, group_size, size_n,
                                  INT32_MAX, "");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor w = at::empty({z.Kp, z.Np}, x.options());
  launch_dequantize_zk(qweight, scales, zeros, perm, int(bits), int(group_size), w,
                       c10::cuda::getCurrentCUDAStream());
  return at::mm(x, w.narrow(0, 0, z.K).narrow(1, 0, z.N));
}

at::Tensor gptq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                                const at::Tensor& g_idx, int64_t bits, int64_t zero_offset) {
  TORCH_CHECK(bits == 4 || bits == 8, "gptq_dequantize: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() &&
                  (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16),
              "gptq_dequantize: scales must be contiguous float16/bfloat16 [G, N], got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.scalar_type() == at::kInt && g_idx.is_contiguous(),
              "gptq_dequantize: g_idx must be int32 [K], got ", g_idx.scalar_type(), " ", g_idx.sizes());
  const int K = g_idx.size(0), N = scales.size(1), G = scales.size(0);
  const int per = 32 / bits;
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(0) == (K + per - 1) / per && qweight.size(1) == N &&
                  qweight.scalar_type() == at::kInt && qweight.is_contiguous(),
              "gptq_dequantize: qweight must be contiguous int32 [", (K + per - 1) / per, ", ", N, "], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == G && qzeros.size(1) == (N + per - 1) / per &&
                  qzeros.scalar_type() == at::kInt && qzeros.is_contiguous(),
              "gptq_dequantize: qzeros must be contiguous int32 [", G, ", ", (N + per - 1) / per, "], got ",
              qzeros.sizes());
  for (const at::Tensor* t : {&qzeros, &scales, &g_idx})
    TORCH_CHECK(t->device() == qweight.device(), "gptq_dequantize: all tensors must be on ", qweight.device());
  const c10::cuda::OptionalCUDAGuard guard(qweight.device());
  auto out = at::empty({K, N}, scales.options());
  if (K == 0 || N == 0) return out;
  const bool vec = N % 4 == 0;
  dim3 block(256), grid(ceil_div(vec ? N / 4 : N, 256), qweight.size(0));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int zo = int(zero_offset);
#define ZK_DEQ(T, B, V)                                                                                \
  gptq_dequantize_kernel<T, B, V><<<grid, block, 0, stream>>>(                                         \
      qweight.data_ptr<int>(), qzeros.data_ptr<int>(), reinterpret_cast<const T*>(scales.data_ptr()), \
      g_idx.data_ptr<int>(), reinterpret_cast<T*>(out.data_ptr()), K, N, zo)
  const bool half = scales.scalar_type() == at::kHalf;
  if (half && bits == 4 && vec) { ZK_DEQ(__half, 4, 4); }
  else if (half && bits == 4) { ZK_DEQ(__half, 4, 1); }
  else if (half && vec) { ZK_DEQ(__half, 8, 4); }
  else if (half) { ZK_DEQ(__half, 8, 1); }
  else if (bits == 4 && vec) { ZK_DEQ(__nv_bfloat16, 4, 4); }
  else if (bits == 4) { ZK_DEQ(__nv_bfloat16, 4, 1); }
  else if (vec) { ZK_DEQ(__nv_bfloat16, 8, 4); }
  else { ZK_DEQ(__nv_bfloat16, 8, 1); }
#undef ZK_DEQ
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace zephyr
