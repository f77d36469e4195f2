"""``zephyr-plugins ppl``: perplexity of a model (GPTQ checkpoint or float) on a text file.

    zephyr-plugins ppl ./zephyr-gptq --text eval.txt --seqlen 2048
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zephyr-plugins ppl", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a GPTQ checkpoint folder / Hub id, or a float model folder")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--device", default=None, help="default: cuda if available")
    return p


def _load(ref: str, device: str):
    from .checkpoint import resolve_checkpoint
    from .config import GPTQConfig
    from .errors import CheckpointError

    folder = resolve_checkpoint(ref)
    try:
        GPTQConfig.from_folder(folder)
    except CheckpointError:
        # No GPTQ settings: a float model.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.float16 if device == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval(), AutoTokenizer.from_pretrained(folder)
    from .loader import load

    return load(folder, device=device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .evaluate import perplexity

    if not os.path.isfile(args.text):
        print(f"zephyr-plugins ppl: error: {args.text}: no such file", file=sys.stderr)
        return 2
    with open(args.text, encoding="utf-8") as fh:
        text = fh.read()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok = _load(args.model, device)
        ppl = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.max_windows)
    except ValueError as exc:
        print(f"zephyr-plugins ppl: error: {exc}", file=sys.stderr)
        return 2
    print(f"perplexity {ppl:.4f} ({args.model}, seqlen {args.seqlen})")
    return 0
