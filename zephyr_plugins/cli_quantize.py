"""``zephyr-plugins quantize``: GPTQ-quantize a float Mistral/Llama model into a checkpoint folder.

    zephyr-plugins quantize HuggingFaceH4/zephyr-7b-beta --bits 4 --group-size 128 --desc-act \\
        --damp 0.1 --dataset wikitext2 --nsamples 128 --seqlen 4096 --out zephyr-gptq
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zephyr-plugins quantize", description=__doc__.splitlines()[0])
    p.add_argument("model", help="float model: a folder or a Hub id")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128, help="-1 for one group per output column")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize inputs by descending Hessian diagonal")
    p.add_argument("--asym", action="store_true", help="asymmetric zero points (default: symmetric)")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--damp", type=float, default=0.1, help="dampening, fraction of the mean Hessian diagonal")
    p.add_argument("--mse", type=float, default=0.0,
                   help="clip search norm p (e.g. 2.4): per group, the shrunken range with the least sum |w - q|^p; "
                        "0 (default): min/max")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="clipped to the model's maximum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where blocks are quantized (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import GPTQConfig
    from .quantize import quantize_to_folder

    try:
        cfg = GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=not args.asym,
                         static_groups=args.static_groups, damp_percent=args.damp, mse=args.mse)
        start = time.time()
        out = quantize_to_folder(args.model, args.out, cfg, dataset=args.dataset, nsamples=args.nsamples,
                                 seqlen=args.seqlen, seed=args.seed, device=args.device,
                                 overwrite=args.overwrite, batch_size=args.batch_size)
    except (ValueError, FileExistsError) as exc:
        print(f"zephyr-plugins quantize: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - start:.1f} s")
    return 0
