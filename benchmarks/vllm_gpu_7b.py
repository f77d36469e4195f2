"""Side by side on one GPU: real vLLM's own GPTQ path, vLLM with our plugin, and our runtime, on ONE full
Zephyr-7B-shaped checkpoint (32 layers, random GPTQ codes written by our writer).

Each vLLM engine runs in its own subprocess (tests/vllm_runner.py) with vLLM's defaults for speed
(torch.compile + CUDA graphs); then our runtime (``zp.Zephyr``) runs in this process on the same
folder. Decode rate is measured the same way for all three: rows x (N - 1) / (time of N new tokens
minus time of 1), greedy, EOS ignored, a 512-token prompt, N = 256, at batch 1 and 32.

    python benchmarks/vllm_gpu_7b.py --out DIR [--layouts u4g128_act,u4g128]

Needs vLLM (on the GPU machine: ../shared/gpu-vllm) and our wheel installed beside it (the plugin is
found through its entry point). Writes ``vllm_gpu_7b_<card>_<date>.json``, a ``.png`` plot and the
engines' log tail; ``--plot-only JSON`` redraws the plot of a saved result.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from kernels import write_json_atomic  # noqa: E402  (benchmarks/kernels.py: temporary file, then rename)

LAYOUTS = {"u4g128_act": (4, 128, True), "u4g128": (4, 128, False), "u8g128_act": (8, 128, True)}
PROMPT, NEW, BATCHES = 512, 256, [1, 32]


def _e2e():
    spec = importlib.util.spec_from_file_location("zephyr_bench_e2e", ROOT / "benchmarks" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plot(doc: dict, path: str) -> None:
    """Bars of decode tok/s per engine and batch, one panel per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(doc["results"])
    fig, axes = plt.subplots(1, len(layouts), figsize=(7 * len(layouts), 4.5), squeeze=False)
    engines = [("vllm_own_gptq", "vLLM's own GPTQ"), ("vllm_zephyr_plugin", "vLLM + zephyr_gptq plugin"),
               ("zephyr_runtime", "zephyr-plugins runtime")]  # fmt: skip
    for ax, name in zip(axes[0], layouts):
        row = doc["results"][name]
        for i, (key, label) in enumerate(engines):
            tp = (row.get(key) or {}).get("throughput") or {}
            vals = [tp.get(f"batch{b}_tok_s", 0) for b in BATCHES]
            bars = ax.bar([j + i * 0.27 for j in range(len(BATCHES))], vals, 0.27, label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([j + 0.27 for j in range(len(BATCHES))], [f"batch {b}" for b in BATCHES])
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s (all rows)")
        ax.set_title(f"{name}, 32 layers: {doc['card']}, vLLM {doc['vllm']}, {doc['date'][:10]}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default="u4g128_act")
    ap.add_argument("--plot-only", metavar="JSON", help="only draw the plot of a saved result")
    ap.add_argument("--skip-runtime", action="store_true", help="time the two vLLM engines only, not our runtime")
    args = ap.parse_args(argv)
    unknown = [n for n in args.layouts.split(",") if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layout(s) {unknown}; choose from {sorted(LAYOUTS)}")
    if args.plot_only:
        with open(args.plot_only) as fh:
            doc = json.load(fh)
        plot(doc, os.path.join(args.out, Path(args.plot_only).stem + ".png"))
        return 0
    import vllm

    from vllm_helpers import run_vllm_jobs

    e2e = _e2e()
    card = torch.cuda.get_device_name()
    doc = {"benchmark": "vllm_gpu_7b", "card": card, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
           "commit": e2e.git_commit(), "vllm": vllm.__version__, "torch": torch.__version__,
           "setup": f"Zephyr-7B-shaped (32 layers), random GPTQ codes; prompt {PROMPT}, {NEW} new tokens, greedy; "
                    "vLLM defaults (torch.compile + CUDA graphs); our runtime with CUDA graphs",
           "results": {}}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stem = f"vllm_gpu_7b_{card.replace(' ', '_')}_{doc['date'][:10]}"
    work = Path(tempfile.mkdtemp(prefix="zephyr_vllm7b_"))
    logs = []
    for name in args.layouts.split(","):
        folder = e2e.write_random_checkpoint(str(work / name), LAYOUTS[name])
        row = {}
        common = {"dtype": "float16", "max_model_len": 1024, "prompts": [[1, 2, 3]], "max_tokens": 1,
                  "llm_kwargs": {"enforce_eager": False, "gpu_memory_utilization": 0.45},
                  "throughput": {"batches": BATCHES, "new_tokens": NEW, "prompt_len": PROMPT}}  # fmt: skip
        for label, quant in (("vllm_own_gptq", None), ("vllm_zephyr_plugin", "zephyr_gptq")):
            sub = work / f"{name}_{label}"
            sub.mkdir()
            job = dict(common, name=label, model=folder, quantization=quant)
            try:
                res = run_vllm_jobs([job], str(sub), timeout=900, VLLM_USE_FLASHINFER_SAMPLER="0")
            except Exception as exc:  # keep the other rows
                res = {label: {"error": f"{type(exc).__name__}: {exc}"}, "_stderr": ""}
            err = res.pop("_stderr")
            logs.append(f"===== {name} {label}\n" + err[-60000:])
            r = res.get(label, {})
            kernels = sorted(set(re.findall(r"Using (\w+(?:Linear)?Kernel)", err)))
            loaded = re.search(r"Model loading took ([0-9.]+) GiB", err)
            row[label] = {"throughput": r.get("throughput"), "startup_s": r.get("startup_s"),
                          "error": r.get("error"), "kernels_logged": kernels,
                          "model_loading_gib": float(loaded.group(1)) if loaded else None,
                          "ours_served": "zephyr_gptq: kernel backend 'cuda'" in err}  # fmt: skip
            print(f"{name} {label}: {row[label]['throughput'] or row[label]['error']} kernels {kernels}", flush=True)
        base = (row["vllm_own_gptq"].get("throughput") or {})
        if not args.skip_runtime:
            ours = e2e.bench_runtime(folder, BATCHES, PROMPT, NEW, prefill_len=PROMPT, quick=True)
            row["zephyr_runtime"] = {"throughput": {f"batch{b}_tok_s": round(v["decode_tok_s"], 1)
                                                    for b, v in ours["batches"].items()}}  # fmt: skip
            print(f"{name} zephyr_runtime: {row['zephyr_runtime']['throughput']}", flush=True)
            row["ratio_runtime_vs_vllm_own"] = {k: round(v / base[k], 2)
                                                for k, v in row["zephyr_runtime"]["throughput"].items() if base.get(k)}
        doc["results"][name] = row
        write_json_atomic(os.path.join(args.out, stem + ".json"), doc, indent=2)
    with open(os.path.join(args.out, stem + "_engines.log"), "w") as fh:
        fh.write("\n".join(logs))
    try:
        plot(doc, os.path.join(args.out, stem + ".png"))
    except Exception as exc:
        print(f"plot failed: {exc}")
    print(json.dumps(doc["results"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
