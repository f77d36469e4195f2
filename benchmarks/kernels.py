"""Benchmark the CUDA GPTQ kernels against cuBLAS fp16 and torch's int4 kernel.

For the four Mistral-7B linear shapes and M in {1, ..., 4096}, times in one
run: our backend (what ``QuantLinear`` dispatches to: the GEMV kernel for
M <= 24, the tiled kernel up to the backend's FUSED_MAX_M (FUSED_MAX_M_WS and
FUSED_MAX_M_WS_8BIT on Hopper, where the tiled kernel is mostly its WS variant), dequantize +
cuBLAS above), the GEMV, fused small-M and tiled kernels (the tiled one on mma.sync,
``tiled_us``, and on Hopper also on wgmma, ``wgmma_us``, and its warp-specialized
wgmma variant at M >= 16, ``ws_us``) and the dequantize +
cuBLAS path separately where they apply, cuBLAS fp16 ``x @ W``, and torch's
``_weight_int4pack_mm`` (g128, bf16). Each measurement is the median over
replays of a CUDA graph that runs the op over several weight copies in turn,
so that the 50 MB L2 cache never holds the weight; a device-to-device copy
measures the bandwidth ceiling in the same run.

Usage::

    python benchmarks/kernels.py [--out DIR] [--quick | --ms 64,128] [--sweep]

``--sweep`` also times the GEMV kernel under forced launch plans (warps per
block x splits along K) at M = 1 and 8, to check its planner. ``ZEPHYR_TILED_MT=2``
or ``4`` in the environment forces the tiled kernel's row tile (to check its planner).

Writes ``kernels_<card>_<date>.json`` and ``.png`` (speedup vs M) into DIR
(default ``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
MS = [1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 384, 512, 1024, 2048, 4096]
LAYOUTS = {  # name: (bits, group_size, act_order)
    "u4g128_act": (4, 128, True),
    "u4g128": (4, 128, False),
    "u8g128_act": (8, 128, True),
}
L2_DEFEAT_BYTES = 256 << 20  # rotate copies until they span this much


def git_commit() -> str:
    env = os.environ.get("ZEPHYR_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def kernels_unavailable() -> str | None:
    """Why our CUDA kernels cannot be timed here (no CUDA device, or the build failed and why), else None.

    Shared by the kernel benchmarks (this one, ``dense_gemv.py``, ``attention.py``); each keeps its own
    exit status."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from zephyr_plugins.kernel_build import ensure_built

    ok, why = ensure_built()
    return None if ok else f"CUDA kernels unavailable: {why}"


