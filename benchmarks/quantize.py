"""GPTQ time for Mistral-7B-shaped decoder blocks (random weights) on one GPU.

Runs the production path (:func:`zephyr_plugins.quantize.quantize_block`:
Hessians, true-sequential GPTQ of the 7 linears, replay) on ``--blocks``
blocks of Mistral-7B's shape (hidden 4096, FFN 14336, 32 heads / 8 KV heads)
with ``--nsamples`` x ``--seqlen`` random calibration activations, 4-bit g128
act-order by default. The whole-model time is *extrapolated* from the
per-block mean (x 32 blocks): the output says so.

    python benchmarks/quantize.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from zephyr_plugins.config import GPTQConfig  # noqa: E402
from zephyr_plugins.quantize import quantize_block  # noqa: E402
from kernels import git_commit, write_json_atomic  # noqa: E402  (commit and writer of a result file)

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, num_hidden_layers=32, max_position_embeddings=32768, vocab_size=32000,
                  sliding_window=None, rms_norm_eps=1e-5, rope_theta=10000.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--blocks", type=int, default=2, help="blocks to quantize and time")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-desc-act", action="store_true")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per block forward")
    p.add_argument("--mse", type=float, default=0.0, help="clip search norm (GPTQConfig.mse; 0: min/max grid)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/quantize.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding

    dev = torch.device("cuda")
    hf_cfg = MistralConfig(**MISTRAL_7B)
    hf_cfg._attn_implementation = "sdpa"
    cfg = GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=not args.no_desc_act, damp_percent=0.1,
                     mse=args.mse)
    torch.manual_seed(0)
    rotary = MistralRotaryEmbedding(config=hf_cfg).to(dev)
    pos = torch.arange(args.seqlen, device=dev).unsqueeze(0)
    inputs = []
    for _ in range(0, args.nsamples, args.batch_size):
        h = torch.randn(args.batch_size, args.seqlen, hf_cfg.hidden_size, device=dev, dtype=torch.float16)
        cos, sin = rotary(h, pos)
        inputs.append((h, {"attention_mask": None, "position_ids": pos, "position_embeddings": (cos, sin)}))
    times = []
    for i in range(args.blocks):
        block = MistralDecoderLayer(hf_cfg, layer_idx=i).to(dev, torch.float16).eval()
        for m in block.modules():  # random weights at a realistic scale (std 0.02)
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, outs = quantize_block(block, inputs, cfg, prefix=f"model.layers.{i}.")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        print(f"block {i}: {times[-1]:.2f} s", flush=True)
        del block
    per_block = sum(times) / len(times)
    result = {
        "benchmark": "gptq_quantize_mistral7b_blocks",
        "card": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "config": cfg.to_dict(),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "blocks_timed": args.blocks,
        "seconds_per_block": times,
        "mean_seconds_per_block": per_block,
        "extrapolated_32_blocks_seconds": per_block * 32,
        "note": "whole-model time EXTRAPOLATED from the timed blocks x 32 (embedding/lm_head excluded)",
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    os.makedirs(args.out, exist_ok=True)
    card = result["card"].replace(" ", "_")
    tag = f"_mse{args.mse:g}" if args.mse else ""
    path = os.path.join(args.out, f"quantize_gptq_mistral7b_{card}{tag}.json")
    write_json_atomic(path, result, indent=2)
    print(f"| card | per block (s) | 32 blocks, extrapolated (min) | peak GiB |\n|---|---|---|---|\n"
          f"| {result['card']} | {per_block:.2f} | {per_block * 32 / 60:.1f} | {result['peak_memory_gib']:.1f} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
