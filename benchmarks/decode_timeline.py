"""Per-block timeline of a replayed decode step: when each kernel's blocks start, pass their wait, finish.

Builds the kernels with ``ZEPHYR_KERNEL_TIMELINE=1`` (a build of its own in the kernel cache:
``kernels/timeline.cuh``), writes a Zephyr-7B-shaped random checkpoint (``e2e.py``), loads it with
the runtime, runs a few decode steps eagerly (so every kernel learns the record buffer's address), then
captures the decode graphs and records one short generation. Every block of the GEMV, decode-attention
and norm kernels leaves one record: its entry, up to four stamps (GEMV: 1 after the dependent-launch
wait, 2 main loop done, 3-4 around the split's lock; attention: 1 wait, 2 q staged, 3 keys and partial
done, 4 lock; norm: 1 wait) and its exit, from ``%globaltimer`` (0.25 us steps on the H200).

Printed per kernel kind of the last decode step (medians over its calls, in us): ``dur`` from the first
wait release to the last block's exit; ``gap`` since the previous recorded kernel's exit (kernels not
recorded, such as the compiled elementwise ops and the head, and the launch boundary); ``wspr`` the spread
of wait releases; ``lead`` how long before its wait release the first block was resident; ``sms`` the SMs
its blocks ran on; ``ph1..ph3`` the medians over blocks of stamp 2 - 1, 3 - 2, 4 - 3; ``p2spr`` the spread
of stamp 2 over the blocks (GEMV: when their weight loops end); ``merge`` the last block's time after the
lock; ``arrspr`` the spread of arrivals at the lock. Then one layer in order. ``--records FILE`` also
writes each batch's last step as JSON (gzip-compressed when FILE ends in .gz): per launch, its blocks'
rows (stamps 0-4 and the exit in us, then tag, block, SM, n), for grouping offline (by SM, say).

The stamps cost registers and time (4-bit batch 1 on the H200: ~4% slower than the normal build), so
compare variants within one such build, and measure speed with ``e2e.py`` or a same-process A/B on the
normal build.

Usage::

    python benchmarks/decode_timeline.py [--configs u4g128_act,u8g128_act] [--batches 1,8] [--workdir DIR]
                                         [--records FILE]

Needs a CUDA GPU (sm_90 for the dependent launches the stamps are about). First written for the
2026-11-28 H200 session (``results/ab_H200_2026-11-28/decode_timeline_e196a2f.log``, a branch build of
the same probes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RECORDS_MAX = 1 << 18  # kTimelineMax in kernels/timeline.cuh
STEP_GAP_US = 15.0  # a pause longer than this between recorded kernels separates decode steps


@dataclass
class Record:
    t: list  # stamps 0-4 and the exit, in us (0: not stamped)
    tag: int
    block: int
    smid: int
    n: int


def parse(rows) -> list[Record]:
    """Records from the buffer's rows of 8 integers (kernels/timeline.cuh's layout)."""
    out = []
    for r in rows:
        out.append(Record([v / 1e3 for v in r[:6]], r[6] & 0xFFFFFFFF, (r[6] >> 32) & 0xFFFFFFFF,
                          r[7] & 0xFFFFFFFF, (r[7] >> 32) & 0xFFFFFFFF))  # fmt: skip
    return out


def kernel_name(tag: int, n: int) -> str:
    kind = tag % 10
    if kind == 1:  # tag = 1 + 10 S + 1000 B (+ 100000 EARLY), n = threads
        return f"attention S={(tag // 10) % 100} B={(tag // 1000) % 100}{' early' if tag >= 100000 else ''} threads={n}"
    if kind == 2:  # tag = 2 + 10 S + 1000 M (+ 100000 SwiGLU), n = N
        return f"gemv N={n} M={(tag // 1000) % 100} S={(tag // 10) % 100}{' swiglu' if tag >= 100000 else ''}"
    return f"norm D={n}"


def instances(records: list[Record]) -> list[dict]:
    """Kernel launches: records sorted by wait release; a launch's blocks all pass their wait before
    the next launch's (which waits for it), so a new launch starts where the kind changes or a wait
    release comes after the current launch's last exit."""
    out: list[dict] = []
    for r in sorted(records, key=lambda r: r.t[1]):
        cur = out[-1] if out else None
        if cur is None or cur["key"] != (r.tag, r.n) or r.t[1] > cur["end"]:
            cur = {"key": (r.tag, r.n), "records": [], "end": 0.0}
            out.append(cur)
        cur["records"].append(r)
        cur["end"] = max(cur["end"], r.t[5])
    for g in out:
        g["wait"] = min(r.t[1] for r in g["records"])
        g["wait_last"] = max(r.t[1] for r in g["records"])
        g["entry"] = min(r.t[0] for r in g["records"])
    return out


