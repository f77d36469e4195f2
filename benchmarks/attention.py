"""Decode-attention kernel benchmark: ``zephyr::decode_attention`` against the unfused path, same run.

One decode step of Mistral-7B's attention (32 query heads on 8 kv heads,
head_dim 128, fp16): rope, the cache write and grouped-query attention over
the cache. Each case is timed as a CUDA graph of 32 calls on 32 separate
caches (as the 32 layers of a step see them: the caches do not stay in L2),
replayed after warm-up (``time_graph`` of ``benchmarks/kernels.py``); the
time per call is the median replay / 32. The baseline is the unfused path
(``kernel_ops.decode_attention_reference``: rotation, two cache writes, the
masked softmax and two batched matmuls, op by op) captured the same way in the same run. ``--sweep`` also times every
forced ``block_keys``.

Usage::

    python benchmarks/attention.py [--out DIR] [--batches 1,8,32] [--slots 540,2000,4000] [--sweep]

Needs a CUDA GPU with the kernels built.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
# The kernel benchmark's shared pieces.
from kernels import kernels_unavailable, run_meta, time_graph, write_json_atomic  # noqa: E402

H, HKV, HD, LAYERS = 32, 8, 128, 32


def inputs(bsz: int, lmax: int, slot: int, gen: torch.Generator):
    qkv = torch.randn(bsz, (H + 2 * HKV) * HD, generator=gen, device="cuda").half()
    ang = torch.rand(bsz, HD // 2, generator=gen, device="cuda") * 6.28
    caches = [(torch.randn(bsz, HKV, lmax, HD, generator=gen, device="cuda").half(),
               torch.randn(bsz, HKV, lmax, HD, generator=gen, device="cuda").half(),
               torch.zeros(bsz * HKV, dtype=torch.int32, device="cuda")) for _ in range(LAYERS)]  # fmt: skip
    slot_t = torch.tensor([slot], device="cuda")
    pad = torch.zeros(bsz, dtype=torch.long, device="cuda")
    return qkv, ang.cos(), ang.sin(), caches, slot_t, pad


def graph_time_us(step) -> float:
    """Median replay time of a graph of one ``step()`` (32 calls), per call, in microseconds."""
    return time_graph([step], min_iters=1, replays=20) / LAYERS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--slots", default="540,2000,4000", help="cache slot of the new token (context length - 1)")
    ap.add_argument("--sweep", action="store_true", help="also time every forced block_keys")
    args = ap.parse_args(argv)
    why = kernels_unavailable()
    if why:
        print(f"attention benchmark: {why}", file=sys.stderr)
        return 1
    from zephyr_plugins.kernel_ops import decode_attention, decode_attention_reference

    card = torch.cuda.get_device_name()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{card}: decode attention, {H} heads on {HKV}, hd {HD}, fp16, us per call (graph of {LAYERS} layers)")
    print(f"{'batch':>6}{'slot':>6}{'kv_len':>8}{'kernel':>9}{'unfused':>9}{'ratio':>7}  forced block_keys")
    for bsz in (int(b) for b in args.batches.split(",")):
        for slot in (int(s) for s in args.slots.split(",")):
            kv_len = -(-(slot + 1) // 256) * 256
            qkv, cos, sin, caches, slot_t, pad = inputs(bsz, kv_len, slot, gen)

            def ours(block_keys: int = 0):
                def step():
                    for k, v, locks in caches:
                        decode_attention(qkv, cos, sin, k, v, slot_t, pad, locks, H, HKV, kv_len, 0, block_keys)
                return step

            def unfused():
                for k, v, locks in caches:
                    decode_attention_reference(qkv, cos, sin, k, v, slot_t, pad, locks, H, HKV, kv_len, 0)

            row = {"batch": bsz, "slot": slot, "kv_len": kv_len, "kernel_us": graph_time_us(ours()),
                   "unfused_us": graph_time_us(unfused)}  # fmt: skip
            if args.sweep:
                row["forced"] = {bk: graph_time_us(ours(bk)) for bk in (64, 128, 256, 512, 1024)
                                 if 2 * (-(-kv_len // bk)) * (H // HKV) <= 4 * 4 * HD}  # fmt: skip
            rows.append(row)
            forced = "  ".join(f"{bk}:{t:.1f}" for bk, t in row.get("forced", {}).items())
            print(f"{bsz:>6}{slot:>6}{kv_len:>8}{row['kernel_us']:>9.2f}{row['unfused_us']:>9.2f}"
                  f"{row['unfused_us'] / row['kernel_us']:>7.2f}  {forced}", flush=True)  # fmt: skip
            del caches
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = run_meta()
        path = os.path.join(args.out, f"attention_{card.replace(' ', '_')}_{meta['date'][:10]}.json")
        write_json_atomic(path, {**meta, "rows": rows}, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
