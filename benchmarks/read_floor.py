"""The pure-read floor: how fast can any kernel read a layer-sized weight on this card?

Reads 8, 12.5, 29 and 58 MiB (about the 4-bit o, qkv, down and gate_up weights of Mistral-7B) from copies
rotated past the L2, timed like ``benchmarks/kernels.py`` (median of CUDA-graph replays), with two kernels
that only load (16-byte ``ld.global.nc``, no L1 allocation) and XOR what they load:

- ``gs``: grid-stride, ``D`` loads in flight per thread, 264-1056 blocks of 512 threads (the floor);
- ``wc``: the GEMV kernel's access pattern, each warp one contiguous slice, ``D`` x 512 bytes in flight,
  with 1, 2 or 4 blocks per 64-column block of the layer and 8, 16 or 32 warps per block.

Needs CuPy (for NVRTC; the H100 image has it). Prints the times; nothing is written. Results:
``benchmarks/results/ab_H100_2026-11-27/read_floor.log`` and ``kernels/README.md``.

Usage::

    python -W ignore benchmarks/read_floor.py
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import cupy as cp
except ImportError:  # pragma: no cover - GPU machine only
    raise SystemExit("read_floor.py needs CuPy (NVRTC) on the GPU machine")

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from kernels import copies_for, time_graph

if not torch.cuda.is_available():
    raise SystemExit("read_floor.py needs a CUDA GPU")
print(torch.cuda.get_device_name(), flush=True)
SRC = r'''
__device__ __forceinline__ uint4 ldnc(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// grid-stride, D loads in flight per thread
extern "C" __global__ void gs(const uint4* __restrict__ p, long long n, uint4* sink) {
  long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (long long i = tid; i < n; i += stride * D) {
    uint4 v[D];
#pragma unroll
    for (int d = 0; d < D; ++d) v[d] = (i + d * stride < n) ? ldnc(p + i + d * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int d = 0; d < D; ++d) { acc.x ^= v[d].x; acc.y ^= v[d].y; acc.z ^= v[d].z; acc.w ^= v[d].w; }
  }
  if (acc.x == 0x9E3779B9u && acc.y == 1u) sink[0] = acc;
}
// warp-contiguous slices: warp w of the grid reads slice w (per_warp uint4s), D x 512 B in flight
extern "C" __global__ void wc(const uint4* __restrict__ p, long long n, uint4* sink, int per_warp) {
  const int lane = threadIdx.x & 31;
  long long w = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  const uint4* base = p + w * per_warp + lane;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int i = 0; i < per_warp; i += 32 * D) {
    uint4 v[D];
#pragma unroll
    for (int d = 0; d < D; ++d) v[d] = (w * per_warp + i + 32 * d + lane < n && i + 32 * d < per_warp) ? ldnc(base + i + 32 * d) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int d = 0; d < D; ++d) { acc.x ^= v[d].x; acc.y ^= v[d].y; acc.z ^= v[d].z; acc.w ^= v[d].w; }
  }
  if (acc.x == 0x9E3779B9u && acc.y == 1u) sink[0] = acc;
}
'''
mods = {D: cp.RawModule(code=SRC, options=("-DD=%d" % D, "-std=c++17")) for D in (4, 8, 16)}
sms = torch.cuda.get_device_properties(0).multi_processor_count
sink = torch.zeros(4, dtype=torch.int32, device="cuda")

def launch(fn, grid, block, args):
    with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        fn((grid,), (block,), args)


for nbytes, nblk in ((8 << 20, 64), (12 << 20 | 512 << 10, 96), (29 << 20, 64), (58 << 20, 448)):
    n = nbytes // 16
    count = copies_for(nbytes)
    bufs = [torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(count)]
    res = []
    for D in (4, 8, 16):
        fn = mods[D].get_function("gs")
        for blocks in (264, 528, 1056):
            calls = [lambda b=b: launch(fn, blocks, 512, (np.uint64(b.data_ptr()), np.int64(n), np.uint64(sink.data_ptr()))) for b in bufs]
            res.append((time_graph(calls), f"gs D={D} blocks={blocks} thr=512"))
    best = min(res)
    print(f"== {nbytes / 1e6:.1f} MB ({count} copies), {nblk} column blocks: grid-stride best {best[0]:.2f} us = {nbytes / best[0] / 1e3:.0f} GB/s ({best[1]})", flush=True)
    res = []
    for D in (8, 16):
        fn = mods[D].get_function("wc")
        for mult in (1, 2, 4):
            for warps in (8, 16, 32):
                blocks = nblk * mult
                if blocks * warps > sms * 64 * 2: continue  # at most two waves of 64-warp SMs
                per_warp = math.ceil(n / (blocks * warps) / 32) * 32
                calls = [lambda b=b: launch(fn, blocks, warps * 32, (np.uint64(b.data_ptr()), np.int64(n), np.uint64(sink.data_ptr()), np.int32(per_warp))) for b in bufs]
                us = time_graph(calls)
                res.append((us, f"wc D={D} {blocks} blocks (x{mult}) x {warps} warps, {per_warp * 16 / 1024:.1f} KB/warp"))
    res.sort()
    for us, name in res:
        print(f"  {us:7.2f} us {nbytes / us / 1e3:6.0f} GB/s  {name}", flush=True)
    del bufs
    torch.cuda.empty_cache()
