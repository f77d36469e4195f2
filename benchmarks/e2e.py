"""End-to-end generation benchmark of the runtime on a Zephyr-7B-shaped model.

In one run: random-weight Zephyr-7B-shaped checkpoints written by our writer
(4-bit g128 act-order, 8-bit g128 act-order, fp16; random codes, built on the
GPU), each loaded with ``Zephyr.from_pretrained``; a 512-token prompt, 256 new
tokens, greedy, at batch 1, 8 and 32; the prefill time of a 4096-token
prompt; transformers' eager fp16 ``generate`` at batch 1 as the baseline; a
device-to-device copy for the bandwidth ceiling.

Decode rate = (256 - 1) new tokens per row / (time of a 256-token generation
minus time of a 1-token generation), so prefill is excluded. Achieved GB/s
counts the weight bytes each decode step reads (the KV cache is reported
apart). EOS is disabled so every run decodes its full length.

Usage::

    python benchmarks/e2e.py [--out DIR] [--configs u4g128_act,u8g128_act,fp16] [--batches 1,8,32] [--quick]

Writes ``e2e_<card>_<date>.json`` and ``.png`` into DIR (default
``benchmarks/results``) and prints a table. Quantized configs are skipped,
with a message, when no CUDA kernel backend can serve them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
# The commit and ZEPHYR_* switches a result file records, and its atomic writer.
from kernels import git_commit, write_json_atomic, zephyr_env  # noqa: E402

ZEPHYR_7B = dict(
    model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float16",
)  # fmt: skip
CONFIGS = {"u4g128_act": (4, 128, True), "u8g128_act": (8, 128, True), "fp16": None}
FUSED = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, bytes read + written per second (GB/s), median of 20."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / sorted(times[5:])[len(times[5:]) // 2] / 1e9


def cuda_backend_ok(bits: int, group_size: int) -> tuple[bool, str]:
    from zephyr_plugins.backends.base import LayerSpec
    from zephyr_plugins.plugins import kernel_backends

    spec = LayerSpec(4096, 4096, bits, group_size, True, True, 1, torch.float16, "cuda", torch.cuda.get_device_capability())
    reasons = []
    for b in kernel_backends():
        if b.name in ("reference", "dense"):
            continue
        ok, why = b.can_implement(spec)
        if ok:
            return True, b.name
        reasons.append(f"{b.name}: {why}")
    return False, "; ".join(reasons) or "no CUDA kernel backend registered"


def reusable_checkpoint(folder: str, layout, config: dict = ZEPHYR_7B) -> bool:
    """Whether ``folder`` holds a checkpoint an earlier run wrote for ``layout`` and ``config`` (writes are
    atomic, so one with a config.json is complete). Raises ``ValueError`` when it holds another layout or
    model shape."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        return False
    with open(os.path.join(folder, "config.json")) as fh:
        cfg = json.load(fh)
    qc_path = os.path.join(folder, "quantize_config.json")
    found = None
    if os.path.exists(qc_path):
        with open(qc_path) as fh:
            qc = json.load(fh)
        found = (qc.get("bits"), qc.get("group_size"), qc.get("desc_act"))
    want = None if layout is None else tuple(layout)
    shape = {k: cfg.get(k) for k in config}
    if found != want or shape != config:
        raise ValueError(f"{folder} holds another checkpoint (layout {found}, want {want}"
                         f"{'' if shape == config else '; its config.json differs from the model written here'}); "
                         "remove it or pass another --workdir")
    return True


def checked_run_args(ap, args) -> tuple[list[str], list[int], dict[str, bool]]:
    """The ``--configs``, ``--batches`` and ``--workdir`` of a run, checked before anything runs (shared
    with ``decode_timeline.py``): unknown configs, batches that are not positive integers and a workdir
    holding another checkpoint are usage errors (``ap.error``). Returns the config names, the batches and,
    per config, whether ``--workdir`` already holds its checkpoint (``reusable_checkpoint``)."""
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown --configs {unknown}; known: {list(CONFIGS)}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches must be integers separated by commas, got {args.batches!r}")
    if min(batches) < 1:
        ap.error(f"--batches must be >= 1, got {args.batches!r}")
    try:
        reuse = {n: bool(args.workdir) and reusable_checkpoint(os.path.join(args.workdir, n), CONFIGS[n]) for n in names}
    except ValueError as exc:
        ap.error(str(exc))
    return names, batches, reuse