def steps(launches: list[dict], min_kernels: int = 64) -> list[list[dict]]:
    """The launches split where the pause between two exceeds STEP_GAP_US; segments shorter than
    ``min_kernels`` (prefill, sampling) dropped."""
    if not launches:
        return []
    segs, cur = [], [launches[0]]
    for a, b in zip(launches, launches[1:]):
        if b["wait"] - a["end"] > STEP_GAP_US:
            segs.append(cur)
            cur = []
        cur.append(b)
    segs.append(cur)
    return [s for s in segs if len(s) >= min_kernels]


def _median(v):
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float("nan")


def summarize(step: list[dict]) -> dict:
    """Per kernel kind: medians over its launches in the step (us), and the step's totals."""
    per: dict = defaultdict(lambda: defaultdict(list))
    prev = None
    for g in step:
        d = per[kernel_name(*g["key"])]
        ts = [r.t for r in g["records"]]
        d["dur"].append(g["end"] - g["wait"])
        d["gap"].append(g["wait"] - prev["end"] if prev else float("nan"))
        d["wspr"].append(g["wait_last"] - g["wait"])
        d["lead"].append(g["wait"] - g["entry"])
        d["blocks"].append(len(ts))
        d["sms"].append(len({r.smid for r in g["records"]}))
        done = [t[2] for t in ts if t[2]]
        d["p2spr"].append(max(done) - min(done) if done else float("nan"))
        for k in (1, 2, 3):
            d[f"ph{k}"].append(_median([t[k + 1] - t[k] for t in ts if t[k + 1] and t[k]]))
        last = max(ts, key=lambda t: t[5])
        d["merge"].append(last[5] - last[4] if last[4] else float("nan"))
        locks = [t[4] for t in ts if t[4]]
        d["arrspr"].append(max(locks) - min(locks) if locks else float("nan"))
        prev = g
    kinds = {name: {k: _median(v) for k, v in d.items()} | {"calls": len(d["dur"])} for name, d in per.items()}
    busy = sum(g["end"] - g["wait"] for g in step)
    span = step[-1]["end"] - step[0]["wait"]
    return {"kinds": kinds, "span_us": span, "recorded_us": busy, "between_us": span - busy}


def step_rows(step: list[dict]) -> list[list[list]]:
    """A step's launches as plain rows for JSON: per block its stamps and exit (us), tag, block, SM, n."""
    return [[[*r.t, r.tag, r.block, r.smid, r.n] for r in g["records"]] for g in step]


def write_records(path: str, steps_by_label: dict) -> None:
    """{label: step_rows(...)} as JSON, gzip-compressed when the path ends in .gz (kernels.py's atomic
    writer)."""
    from kernels import write_json_atomic

    write_json_atomic(path, steps_by_label)


