"""``zephyr-plugins generate MODEL "prompt"``: one completion, streamed to stdout.

The prompt is one user turn in the model's chat template (Zephyr's), unless
``--raw`` is given. Sampling defaults are the model card's.

    zephyr-plugins generate ./zephyr-gptq "Tell me about AI" --max-new-tokens 128 --temperature 0.7
    zephyr-plugins generate TheBloke/zephyr-7B-beta-GPTQ:main "1, 2, 3," --raw --temperature 0
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .generation_api import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``chat``: model, device, sampling."""
    ap.add_argument("model", help="checkpoint folder, or a Hub id 'repo' / 'repo:branch'")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--backend", default=None, help="force a kernel backend by name")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    ap.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    ap.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=None)


def load_model(args):
    import torch

    from .runtime import Zephyr

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Zephyr.from_pretrained(args.model, device=args.device, dtype=dtype, max_batch_size=1,
                                  max_seq_len=args.max_seq_len, backend=args.backend)  # fmt: skip


def sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-plugins generate", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("prompt")
    ap.add_argument("--raw", action="store_true", help="complete the prompt as is (no chat template)")
    args = ap.parse_args(argv)
    llm = load_model(args)
    if args.raw:
        from .generation_api import SamplingParams

        pieces = (c.text for c in llm.stream_complete(args.prompt, SamplingParams(**sampling(args))))
    else:
        pieces = llm.stream(args.prompt, **sampling(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
