// Per-block timelines of the decode step's kernels, for diagnosis only: compiled in when the kernels
// are built with ZEPHYR_KERNEL_TIMELINE=1 (zephyr_plugins/kernel_build.py adds -DZEPHYR_TIMELINE and
// keys the cache on it); otherwise TlProbe and tl_setup are empty and the kernels are unchanged.
//
// A kernel makes a TlProbe(tag, n) at entry (stamp 0: %globaltimer, ns), marks stamps 1-4 where it
// likes, and when the block exits, thread 0 appends one 64-byte record to the buffer whose device
// address is in ZEPHYR_TIMELINE_PTR: a uint64 array, [0] the record count (zeroed by the caller),
// records from [8]: stamps 0-4, the exit time, then (tag | block << 32) and (smid | n << 32).
// benchmarks/decode_timeline.py allocates the buffer and reads the records back.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

namespace zephyr {
namespace {

#ifdef ZEPHYR_TIMELINE
__device__ unsigned long long* g_timeline = nullptr;  // one per translation unit (set by tl_setup)
constexpr unsigned long long kTimelineMax = 1ull << 18;  // records

__device__ __forceinline__ unsigned long long tl_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

struct TlProbe {
  unsigned long long t[6];
  int tag, n;
  __device__ __forceinline__ TlProbe(int tag_, int n_) : tag(tag_), n(n_) {
#pragma unroll
    for (int i = 1; i < 6; ++i) t[i] = 0;
    t[0] = tl_now();
  }
  __device__ __forceinline__ void mark(int i) { t[i] = tl_now(); }
  __device__ __forceinline__ ~TlProbe() {
    unsigned long long* buf = g_timeline;
    if (threadIdx.x != 0 || buf == nullptr) return;
    t[5] = tl_now();
    const unsigned long long i = atomicAdd(buf, 1ull);
    if (i >= kTimelineMax) return;
    unsigned long long* r = buf + 8 + i * 8;
#pragma unroll
    for (int k = 0; k < 6; ++k) r[k] = t[k];
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    const unsigned blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    r[6] = (unsigned long long)(unsigned)tag | ((unsigned long long)blk << 32);
    r[7] = (unsigned long long)smid | ((unsigned long long)(unsigned)n << 32);
  }
};

// Points this translation unit's kernels at the buffer, once, at its first launch outside stream
// capture (a copy to a symbol cannot be captured): run one step eagerly before capturing graphs.
inline void tl_setup(cudaStream_t stream) {
  static bool done = false;
  if (done) return;
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &st) != cudaSuccess || st != cudaStreamCaptureStatusNone) return;
  done = true;
  const char* e = std::getenv("ZEPHYR_TIMELINE_PTR");
  if (e == nullptr) return;
  unsigned long long* p = reinterpret_cast<unsigned long long*>(std::strtoull(e, nullptr, 0));
  cudaMemcpyToSymbolAsync(g_timeline, &p, sizeof p, 0, cudaMemcpyHostToDevice, stream);
  cudaStreamSynchronize(stream);
}
#else
struct TlProbe {
  __device__ __forceinline__ TlProbe(int, int) {}
  __device__ __forceinline__ void mark(int) {}
};
inline void tl_setup(cudaStream_t) {}
#endif

}  // namespace
}  // namespace zephyr