def write_json_atomic(path, payload, indent=None) -> None:
    """``payload`` as JSON at ``path`` (gzip-compressed when it ends in .gz), through a temporary file in the
    same folder and a rename, so that a failed write leaves nothing half-written."""
    import gzip
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        with gzip.open(tmp, "wt") if path.name.endswith(".gz") else open(tmp, "w") as f:
            json.dump(payload, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def zephyr_env() -> dict:
    """The ``ZEPHYR_*`` environment variables set for this run (the kernels' switches, for A/B results);
    paths (the kernel cache) are left out."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZEPHYR_") and "/" not in v}


def run_meta() -> dict:
    """The header of a result file: card, date (UTC, seconds), commit, torch and CUDA versions, ZEPHYR_* switches."""
    return {"card": torch.cuda.get_device_name(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "env": zephyr_env()}  # fmt: skip


def time_graph(calls, min_iters: int = 20, replays: int = 15) -> float:
    """Median microseconds per call of ``calls`` (closures cycled in order) inside a CUDA graph."""
    iters = len(calls) * max(1, math.ceil(min_iters / len(calls)))
    for c in calls:  # warm-up (and lazy init) outside the graph
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for i in range(iters):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / iters)
    del g
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus written."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_graph([lambda: b.copy_(a)], min_iters=5, replays=10)
    return 2 * n / us / 1e3


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(L2_DEFEAT_BYTES / max(nbytes, 1))))


def make_layers(k, n, bits, gs, act, dtype, count):
    from zk_random import random_gptq_layer

    from zephyr_plugins.config import GPTQConfig
    from zephyr_plugins.quant_linear import QuantLinear

    layers = []
    for i in range(count):
        t = random_gptq_layer(k, n, bits, gs, act, True, seed=i, device="cuda")
        layer = QuantLinear(k, n, GPTQConfig(bits=bits, group_size=gs, desc_act=act), device="cuda")
        layer.load_checkpoint_tensors(**t)
        layer.prepare(dtype, backend="cuda")
        layers.append(layer)
    return layers


def bench_int4pack(k, n, ms, count):
    """torch's tinygemm int4 (g128, bf16): {M: us} or {} if unavailable."""
    try:
        ws, szs = [], []
        for _ in range(count):
            wq = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            ws.append(torch._convert_weight_to_int4pack(wq, 8))
            szs.append(torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16))
        out = {}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = [lambda w=w, sz=sz: torch._weight_int4pack_mm(x, w, 128, sz) for w, sz in zip(ws, szs)]
            out[m] = time_graph(calls)
        return out
    except Exception as exc:  # pragma: no cover - depends on the torch build
        print(f"  _weight_int4pack_mm unavailable: {type(exc).__name__}: {exc}", flush=True)
        return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer M values (1, 16, 64, 256)")
    ap.add_argument("--ms", default=None, help="comma-separated M values (overrides --quick)")
    ap.add_argument("--sweep", action="store_true", help="time forced GEMV launch plans at M = 1 and 8")
    args = ap.parse_args(argv)
    why = kernels_unavailable()
    if why:
        print(f"{why}; nothing to benchmark")
        return 1 if torch.cuda.is_available() else 0  # no device: nothing to do; a failed build: an error
    from zephyr_plugins.kernel_ops import GEMV_MAX_ROWS, gptq_dequantize, gptq_gemm_repacked, gptq_gemv_repacked

    torch.backends.cuda.matmul.allow_tf32 = False
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 16, 64, 256] if args.quick else MS)
    dtype = torch.float16
    card = torch.cuda.get_device_name()
    from zephyr_plugins.kernel_build import wgmma_available

    wgmma = wgmma_available()  # kernel=3 runs here
    bw = copy_bandwidth()
    print(f"{card}: device copy {bw:.0f} GB/s (read + write)", flush=True)
    rows, sweep = [], []
    for sname, (k, n) in SHAPES.items():
        print(f"shape {sname} K={k} N={n}", flush=True)
        count = copies_for(k * n * 2)
        wf = [torch.randn(k, n, device="cuda", dtype=dtype) * 0.02 for _ in range(count)]
        fp16 = {}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            fp16[m] = time_graph([lambda w=w: x @ w for w in wf])
        del wf
        int4 = bench_int4pack(k, n, ms, copies_for(k * n // 2))
        for lname, (bits, gs, act) in LAYOUTS.items():
            layers = make_layers(k, n, bits, gs, act, dtype, copies_for(k * n * bits // 8))
            wbytes = layers[0]._zk_qweight.numel() * 4 + layers[0]._zk_scales.numel() * 2
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ours = time_graph([lambda L=L: L(x) for L in layers])
                row = {
                    "shape": sname, "K": k, "N": n, "M": m, "layout": lname, "bits": bits, "group_size": gs,
                    "act_order": act, "ours_us": ours, "fp16_us": fp16[m], "int4pack_us": int4.get(m),
                    "speedup_vs_fp16": fp16[m] / ours,
                    "weight_bytes": wbytes,
                    "ours_GBps": (wbytes + 2 * m * (k + n)) / ours / 1e3,
                    "fp16_GBps": (2 * k * n + 2 * m * (k + n)) / fp16[m] / 1e3,
                }  # fmt: skip
                if m <= GEMV_MAX_ROWS:  # the GEMV kernel on its own, to place the dispatch thresholds
                    row["gemv_us"] = time_graph(
                        [lambda L=L: gptq_gemv_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm,
                                                        L._zk_locks, bits, gs, n) for L in layers])  # fmt: skip
                if m <= 64:  # the fused small-M kernel on its own
                    row["fused_us"] = time_graph(
                        [lambda L=L: gptq_gemm_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm,
                                                        L._zk_locks, bits, gs, n, 1) for L in layers])  # fmt: skip
                if 16 <= m <= 1024:  # the tiled kernel on its own, on mma.sync and (Hopper) on wgmma
                    row["tiled_us"] = time_graph(
                        [lambda L=L: gptq_gemm_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm,
                                                        L._zk_locks, bits, gs, n, 2) for L in layers])  # fmt: skip
                    if wgmma:
                        row["wgmma_us"] = time_graph(
                            [lambda L=L: gptq_gemm_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm,
                                                            L._zk_locks, bits, gs, n, 3) for L in layers])  # fmt: skip
                if m >= 16 and wgmma:  # the warp-specialized wgmma variant (WS) on its own, at any M
                    row["ws_us"] = time_graph(
                        [lambda L=L: gptq_gemm_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm,
                                                        L._zk_locks, bits, gs, n, 4) for L in layers])  # fmt: skip
                if args.sweep and m in (1, 8) and act:
                    for bw in (4, 8, 16) if m <= 8 else (4, 8):
                        for sp in (1, 2, 4, 8, 16, 32):
                            us = time_graph(
                                [lambda L=L: gptq_gemv_repacked(x, L._zk_qweight, L._zk_scales, L._zk_zeros,
                                                                L._zk_perm, L._zk_locks, bits, gs, n, bw, sp)
                                 for L in layers])  # fmt: skip
                            sweep.append({"shape": sname, "layout": lname, "M": m, "block_warps": bw,
                                          "splits": sp, "us": us})  # fmt: skip
                            print(f"    sweep {lname} M={m} warps={bw} splits={sp}: {us:.1f} us", flush=True)
                zk = [(L._zk_qweight, L._zk_scales, L._zk_zeros, L._zk_perm, L._zk_locks) for L in layers]
                if m >= 16:  # dequantize + cuBLAS at any M, to place the last threshold
                    row["dequant_cublas_us"] = time_graph(
                        [lambda z=z: torch.ops.zephyr.gptq_linear(x, *z, bits, gs, n, 0, 0) for z in zk])
                if m >= 128 and act:
                    # The large-M path before it read the zk layout: the checkpoint layout dequantized, then cuBLAS
                    # (L.qweight is rebuilt from the zk layout: the layers keep no checkpoint copy).
                    ck = [(L.qweight, L.qzeros, L.scales.to(dtype), L.g_idx) for L in layers]
                    row["ckpt_dequant_cublas_us"] = time_graph(
                        [lambda c=c: x @ gptq_dequantize(*c, bits, 1) for c in ck])
                    del ck
                del zk
                rows.append(row)
                print(
                    f"  {lname:11s} M={m:5d} ours {ours:9.1f} us  fp16 {fp16[m]:9.1f} us  "
                    f"x{fp16[m] / ours:5.2f}  {row['ours_GBps']:6.0f} GB/s"
                    + (f"  int4pack {int4[m]:9.1f} us" if m in int4 else "")
                    + (f"  gemv {row['gemv_us']:7.1f}" if "gemv_us" in row else "")
                    + (f"  fused {row['fused_us']:7.1f}" if "fused_us" in row else "")
                    + (f"  tiled {row['tiled_us']:7.1f}" if "tiled_us" in row else "")
                    + (f"  wgmma {row['wgmma_us']:7.1f}" if "wgmma_us" in row else "")
                    + (f"  ws {row['ws_us']:7.1f}" if "ws_us" in row else "")
                    + (f"  deq+cublas {row['dequant_cublas_us']:7.1f}" if "dequant_cublas_us" in row else "")
                    + (f"  ckpt-deq {row['ckpt_dequant_cublas_us']:7.1f}" if "ckpt_dequant_cublas_us" in row else ""),
                    flush=True,
                )
            del layers
        torch.cuda.empty_cache()

    summary = summarize(rows, ms)
    meta = {
        **run_meta(),
        "copy_GBps": bw,
        "dtype": "float16",
        "method": "median of CUDA-graph replays, weight copies rotated to exceed L2",
    }
    print_table(summary, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"kernels_{card.replace(' ', '_')}_{meta['date'][:10]}"
    write_json_atomic(out / f"{tag}.json", {"meta": meta, "summary": summary, "rows": rows, "gemv_plan_sweep": sweep},
                      indent=1)
    plot(summary, meta, out / f"{tag}.png")
    print(f"wrote {out / (tag + '.json')} and .png")
    return 0


def summarize(rows, ms):
    """Per layout and M: times summed over the four shapes, and the speedups."""
    out = []
    for lname in LAYOUTS:
        for m in ms:
            sel = [r for r in rows if r["layout"] == lname and r["M"] == m]
            if not sel:
                continue
            ours = sum(r["ours_us"] for r in sel)
            fp16 = sum(r["fp16_us"] for r in sel)
            int4 = sum(r["int4pack_us"] for r in sel) if all(r["int4pack_us"] for r in sel) else None
            wbytes = sum(r["weight_bytes"] for r in sel)
            out.append({
                "layout": lname, "M": m, "ours_us": ours, "fp16_us": fp16, "int4pack_us": int4,
                "speedup": fp16 / ours, "int4pack_speedup": fp16 / int4 if int4 else None,
                "ours_GBps": wbytes / ours / 1e3,
            })  # fmt: skip
            # Each path timed on its own, summed where every shape has it (its speedup vs fp16 beside it).
            for key in PATH_KEYS:
                if all(key in r for r in sel):
                    out[-1][key] = sum(r[key] for r in sel)
                    out[-1][key.replace("_us", "_speedup")] = fp16 / out[-1][key]
    return out


PATH_KEYS = ("gemv_us", "fused_us", "tiled_us", "wgmma_us", "ws_us", "dequant_cublas_us")


def print_table(summary, meta):
    print(f"\n{meta['card']}  {meta['date']}  commit {meta['commit'][:10]}  copy {meta['copy_GBps']:.0f} GB/s")
    print("summed over qkv, o, gate_up, down (fp16 activations)")
    print(f"{'layout':12s} {'M':>5s} {'ours us':>9s} {'fp16 us':>9s} {'x fp16':>7s} {'GB/s':>6s} {'int4pack x':>10s}")
    for s in summary:
        i4 = f"{s['int4pack_speedup']:.2f}" if s["int4pack_speedup"] else "-"
        paths = "".join(f"  {k[:-3]} {s[k]:.1f} ({s[k.replace('_us', '_speedup')]:.2f}x)" for k in PATH_KEYS if k in s)
        print(
            f"{s['layout']:12s} {s['M']:5d} {s['ours_us']:9.1f} {s['fp16_us']:9.1f} {s['speedup']:7.2f} "
            f"{s['ours_GBps']:6.0f} {i4:>10s}{paths}"
        )


def plot(summary, meta, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for lname in LAYOUTS:
        pts = [(s["M"], s["speedup"]) for s in summary if s["layout"] == lname]
        ax.plot(*zip(*pts), marker="o", label=f"ours {lname}")
    pts = [(s["M"], s["int4pack_speedup"]) for s in summary if s["layout"] == "u4g128_act" and s["int4pack_speedup"]]
    if pts:
        ax.plot(*zip(*pts), marker="x", linestyle="--", label="torch _weight_int4pack_mm (bf16)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup vs cuBLAS fp16 (sum of 4 Mistral-7B shapes)")
    ax.set_title(f"{meta['card']} {meta['date'][:10]} {meta['commit'][:8]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
