"""Same-machine A/B of decode speed between variants (a tree, optionally with environment settings), in one call.

    python benchmarks/ab_trees.py main=scratch/main change=. carve100=.@ZEPHYR_SMEM_CARVEOUT=100 \\
        --rounds 3 --batches 1,8 --out $OUT/ab.json

A variant is ``LABEL=TREE[@VAR=VALUE[,VAR=VALUE...]]``: the tree whose runtime runs and the environment
added to its processes. What it does, each step through ``benchmarks/ab_decode.py --tree``:

1. prints every variant's TREE line (tree, kernel folder, kernel cache key, runtime digest) and refuses two
   variants with the same runtime digest and the same environment, which would measure one build against
   itself (``--same-ok`` allows it, for an A/A run of the spread);
2. builds the trees' kernels side by side, one process per tree (``MAX_JOBS`` divided between them);
3. runs ``--rounds`` rounds, every variant once per round in its own process, the order rotated by one
   each round, so that neither a drift of the machine nor the first process after a cold start (which
   has read up to 4% high) favours one;
4. prints per config and batch each variant's runs, min / median / max tok/s and median against the first
   variant's, and whether the greedy tokens agree, and writes the raw lines and that summary to ``--out``
   (JSON, atomic) with the card, date and commit.

A run that fails is reported with its last lines; the others go on and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "ab_decode.py"


def parse_variant(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``LABEL=TREE[@VAR=VALUE,...]`` -> (label, tree, env); ValueError naming what is wrong."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or any(c.isspace() for c in label) or not rest:
        raise ValueError(f"variant {spec!r}: expected LABEL=TREE[@VAR=VALUE,...] with a one-word label")
    tree, _, env_part = rest.partition("@")
    env = {}
    for item in filter(None, env_part.split(",")):
        var, sep, value = item.partition("=")
        if not sep or not var.isidentifier():
            raise ValueError(f"variant {spec!r}: environment entry {item!r} is not VAR=VALUE")
        env[var] = value
    path = Path(tree).resolve()
    if not path.is_dir():
        raise ValueError(f"variant {spec!r}: tree {path} is not a folder")
    return label, path, env


def worker_cmd(worker: Path, tree: Path, label: str, args: list[str]) -> list[str]:
    """The command line of one worker run on ``tree``."""
    return [sys.executable, str(worker), "--tree", str(tree), "--label", label, *args]


def run_worker(worker: Path, tree: Path, label: str, env: dict, args: list[str], timeout: float):
    """One worker process: (return code, stdout lines, the last lines of stderr)."""
    cmd = worker_cmd(worker, tree, label, args)
    try:
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # its captured output is bytes whatever text= says
        so = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, so.splitlines(), [f"timed out after {timeout:g} s"]
    return out.returncode, out.stdout.splitlines(), out.stderr.splitlines()[-8:]


def parse_result(line: str) -> dict | None:
    """``RESULT <label> <config> b<batch> <tok/s> tok/s <us> us/step tokens <digest>`` -> dict, else None."""
    f = line.split()
    if len(f) != 10 or f[0] != "RESULT" or not f[3].startswith("b") or f[5] != "tok/s" or f[8] != "tokens":
        return None
    return {"label": f[1], "config": f[2], "batch": int(f[3][1:]), "tok_s": float(f[4]), "us_step": float(f[6]),
            "tokens": f[9]}  # fmt: skip


def summarize(results: list[dict], labels: list[str]) -> list[dict]:
    """Per (config, batch, label): runs, min / median / max tok/s, median over the first label's median,
    and whether every run of every label produced the same tokens for that (config, batch)."""
    rows = []
    keys = sorted({(r["config"], r["batch"]) for r in results})
    for config, batch in keys:
        mine = [r for r in results if (r["config"], r["batch"]) == (config, batch)]
        same = len({r["tokens"] for r in mine}) == 1
        first = [r["tok_s"] for r in mine if r["label"] == labels[0]]
        base = statistics.median(first) if first else None
        for label in labels:
            rates = [r["tok_s"] for r in mine if r["label"] == label]
            if not rates:
                continue
            med = statistics.median(rates)
            rows.append({"config": config, "batch": batch, "label": label, "runs": len(rates), "min": min(rates),
                         "median": med, "max": max(rates), "vs_first": med / base if base else None,
                         "same_tokens": same})  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="LABEL=TREE[@VAR=VALUE,...], at least two")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="u4g128_act")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=".cache/ab", help="the random checkpoints, shared by every run")
    ap.add_argument("--out", default=None, help="JSON file for the raw lines and the summary")
    ap.add_argument("--same-ok", action="store_true", help="allow variants that run the same code (A/A runs)")
    ap.add_argument("--run-timeout", type=float, default=600.0, help="seconds per worker process")
    ap.add_argument("--worker", default=str(WORKER), help=argparse.SUPPRESS)  # tests
    args = ap.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as exc:
        ap.error(str(exc))
    labels = [v[0] for v in variants]
    if len(variants) < 2 or len(set(labels)) != len(labels):
        ap.error(f"need at least two variants with distinct labels, got {labels}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    out = Path(args.out).resolve() if args.out else None
    if out is not None and not out.parent.is_dir():
        ap.error(f"--out: folder {out.parent} does not exist")
    worker = Path(args.worker)
    common = ["--configs", args.configs, "--batches", args.batches, "--steps", str(args.steps),
              "--repeat", str(args.repeat), "--workdir", args.workdir]  # fmt: skip

    # 1. what each variant runs (also checks every argument before anything is built)
    runtime = {}
    for label, tree, env in variants:
        rc, lines, err = run_worker(worker, tree, label, env, [*common, "--print-tree"], 300)
        tree_lines = [x for x in lines if x.startswith("TREE ")]
        if rc != 0 or len(tree_lines) != 1:
            print(f"ab_trees: {label}: cannot run tree {tree}:", *err, sep="\n  ", file=sys.stderr)
            return 2
        print(tree_lines[0], *(f"env {k}={v}" for k, v in env.items()), flush=True)
        runtime[label] = (tree_lines[0].split()[-1], tuple(sorted(env.items())))
    seen = {}
    for label, what in runtime.items():
        if what in seen and not args.same_ok:
            print(f"ab_trees: {label} and {seen[what]} run the same code with the same environment (runtime "
                  f"{what[0]}): a patch that did not apply? (--same-ok for an A/A run)", file=sys.stderr)  # fmt: skip
            return 2
        seen.setdefault(what, label)

    # 2. builds, side by side
    trees = {}
    for label, tree, env in variants:
        trees.setdefault(tree, (label, env))
    jobs = str(max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 2)) // len(trees)))
    procs = [(label, subprocess.Popen(worker_cmd(worker, tree, label, [*common, "--build-only"]),
                                      env={**os.environ, **env, "MAX_JOBS": jobs}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
             for tree, (label, env) in trees.items()]  # fmt: skip
    for label, p in procs:
        so, se = p.communicate()
        if p.returncode != 0:
            print(f"ab_trees: building {label}'s tree failed:", *se.splitlines()[-8:], sep="\n  ", file=sys.stderr)
            return 1
        print(*(x for x in so.splitlines() if x.startswith("BUILT ")), flush=True)

    # 3. rounds, order rotated each round
    results, raw, card, failed = [], [], None, 0
    for r in range(args.rounds):
        for i in range(len(variants)):
            label, tree, env = variants[(i + r) % len(variants)]
            rc, lines, err = run_worker(worker, tree, label, env, common, args.run_timeout)
            for line in lines:
                if line.startswith("CARD "):
                    card = line.split(None, 2)[2]
                res = parse_result(line)
                if res is not None:
                    res["round"] = r
                    results.append(res)
                    raw.append(line)
                    print(line, flush=True)
            if rc != 0:
                failed += 1
                print(f"ab_trees: round {r}, {label}: exit {rc}", *err, sep="\n  ", file=sys.stderr)

    # 4. summary
    rows = summarize(results, labels)
    print(f"\n{'config':12s} {'batch':>5s} {'variant':14s} {'runs':>4s} {'min':>9s} {'median':>9s} {'max':>9s} "
          f"{'vs first':>8s}  tokens")  # fmt: skip
    for row in rows:
        print(f"{row['config']:12s} {row['batch']:5d} {row['label']:14s} {row['runs']:4d} {row['min']:9.1f} "
              f"{row['median']:9.1f} {row['max']:9.1f} {row['vs_first'] or float('nan'):8.3f}  "
              f"{'same' if row['same_tokens'] else 'DIFFER'}")  # fmt: skip
    if out is not None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from kernels import git_commit, write_json_atomic

        meta = {
            "card": card,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "variants": {lb: {"tree": os.path.relpath(t), "env": e, "runtime": runtime[lb][0]}
                         for lb, t, e in variants},
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "variants")},
        }
        write_json_atomic(out, {"meta": meta, "results": results, "summary": rows, "lines": raw}, indent=1)
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
