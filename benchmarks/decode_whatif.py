"""What-if step times of the batch-1 decode step: kernels of one kind left out of the captured graph.

Writes Zephyr-7B-shaped random checkpoints (4-bit g128 act-order, 8-bit g128 act-order; ``e2e.py``),
loads each with the runtime and times 256 decode steps after a 512-token prompt with: everything
(``base``), every add + RMSNorm returning its input (``no_norms``: no norm kernel), decode attention
returning a view of qkv (``no_attention``), and both. The results of the altered steps are wrong;
only the timing matters: the difference to ``base`` is what those kernels cost in the step's chain,
overlap with their neighbours included. Same process, variants alternating, 2 rounds.

Usage::

    python benchmarks/decode_whatif.py        # needs a CUDA GPU; AB_WORK=DIR reuses checkpoints

The same steps ran on an H200 on 2026-11-28 (``results/ab_H200_2026-11-28/decode_step_whatif.log``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import zephyr_plugins.model as zm  # noqa: E402
from e2e import CONFIGS, reusable_checkpoint, timed, write_random_checkpoint  # noqa: E402
from zephyr_plugins.decode_graphs import DecodeGraphs  # noqa: E402
from zephyr_plugins.generation_api import SamplingParams  # noqa: E402
from zephyr_plugins.model_ops import ModelOps  # noqa: E402
from zephyr_plugins.runtime import Zephyr  # noqa: E402

STEPS = 256
_real_attention = zm.decode_attention
_skip = {"attention": False}


def _attention(qkv, cos, sin, k, v, slot, pad, locks, h, hkv, kv_len, window, block_keys, out_index):
    """The model's decode_attention, or (when left out) a view of qkv of the output's shape: no kernel."""
    if _skip["attention"]:
        return qkv[:, : h * k.shape[-1]]
    return _real_attention(qkv, cos, sin, k, v, slot, pad, locks, h, hkv, kv_len, window, block_keys, out_index)


def _ops(base: ModelOps, no_norms: bool) -> ModelOps:
    ops = ModelOps(base.compile, base.fused_decode, base.permuted_inputs, base.fused_swiglu)
    if no_norms:
        ops.add_rms_norm = lambda x, h, w, eps, perm=None: (x, x)
        ops.rms_norm = lambda x, w, eps, perm=None: x
    return ops


def main() -> None:
    work = os.environ.get("AB_WORK") or tempfile.mkdtemp(prefix="zephyr_ab_")
    names = ("u4g128_act", "u8g128_act")
    try:  # checkpoints already in AB_WORK are checked before anything runs (e2e.py's rule)
        reuse = {n: reusable_checkpoint(os.path.join(work, n), CONFIGS[n]) for n in names}
    except ValueError as exc:
        raise SystemExit(f"decode_whatif: {exc}") from None
    zm.decode_attention = _attention
    for cfg in names:
        folder = os.path.join(work, cfg)
        if not reuse[cfg]:
            write_random_checkpoint(folder, CONFIGS[cfg])
        llm = Zephyr.from_pretrained(folder, device="cuda", dtype=torch.float16, max_batch_size=8, max_seq_len=1024)
        llm.eos_token_ids = set()
        c = llm.model.ops
        variants = {"base": (_ops(c, False), False), "no_norms": (_ops(c, True), False),
                    "no_attention": (_ops(c, False), True), "no_norms_no_attention": (_ops(c, True), True)}
        g = torch.Generator().manual_seed(1)
        one = SamplingParams(max_new_tokens=1, temperature=0, repetition_penalty=1.0)
        short = SamplingParams(max_new_tokens=STEPS + 1, temperature=0, repetition_penalty=1.0)
        prompts = torch.randint(3, 32000, (1, 512), generator=g).tolist()
        for rnd in range(2):
            for name, (ops, no_attention) in variants.items():
                _skip["attention"] = no_attention
                llm.model.ops = ops
                llm.steps = DecodeGraphs(llm.model)  # captured again: the graph holds what runs now
                llm.generate_tokens(prompts, short)
                t1 = timed(lambda: llm.generate_tokens(prompts, one), repeat=3)
                tt = timed(lambda: llm.generate_tokens(prompts, short), repeat=1)
                step = (tt - t1) / STEPS
                print(f"{cfg} batch 1 round {rnd} {name:>22}: {1 / step:8.1f} tok/s  {step * 1e6:7.1f} us/step",
                      flush=True)  # fmt: skip
        _skip["attention"] = False
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