def print_summary(label: str, step: list[dict]) -> None:
    s = summarize(step)
    print(f"== {label}: {len(step)} recorded kernels, span {s['span_us']:.1f} us, in them {s['recorded_us']:.1f}, "
          f"between them {s['between_us']:.1f}")  # fmt: skip
    cols = ("dur", "gap", "wspr", "lead", "ph1", "ph2", "ph3", "p2spr", "merge", "arrspr")
    print(f"{'kernel':48s} {'calls':>5s} {'blocks':>6s} {'sms':>4s} " + " ".join(f"{c:>6s}" for c in cols))
    for name, d in s["kinds"].items():
        head = f"{name:48s} {d['calls']:5d} {d['blocks']:6.0f} {d['sms']:4.0f} "
        print(head + " ".join(f"{d[c]:6.2f}" for c in cols))
    attn = [i for i, g in enumerate(step) if g["key"][0] % 10 == 1]
    if attn:
        i0 = max(attn[len(attn) // 2] - 1, 0)  # a layer from the middle, from its qkv GEMV
        base = step[i0]["wait"]
        print("one layer (us from the first kernel's wait release):")
        for g in step[i0 : i0 + 8]:
            print(f"   {kernel_name(*g['key']):48s} entry {g['entry'] - base:7.2f}  wait {g['wait'] - base:7.2f}"
                  f"..{g['wait_last'] - base:7.2f}  end {g['end'] - base:7.2f}")  # fmt: skip


def main(argv=None) -> int:
    from e2e import CONFIGS, checked_run_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="u4g128_act")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--workdir", default=None, help="where the random checkpoints go (one found there is reused)")
    ap.add_argument("--records", default=None, help="also write each batch's last step's records here (JSON)")
    args = ap.parse_args(argv)
    names, batches, reuse = checked_run_args(ap, args)  # before anything runs (e2e.py's rule)
    records_dir = os.path.dirname(os.path.abspath(args.records)) if args.records else None
    if records_dir is not None and not os.path.isdir(records_dir):
        ap.error(f"--records: no folder {records_dir} to write into")

    import torch

    if not torch.cuda.is_available():
        print("decode_timeline: needs a CUDA GPU", file=sys.stderr)
        return 1
    os.environ["ZEPHYR_KERNEL_TIMELINE"] = "1"  # before the kernels are built or loaded
    buf = torch.zeros(8 + RECORDS_MAX * 8, dtype=torch.int64, device="cuda")
    os.environ["ZEPHYR_TIMELINE_PTR"] = str(buf.data_ptr())  # read by each kernel file at its first launch

    from e2e import write_random_checkpoint
    from zephyr_plugins.decode_graphs import DecodeGraphs
    from zephyr_plugins.generation_api import SamplingParams
    from zephyr_plugins.kernel_build import ensure_built
    from zephyr_plugins.runtime import Zephyr

    ok, why = ensure_built()
    if not ok:
        print("kernels not built:", why)
        return 1

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=1.0)

    work = args.workdir or tempfile.mkdtemp(prefix="zephyr_timeline_")
    dumped: dict = {}
    for cfg in names:
        folder = os.path.join(work, cfg)
        if not reuse[cfg]:
            write_random_checkpoint(folder, CONFIGS[cfg])
        llm = Zephyr.from_pretrained(folder, device="cuda", dtype=torch.float16, max_batch_size=max(batches),
                                     max_seq_len=-(-(args.prompt + 64) // 256) * 256)  # fmt: skip
        llm.eos_token_ids = set()
        g = torch.Generator().manual_seed(1)
        for b in batches:
            prompts = torch.randint(3, 32000, (b, args.prompt), generator=g).tolist()
            # eager steps first: each kernel file sets its buffer address outside stream capture
            llm.steps = DecodeGraphs(llm.model, enabled=False)
            llm.generate_tokens(prompts, greedy(3))
            llm.steps = DecodeGraphs(llm.model)
            llm.generate_tokens(prompts, greedy(8))
            buf.zero_()
            torch.cuda.synchronize()
            llm.generate_tokens(prompts, greedy(4))
            torch.cuda.synchronize()
            count = int(buf[0].item())
            if count > RECORDS_MAX:
                print(f"warning: {count} records, only the first {RECORDS_MAX} kept")
            rows = buf[8 : 8 + min(count, RECORDS_MAX) * 8].view(-1, 8).cpu().tolist()
            found = steps(instances(parse(rows)))
            if not found:
                print(f"== {cfg} batch {b}: no decode step among {count} records (built without the stamps?)")
                continue
            label = f"{cfg} batch {b}, {torch.cuda.get_device_name()}"
            print_summary(label, found[-1])
            dumped[label] = step_rows(found[-1])
        del llm
        torch.cuda.empty_cache()
    if args.records:
        write_records(args.records, dumped)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