def write_random_checkpoint(folder: str, layout, device: str = "cuda", config: dict = ZEPHYR_7B) -> str:
    """A Zephyr-7B-shaped checkpoint of random weights: GPTQ codes (``layout = (bits, group, act_order)``) or fp16."""
    from zephyr_plugins.config import GPTQConfig
    from zephyr_plugins.writer import pack_layer, write_checkpoint

    c = config
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    shapes = {  # name: (K, N)
        "self_attn.q_proj": (d, c["num_attention_heads"] * hd), "self_attn.k_proj": (d, c["num_key_value_heads"] * hd),
        "self_attn.v_proj": (d, c["num_key_value_heads"] * hd), "self_attn.o_proj": (c["num_attention_heads"] * hd, d),
        "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d),
    }  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    dev = device

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * std).half()

    tensors = {"model.embed_tokens.weight": randn(c["vocab_size"], d), "lm_head.weight": randn(c["vocab_size"], d),
               "model.norm.weight": torch.ones(d, dtype=torch.float16)}  # fmt: skip
    cfg = None
    if layout is not None:
        bits, gs, act = layout
        cfg = GPTQConfig(bits=bits, group_size=gs, desc_act=act, sym=True)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(d, dtype=torch.float16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.float16)
        g_idx_of = {}
        for name, (k, n) in shapes.items():
            if cfg is None:
                tensors[f"{p}.{name}.weight"] = randn(n, k).cpu()
                continue
            # As in real GPTQ act-order, layers reading the same input share one g_idx.
            key = name.split(".")[0] if name.split(".")[1] in FUSED[name.split(".")[0]] else name
            if key not in g_idx_of:
                order = torch.randperm(k, generator=g, device=dev) if cfg.desc_act else torch.arange(k, device=dev)
                g_idx_of[key] = torch.empty(k, dtype=torch.int32, device=dev)
                g_idx_of[key][order] = (torch.arange(k, device=dev) // gs).to(torch.int32)
            groups = cfg.num_groups(k)
            q = torch.randint(0, 1 << bits, (k, n), generator=g, device=dev)
            zeros = torch.full((groups, n), 1 << (bits - 1), device=dev)
            scales = torch.rand(groups, n, generator=g, device=dev) * (0.04 / (1 << bits)) + 1e-4
            for key_t, t in pack_layer(q, zeros, scales, g_idx_of[key], cfg).items():
                tensors[f"{p}.{name}.{key_t}"] = t.cpu().clone()  # shared g_idx: safetensors wants distinct storage
    tensors = {k: v.cpu() for k, v in tensors.items()}
    write_checkpoint(folder, tensors, c, cfg, overwrite=True) if cfg else _write_float(folder, tensors, c)
    return folder


def _write_float(folder: str, tensors, config: dict) -> None:
    from zephyr_plugins.checkpoint import atomic_folder, save_tensors, write_json

    with atomic_folder(folder, overwrite=True) as tmp:
        save_tensors(tmp, tensors)
        write_json(os.path.join(tmp, "config.json"), config)


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every linear's tensors (the embedding reads one row)."""
    from zephyr_plugins.quant_linear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.qzeros, m.g_idx))
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def timed(fn, repeat: int = 1) -> float:
    best = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best.append(time.perf_counter() - t)
    return sorted(best)[len(best) // 2]


def bench_runtime(folder: str, batches, prompt_len: int, new_tokens: int, prefill_len: int, quick: bool,
                  ablate: bool = False) -> dict:
    from zephyr_plugins.generation_api import SamplingParams
    from zephyr_plugins.runtime import Zephyr

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    max_len = max(prompt_len + new_tokens, prefill_len + 1)
    llm = Zephyr.from_pretrained(folder, device="cuda", dtype=torch.float16, max_batch_size=max(batches),
                                 max_seq_len=-(-max_len // 256) * 256)  # fmt: skip
    load_s = time.perf_counter() - t0
    llm.eos_token_ids = set()  # random weights: decode the full length every time
    out = {"load_s": load_s, "kernels": sorted(set(llm.kernels.values())), "weight_bytes": weight_bytes(llm.model)}
    g = torch.Generator().manual_seed(1)
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    one = SamplingParams(max_new_tokens=1, temperature=0, repetition_penalty=1.0)
    runs = {}
    for b in batches:
        prompts = torch.randint(3, 32000, (b, prompt_len), generator=g).tolist()
        llm.generate_tokens(prompts, greedy)  # warm-up: captures the decode graphs
        t_one = timed(lambda: llm.generate_tokens(prompts, one), repeat=3)
        t_all = timed(lambda: llm.generate_tokens(prompts, greedy), repeat=1 if quick else 2)
        step = (t_all - t_one) / (new_tokens - 1)
        runs[b] = {"decode_tok_s": b / step, "ms_per_step": step * 1e3, "prefill_ms": t_one * 1e3,
                   "weight_gb_s": out["weight_bytes"] / step / 1e9}  # fmt: skip
        print(f"  batch {b:>2}: {b / step:8.1f} tok/s  {step * 1e3:6.2f} ms/step  prefill {t_one * 1e3:7.1f} ms", flush=True)
    out["batches"] = runs
    out["fused_attention"] = llm.fused_attention
    out["permuted_layers"] = llm.permuted_layers
    out["dense_gemv_layers"] = llm.dense_gemv_layers
    if ablate:  # what the fused (compiled) elementwise ops, the CUDA graphs and the attention kernel each buy
        from zephyr_plugins.decode_graphs import DecodeGraphs
        from zephyr_plugins.model_ops import ModelOps

        # 256 steps: over 64, the 1-token run's jitter (32-56 ms on the H100) moved the rate by up to 25%
        # (batch 1 unfused attention once read 454 tok/s; 348 in a 256-step rerun, fused 364-368).
        steps = 256
        short = SamplingParams(max_new_tokens=steps + 1, temperature=0, repetition_penalty=1.0)
        compiled_ops = llm.model.ops

        def short_run(label: str, prompts, ops, graphs: bool = True, repeat: int = 1) -> None:
            """Decode rate of `steps` steps after the prompt with these ops, recorded as batch<B>_<label>."""
            b = len(prompts)
            llm.model.ops, llm.steps = ops, DecodeGraphs(llm.model, enabled=graphs)
            llm.generate_tokens(prompts, short)
            t_one = timed(lambda: llm.generate_tokens(prompts, one), repeat=5)
            step = (timed(lambda: llm.generate_tokens(prompts, short), repeat=repeat) - t_one) / steps
            out[f"batch{b}_{label}"] = {"decode_tok_s": b / step, "ms_per_step": step * 1e3}
            print(f"  batch {b:>2} {label}: {b / step:8.1f} tok/s  {step * 1e3:6.2f} ms/step", flush=True)

        prompts = torch.randint(3, 32000, (1, prompt_len), generator=g).tolist()
        short_run("plain_ops_graphs", prompts,
                  ModelOps(False, compiled_ops.fused_decode, compiled_ops.permuted_inputs, compiled_ops.fused_swiglu))
        short_run("compiled_ops_no_graphs", prompts, compiled_ops, graphs=False)
        # The fused decode-attention kernel against the unfused ops (rope, cache writes, matmuls, softmax),
        # act-order inputs written permuted by their producers against each layer gathering its own, and
        # the SwiGLU in the gate/up kernel against silu_mul after it; all timed here the same way (256
        # steps after a 512-token prompt).
        c = compiled_ops
        variants = [("default", c.fused_decode, c.permuted_inputs, c.fused_swiglu)]
        if c.fused_decode:
            variants.append(("unfused_attention", False, c.permuted_inputs, c.fused_swiglu))
        if c.permuted_inputs:
            variants.append(("gathered_inputs", c.fused_decode, False, c.fused_swiglu))
        if c.fused_swiglu:
            variants.append(("unfused_swiglu", c.fused_decode, c.permuted_inputs, False))
        for b in sorted({1, max(batches)}) if len(variants) > 1 else []:
            prompts = torch.randint(3, 32000, (b, prompt_len), generator=g).tolist()
            for label, fused, permuted, swiglu in variants:
                short_run(label, prompts, ModelOps(c.compile, fused_decode=fused, permuted_inputs=permuted,
                                                   fused_swiglu=swiglu), repeat=3)  # fmt: skip
        if llm.dense_gemv_layers:  # float layers (all of fp16, the head of the others) in cuBLAS instead
            from zephyr_plugins.model import Linear

            dense = [m for m in llm.model.modules() if isinstance(m, Linear) and m.gemv_rows]
            rows = {m: m.gemv_rows for m in dense}
            for b in sorted({1, max(batches)}):
                prompts = torch.randint(3, 32000, (b, prompt_len), generator=g).tolist()
                short_run("dense_gemv", prompts, compiled_ops, repeat=3)
                for m in dense:
                    m.gemv_rows = 0
                short_run("cublas_float_layers", prompts, compiled_ops, repeat=3)
                for m in dense:
                    m.gemv_rows = rows[m]
        llm.model.ops, llm.steps = compiled_ops, DecodeGraphs(llm.model)
    long_prompt = torch.randint(3, 32000, (1, prefill_len), generator=g).tolist()
    llm.generate_tokens(long_prompt, one)
    out["prefill_4096_ms"] = timed(lambda: llm.generate_tokens(long_prompt, one), repeat=3) * 1e3
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    kv = 2 * 32 * 8 * 128 * 2  # bytes per cached token (K and V, 32 layers, 8 heads x 128, fp16)
    out["kv_bytes_per_token"] = kv
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_transformers(prompt_len: int, tokens: int = 8) -> dict:
    """transformers' eager ``generate`` (fp16, random weights, batch 1): what users have today."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**{k: v for k, v in ZEPHYR_7B.items() if k not in ("model_type", "architectures", "torch_dtype")})
    with torch.device("cuda"):
        model = MistralForCausalLM(cfg).half().eval()
    ids = torch.randint(3, 32000, (1, prompt_len), device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
    t1 = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), repeat=2)
    tn = timed(lambda: model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw), repeat=2)
    step = (tn - t1) / (tokens - 1)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"decode_tok_s": 1 / step, "ms_per_step": step * 1e3, "tokens": tokens}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [n for n, r in result["configs"].items() if "batches" in r]
    batches = result["args"]["batches"]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        vals = [result["configs"][n]["batches"][str(b)]["decode_tok_s"] for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=n)
    if "transformers_fp16" in result:
        ax.axhline(result["transformers_fp16"]["decode_tok_s"], color="k", ls="--", label="transformers eager fp16 (b=1)")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(f"Zephyr-7B-shaped decode, {result['card']}, {result['date'][:10]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--workdir", default=None,
                    help="where the random checkpoints are written (default: a temp dir); one found there is reused")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    names, batches, reuse = checked_run_args(ap, args)
    if not torch.cuda.is_available():
        print("e2e benchmark: needs a CUDA GPU", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name()
    result = {"card": card, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "commit": git_commit(),
              "torch": torch.__version__, "env": zephyr_env(), "args": {**vars(args), "batches": batches}, "configs": {}}  # fmt: skip
    result["copy_gb_s"] = copy_bandwidth_gbs()
    print(f"{card}: device copy {result['copy_gb_s']:.0f} GB/s (read + write)", flush=True)
    if not args.no_baseline:
        result["transformers_fp16"] = bench_transformers(args.prompt)
        print(f"transformers eager fp16 batch 1: {result['transformers_fp16']['decode_tok_s']:.1f} tok/s", flush=True)
    work = args.workdir or tempfile.mkdtemp(prefix="zephyr_e2e_")
    stem = f"e2e_{card.replace(' ', '_')}_{result['date'][:10]}"

    def save() -> None:  # after every config, so a run cut short keeps what it measured
        write_json_atomic(os.path.join(args.out, stem + ".json"), result, indent=2)

    for name in names:
        layout = CONFIGS[name]
        if layout is not None:
            ok, why = cuda_backend_ok(layout[0], layout[1])
            if not ok:
                print(f"{name}: SKIPPED, no CUDA kernel backend ({why}); the reference backend is far too slow for 7B")
                result["configs"][name] = {"skipped": why}
                continue
        folder = os.path.join(work, name)
        t = time.perf_counter()
        if reuse[name]:
            print(f"{name}: checkpoint reused from {folder}", flush=True)
        else:
            write_random_checkpoint(folder, layout)
            print(f"{name}: checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
        try:
            r = bench_runtime(folder, batches, args.prompt, args.new_tokens, args.prefill, args.quick,
                              ablate=not args.quick and name == names[0])
        except Exception as exc:  # keep the other configs' numbers
            import traceback

            traceback.print_exc()
            r = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        r["write_s"] = time.perf_counter() - t
        result["configs"][name] = r
        if "batches" in r:
            r["batches"] = {str(k): v for k, v in r["batches"].items()}
            print(f"{name}: prefill {args.prefill} tokens {r['prefill_4096_ms']:.0f} ms, peak {r['peak_gib']:.1f} GiB, "
                  f"kernels {r['kernels']}, fused attention {r['fused_attention']}, permuted inputs {r['permuted_layers']} layers, load {r['load_s']:.0f} s", flush=True)  # fmt: skip
        save()
    save()
    try:
        plot(result, os.path.join(args.out, stem + ".png"))
    except Exception as exc:
        print(f"plot failed: {exc}")
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    base = result.get("transformers_fp16", {}).get("decode_tok_s")
    print(f"\n{result['card']}  copy {result['copy_gb_s']:.0f} GB/s  commit {result['commit'][:10]}")
    print(f"{'config':<12}{'batch':>6}{'tok/s':>10}{'ms/step':>9}{'GB/s':>8}{'%copy':>7}{'x hf':>7}{'prefill4k ms':>14}{'peak GiB':>9}")
    if base:
        print(f"{'hf-eager':<12}{1:>6}{base:>10.1f}{1e3 / base:>9.2f}")
    for name, r in result["configs"].items():
        if "batches" not in r:
            print(f"{name:<12} {r.get('skipped') or r.get('error')}")
            continue
        for b, x in r["batches"].items():
            ratio = f"{x['decode_tok_s'] / base:7.1f}" if base and b == "1" else " " * 7
            print(f"{name:<12}{b:>6}{x['decode_tok_s']:>10.1f}{x['ms_per_step']:>9.2f}{x['weight_gb_s']:>8.0f}"
                  f"{100 * x['weight_gb_s'] / result['copy_gb_s']:>7.0f}{ratio}{r['prefill_4096_ms']:>14.0f}{r['peak_gib']:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
