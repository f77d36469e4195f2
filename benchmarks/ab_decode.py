"""One side of a same-machine A/B of decode speed: this tree's runtime on Zephyr-7B-shaped random checkpoints.

Two builds (say main and a change) are compared by running this script once per tree and round, one
process each, so that each gets its own CUDA context and its own kernel build (the kernel cache is keyed
by the sources), and alternating the trees so that a drift of the machine does not favour one. In one
device call, for example::

    git archive main | (mkdir -p scratch/main && tar -x -C scratch/main)
    patch -p1 -d scratch/change < change.patch     # not `git apply` there: see below
    export ZEPHYR_CUDA_ARCHS=90a ZEPHYR_KERNEL_CACHE=$PWD/.cache/zephyr_kernels
    for r in 0 1 2; do
      for tree in scratch/change scratch/main; do
        python benchmarks/ab_decode.py --tree $tree --workdir .cache/ab --label $(basename $tree)
      done
    done

``--tree`` (default: the tree this script is in) is the tree whose runtime runs: its ``zephyr_plugins``,
its ``kernels/`` and its ``benchmarks/e2e.py`` come first on ``sys.path``, and the script refuses to run
if ``zephyr_plugins`` or the kernel sources it finds are elsewhere. ``PYTHONPATH`` does not choose the
tree: ``e2e.py`` puts its own tree first on ``sys.path`` when imported, so before ``--tree`` every run of
one tree's copy of this script measured that tree, whatever ``PYTHONPATH`` said (session 25's first A/B
runs compared main with itself that way). Each run first prints::

    TREE <label> <tree> kernels <kernel source folder> key <kernel cache key> runtime <digest>

(``--print-tree`` prints only that and exits, without a GPU; ``--build-only`` builds the tree's kernels
and exits). Two trees with the same key run the same kernels, with the same runtime digest (the key and
the package's Python sources) the same code. ``benchmarks/ab_trees.py`` runs the whole loop and refuses
two variants that would run the same code. A patch is applied to a scratch tree with
``patch -p1 -d DIR``: ``git apply`` run inside a folder of this repository skips, without a word, every
path of the patch outside that folder.

Per configuration and batch it prints one line::

    RESULT <label> <config> b<batch> <tok/s> tok/s <us> us/step tokens <sha1 of the generated ids>

The rate is that of ``--steps`` greedy steps after a 512-token prompt (random ids, seed 1): the best of
``--repeat`` full generations less the best of as many 1-token ones, over steps - 1 (graphs captured by
a warm-up generation first). Equal token hashes mean both builds produced the same greedy tokens.
EOS is ignored (random weights). Checkpoints are written by ``e2e.write_random_checkpoint`` into
``--workdir`` (one already there is reused; first run ~5 s each on the GPU).

How far apart one build's processes read (H200, 4-bit g128 act-order, batch 1, session 25): 546.6-551.4
tok/s over 8 processes on one machine, 547.1-563.2 over 8 on another, and the first process on a
just-started machine up to 572. Take three rounds or more and compare ranges, not single reads.

A scratch version of this worker (the same timing; fixed arguments) produced the same-run A/B logs under
``results/ab_H200_2026-11-28/`` of sessions 23 and 24 (there the two trees' rates, timelines and test
counts differ, so each process ran its own tree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def runtime_tree(tree) -> tuple[Path, Path, str]:
    """Put ``tree``'s runtime first on ``sys.path`` and import it: (the tree, its kernel source folder, the
    kernel cache key). ValueError where it is not a tree of this repository or where ``e2e.py``,
    ``zephyr_plugins`` or the kernel sources come from elsewhere (one of them imported already)."""
    tree = Path(tree).resolve()
    if not (tree / "zephyr_plugins" / "__init__.py").is_file() or not (tree / "benchmarks" / "e2e.py").is_file():
        raise ValueError(f"--tree {tree}: not a zephyr-plugins tree (no zephyr_plugins/__init__.py or "
                         "benchmarks/e2e.py there)")  # fmt: skip
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]
    import e2e
    import zephyr_plugins
    from zephyr_plugins import kernel_build

    for what, path in (("benchmarks/e2e.py", e2e.__file__), ("zephyr_plugins", zephyr_plugins.__file__),
                       ("the kernel sources", kernel_build.KERNEL_DIR)):  # fmt: skip
        if tree not in Path(path).resolve().parents:
            raise ValueError(f"--tree {tree}: {what} comes from {path}, outside that tree (imported before; "
                             "run each tree in a process of its own)")  # fmt: skip
    return tree, kernel_build.KERNEL_DIR, kernel_build.cache_key()


def runtime_hash(tree: Path, kernel_key: str) -> str:
    """A digest of what a run of ``tree`` executes: its ``zephyr_plugins`` Python sources and the kernel
    cache key (the kernel sources, torch, CUDA, archs). Equal digests: the same runtime."""
    h = hashlib.sha256(kernel_key.encode())
    pkg = tree / "zephyr_plugins"
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tree", default=str(ROOT))
    try:
        tree, kernel_dir, key = runtime_tree(pre.parse_known_args(argv)[0].tree)
    except ValueError as exc:
        print(f"ab_decode: {exc}", file=sys.stderr)
        return 2
    from e2e import CONFIGS, checked_run_args, write_random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(ROOT), help="the tree whose runtime and kernels run (default: this one)")
    ap.add_argument("--print-tree", action="store_true", help="print the TREE line and exit (no GPU needed)")
    ap.add_argument("--build-only", action="store_true", help="build the tree's kernels and exit (BUILT line)")
    ap.add_argument("--configs", default="u4g128_act")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--workdir", default=None, help="where the random checkpoints go (one found there is reused)")
    ap.add_argument("--label", default="tree", help="first field of each RESULT line (which tree this is)")
    ap.add_argument("--steps", type=int, default=256, help="greedy steps per timed generation (>= 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed generations per batch, best taken (>= 1)")
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args(argv)
    names, batches, reuse = checked_run_args(ap, args)  # before anything runs (e2e.py's rule)
    if args.steps < 2 or args.repeat < 1 or args.prompt < 1:
        ap.error("--steps must be >= 2, --repeat and --prompt >= 1")
    if any(c.isspace() for c in args.label) or not args.label:
        ap.error(f"--label must be one word, got {args.label!r}")
    print(f"TREE {args.label} {tree} kernels {kernel_dir} key {key} runtime {runtime_hash(tree, key)}", flush=True)
    if args.print_tree:
        return 0
    if args.build_only:
        from zephyr_plugins.kernel_build import ensure_built

        ok, why = ensure_built()
        print(f"BUILT {args.label} {'ok' if ok else 'failed'}{'' if ok else ': ' + str(why)}", flush=True)
        return 0 if ok else 1

    import torch

    if not torch.cuda.is_available():
        print("ab_decode: needs a CUDA GPU", file=sys.stderr)
        return 1
    print(f"CARD {args.label} {torch.cuda.get_device_name()}", flush=True)
    from zephyr_plugins.generation_api import SamplingParams
    from zephyr_plugins.runtime import Zephyr

    work = args.workdir or tempfile.mkdtemp(prefix="zephyr_ab_")
    full = SamplingParams(max_new_tokens=args.steps, temperature=0, repetition_penalty=1.0)
    one = SamplingParams(max_new_tokens=1, temperature=0, repetition_penalty=1.0)

    def best(fn):
        times, out = [], None
        for _ in range(args.repeat):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times), out

    for cfg in names:
        folder = os.path.join(work, cfg)
        if not reuse[cfg]:
            write_random_checkpoint(folder, CONFIGS[cfg])
        max_len = -(-(args.prompt + args.steps + 1) // 256) * 256
        llm = Zephyr.from_pretrained(folder, device="cuda", dtype=torch.float16, max_batch_size=max(batches),
                                     max_seq_len=max_len)  # fmt: skip
        llm.eos_token_ids = set()
        g = torch.Generator().manual_seed(1)
        for b in batches:
            prompts = torch.randint(3, 32000, (b, args.prompt), generator=g).tolist()
            llm.generate_tokens(prompts, full)  # warm-up: captures the decode graphs
            t_one, _ = best(lambda: llm.generate_tokens(prompts, one))
            t_all, tokens = best(lambda: llm.generate_tokens(prompts, full))
            step = (t_all - t_one) / (args.steps - 1)
            digest = hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:10]
            print(f"RESULT {args.label} {cfg} b{b} {b / step:9.1f} tok/s {step * 1e6:8.1f} us/step tokens {digest}",
                  flush=True)  # fmt: skip
        del llm
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
