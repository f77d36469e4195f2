"""Benchmark ``zephyr::dense_gemv`` (float layers at decode batch sizes) against cuBLAS, same run.

For Mistral-7B's four linear shapes and its head (4096 -> 32000), fp16, and
M in {1, 2, 4, 8}: our kernel and ``F.linear`` (cuBLAS, what ``nn.Linear``
runs), each timed as the median replay of a CUDA graph that cycles through
enough weight copies that the 50 MB L2 never holds the weight
(``time_graph`` of ``benchmarks/kernels.py``). A device-to-device copy in
the same run gives the bandwidth yardstick. ``--sweep`` also times the
kernel with 4 and 16 warps per block.

Usage::

    python benchmarks/dense_gemv.py [--out DIR] [--ms 1,2,4,8] [--sweep]

Writes ``dense_gemv_<card>_<date>.json`` and ``.png`` into DIR (default
``benchmarks/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from kernels import (  # noqa: E402
    copies_for, copy_bandwidth, kernels_unavailable, run_meta, time_graph, write_json_atomic,
)

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "head": (4096, 32000)}  # fmt: skip
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")  # one decoder layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--sweep", action="store_true", help="also time 4 and 16 warps per block")
    args = ap.parse_args(argv)
    why = kernels_unavailable()
    if why:
        print(f"dense_gemv benchmark: {why}")
        return 1
    from zephyr_plugins.kernel_ops import dense_gemv

    ms = [int(m) for m in args.ms.split(",")]
    meta = run_meta()
    card = meta["card"]
    meta["copy_GBps"] = copy_bandwidth()
    print(f"{card}: device copy {meta['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, n) in SHAPES.items():
        nbytes = k * n * 2
        ws = [torch.randn(n, k, device="cuda", generator=gen).half() for _ in range(copies_for(nbytes))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen).half()
            ref = (x.float() @ ws[0].float().t())
            err = ((dense_gemv(x, ws[0]).float() - ref).abs().mean() / ref.abs().mean()).item()
            ours = time_graph([lambda w=w: dense_gemv(x, w) for w in ws])
            cublas = time_graph([lambda w=w: F.linear(x, w) for w in ws])
            row = {"shape": name, "K": k, "N": n, "M": m, "ours_us": ours, "cublas_us": cublas,
                   "speedup": cublas / ours, "ours_GBps": nbytes / ours / 1e3, "cublas_GBps": nbytes / cublas / 1e3,
                   "rel_mean_err": err}  # fmt: skip
            extra = ""
            if args.sweep:
                for wpb in (4, 8, 16):
                    row[f"w{wpb}_us"] = time_graph([lambda w=w: dense_gemv(x, w, wpb) for w in ws])
                    extra += f"  w{wpb} {row[f'w{wpb}_us']:6.1f}"
            rows.append(row)
            print(f"  {name:8s} M={m:2d} ours {ours:7.1f} us ({row['ours_GBps']:5.0f} GB/s)  cuBLAS {cublas:7.1f} us "
                  f"({row['cublas_GBps']:5.0f} GB/s)  x {row['speedup']:.2f}  err {err:.1e}{extra}", flush=True)  # fmt: skip
        del ws
        torch.cuda.empty_cache()
    summary = []
    print(f"\n{card}  commit {meta['commit'][:10]}  copy {meta['copy_GBps']:.0f} GB/s")
    print("per decoder layer (qkv + o + gate_up + down) and per step (32 layers + head), fp16")
    for m in ms:
        sel = [r for r in rows if r["M"] == m]
        layer_o = sum(r["ours_us"] for r in sel if r["shape"] in LAYER_SHAPES)
        layer_c = sum(r["cublas_us"] for r in sel if r["shape"] in LAYER_SHAPES)
        head = {r["shape"]: r for r in sel}["head"]
        step_o, step_c = 32 * layer_o + head["ours_us"], 32 * layer_c + head["cublas_us"]
        summary.append({"M": m, "layer_ours_us": layer_o, "layer_cublas_us": layer_c, "step_ours_us": step_o,
                        "step_cublas_us": step_c, "step_speedup": step_c / step_o})  # fmt: skip
        print(f"  M={m:2d} layer {layer_o:7.1f} vs {layer_c:7.1f} us   step {step_o:8.1f} vs {step_c:8.1f} us  "
              f"x {step_c / step_o:.3f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dense_gemv_{card.replace(' ', '_')}_{meta['date'][:10]}"
    write_json_atomic(out / f"{stem}.json", {"meta": meta, "rows": rows, "summary": summary}, indent=1)
    plot(rows, ms, meta, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return 0


def plot(rows, ms, meta, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in SHAPES:
        pts = [(r["M"], r["speedup"]) for r in rows if r["shape"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("M (rows)")
    ax.set_ylabel("speedup of zephyr::dense_gemv vs cuBLAS (fp16)")
    ax.set_title(f"{meta['card']} {meta['date'][:10]} {meta['commit'][:8]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
