"""Where a decode step's time goes: every kernel of the replayed CUDA graph, timed by the profiler.

Writes a Zephyr-7B-shaped random checkpoint (``benchmarks/e2e.py``), loads it
with the runtime, captures the decode graphs, then profiles ``--steps`` decode
steps (graph replay + greedy pick, the runtime's loop without the host side)
with ``torch.profiler``. Prints, per kernel name: calls per step, microseconds
per step and per call; then the step's wall time, the kernels' busy time and
the idle time between consecutive kernels (launch gaps and dependencies).

Usage::

    python benchmarks/profile_decode.py [--config u4g128_act] [--batch 1] [--steps 64] [--out DIR]

Needs a CUDA GPU. Writes ``profile_decode_<config>_b<B>.json`` into DIR when given.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from kernels import write_json_atomic  # noqa: E402  (benchmarks/kernels.py: temporary file, then rename)


def short_name(name: str) -> str:
    """Kernel names without template arguments and Inductor's hashes, so a kind is one row."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"^(triton_\w+?)_\d+$", r"\1", name)
    return name[:90]


@torch.inference_mode()
def profile_steps(llm, batch: int, prompt_len: int, steps: int) -> dict:
    from zephyr_plugins.generation_api import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 32000, (batch, prompt_len), generator=g).tolist()
    llm.generate_tokens(prompts, SamplingParams(max_new_tokens=steps + 2, temperature=0, repetition_penalty=1.0))
    pad = torch.zeros(batch, dtype=torch.long, device="cuda")
    cur = torch.randint(3, 32000, (batch,), device="cuda")

    def run():
        nonlocal cur
        for s in range(steps):
            cur = llm.steps(cur, prompt_len + s, pad).argmax(-1)

    run()  # the graphs of this length bucket exist now
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    events.sort(key=lambda e: e.time_range.start)
    per = defaultdict(lambda: [0, 0.0])
    busy, idle, last_end = 0.0, 0.0, None
    gaps = defaultdict(float)
    prev = None
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        name = short_name(e.name)
        per[name][0] += 1
        per[name][1] += end - start
        if last_end is not None:
            gap = max(0.0, start - last_end)
            idle += gap
            gaps[f"{prev} -> {name}"] += gap
        busy += end - start if last_end is None or start >= last_end else max(0.0, end - last_end)
        last_end = end if last_end is None else max(last_end, end)
        prev = name
    span = (events[-1].time_range.end - events[0].time_range.start) if events else 0.0
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {
        "batch": batch, "steps": steps, "wall_us_per_step": wall * 1e6, "span_us_per_step": span / steps,
        "busy_us_per_step": busy / steps, "idle_us_per_step": idle / steps,
        "kernels": [{"name": n, "calls_per_step": c / steps, "us_per_step": t / steps, "us_per_call": t / c}
                    for n, (c, t) in rows],
        "gaps": [{"pair": p, "us_per_step": t / steps} for p, t in sorted(gaps.items(), key=lambda kv: -kv[1])[:15]],
    }  # fmt: skip


def main(argv=None) -> int:
    from e2e import CONFIGS, write_random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="u4g128_act", choices=sorted(CONFIGS))
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode: needs a CUDA GPU", file=sys.stderr)
        return 1
    from zephyr_plugins.runtime import Zephyr

    batches = [int(b) for b in args.batch.split(",")]
    work = tempfile.mkdtemp(prefix="zephyr_profile_")
    try:
        folder = write_random_checkpoint(os.path.join(work, args.config), CONFIGS[args.config])
        llm = Zephyr.from_pretrained(folder, device="cuda", dtype=torch.float16, max_batch_size=max(batches),
                                     max_seq_len=2048)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    llm.eos_token_ids = set()
    results = []
    for b in batches:
        r = profile_steps(llm, b, args.prompt, args.steps)
        results.append(r)
        print(f"\n{torch.cuda.get_device_name()} {args.config} batch {b}: wall {r['wall_us_per_step']:.1f} us/step, "
              f"kernel span {r['span_us_per_step']:.1f}, busy {r['busy_us_per_step']:.1f}, "
              f"idle between kernels {r['idle_us_per_step']:.1f}")  # fmt: skip
        print(f"{'kernel':<92}{'calls':>7}{'us/step':>10}{'us/call':>9}")
        for k in r["kernels"]:
            print(f"{k['name']:<92}{k['calls_per_step']:>7.1f}{k['us_per_step']:>10.1f}{k['us_per_call']:>9.2f}")
        print("largest idle gaps (before -> after):")
        for gp in r["gaps"][:10]:
            print(f"  {gp['pair'][:110]:<112}{gp['us_per_step']:>8.1f}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            write_json_atomic(os.path.join(args.out, f"profile_decode_{args.config}_b{b}.json"),
                              {"card": torch.cuda.get_device_name(), "config": args.config, **r}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
