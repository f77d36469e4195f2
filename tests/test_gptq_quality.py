"""Real-model quality: SmolLM2-135M, float vs RTN vs GPTQ perplexity on held-out Wikipedia text (slow).

Every model is scored on the same 24 windows of 512 tokens (12k tokens), spread
evenly over the whole held-out text; with 4 windows (2k tokens) the GPTQ/RTN
comparison flipped sign from one slice of text to the next. Ratios of two
models are compared window by window (paired), and a bootstrap interval over
the windows is printed with the table.
"""

import math
import random
import time

import pytest
import torch

from zephyr_plugins.assets import load_float, read_text
from zephyr_plugins.config import GPTQConfig

# Calibration a 2-core CI machine affords (about a minute per GPTQ run). SmolLM2's
# weights sit on a 4-bit grid in blocks of 32 (it ships as Q4_1), so quality is
# judged at group size 128.
NSAMPLES, SEQLEN = 16, 256
EVAL_SEQLEN, EVAL_WINDOWS = 512, 24
MSE = 2.4  # the clip search's norm (GPTQConfig.mse)
GPTQ4, GPTQ8, RTN4 = "GPTQ 4-bit g128 act-order", "GPTQ 8-bit g128 act-order", "RTN 4-bit g128"
GPTQ4_CLIP, RTN4_CLIP = f"GPTQ 4-bit g128 act-order, clip search (mse={MSE})", f"RTN 4-bit g128, clip search (mse={MSE})"


def _rtn_(model, cfg):
    """Round-to-nearest in place (fake-quantized weights), the baseline GPTQ must beat."""
    from zephyr_plugins.reference import quantize_rtn
    from zephyr_plugins.writer import quantizable_linears

    for lin in quantizable_linears(model).values():
        q, z, s, g = quantize_rtn(lin.weight, cfg.bits, cfg.group_size, cfg.sym)
        g = g.long()
        lin.weight.data = (s[g] * (q - z[g])).t().contiguous()


def _rtn_clip_(model, cfg, p):
    """Round-to-nearest on the clip-searched grid of each group (what GPTQ's clip search picks, no error feedback)."""
    from zephyr_plugins.gptq import group_params
    from zephyr_plugins.writer import quantizable_linears

    maxq = (1 << cfg.bits) - 1
    for lin in quantizable_linears(model).values():
        w = lin.weight.data.to(torch.float32)
        for c in range(0, w.shape[1], cfg.group_size):
            blk = w[:, c : c + cfg.group_size]
            scale, zero = group_params(blk, cfg.bits, cfg.sym, mse=p)
            q = torch.clamp(torch.round(blk / scale[:, None]) + zero[:, None], 0, maxq)
            w[:, c : c + cfg.group_size] = scale[:, None] * (q - zero[:, None])
        lin.weight.data = w.to(lin.weight.dtype)


def rise_ratio(nlls: dict, model: str, idx=None) -> float:
    """(ppl(model) - ppl(float)) / (ppl(RTN) - ppl(float)) over the windows ``idx`` (default: all)."""
    from zephyr_plugins.evaluate import ppl_from_nlls

    idx = range(len(nlls["float"])) if idx is None else idx
    ppl = {k: ppl_from_nlls([nlls[k][i] for i in idx], EVAL_SEQLEN) for k in ("float", RTN4, model)}
    return (ppl[model] - ppl["float"]) / (ppl[RTN4] - ppl["float"])


def bootstrap_interval(nlls: dict, model: str, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """90% paired bootstrap interval of :func:`rise_ratio` (windows resampled, same draw for every model)."""
    rng = random.Random(seed)
    n = len(nlls["float"])
    ratios = sorted(rise_ratio(nlls, model, [rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    return ratios[int(0.05 * draws)], ratios[int(0.95 * draws) - 1]


@pytest.fixture(scope="module")
def nlls(smollm2_dir, tmp_path_factory):
    """Per-window NLL sums of every model on the same evaluation windows."""
    from transformers import AutoTokenizer

    import zephyr_plugins as zp
    from zephyr_plugins.evaluate import ppl_from_nlls, window_nlls
    from zephyr_plugins.quantize import quantize_model, quantize_to_folder

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    calib = [read_text("calib", max_chars=300_000)]
    text = read_text("eval")

    def score(model):
        return window_nlls(model, tok, text, seqlen=EVAL_SEQLEN, max_windows=EVAL_WINDOWS, spread=True)

    # Thousands of small ops: on a shared 2-core CI machine one thread was 4x faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {}
        t0 = time.time()
        rows["float"] = score(load_float(smollm2_dir))
        model = load_float(smollm2_dir)
        _rtn_(model, GPTQConfig(bits=4, group_size=128))
        rows[RTN4] = score(model)
        model = load_float(smollm2_dir)
        _rtn_clip_(model, GPTQConfig(bits=4, group_size=128), MSE)
        rows[RTN4_CLIP] = score(model)
        # GPTQ 4-bit act-order through the whole path: checkpoint folder -> zp.load -> QuantLinear,
        # on the min/max grid and with the clip search.
        quant_s = {}
        for name, mse in ((GPTQ4, 0.0), (GPTQ4_CLIP, MSE)):
            cfg4 = GPTQConfig(bits=4, group_size=128, desc_act=True, damp_percent=0.1, mse=mse)
            t = time.time()
            out = quantize_to_folder(smollm2_dir, tmp_path_factory.mktemp("q") / "q4", cfg4, dataset=calib,
                                     nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=8, progress=False)
            quant_s[name] = time.time() - t
            model = zp.load(out)[0]
            zp.prepare_model(model, backend="dense")  # dequantize once: the reference's numbers, faster on a CPU
            rows[name] = score(model)
        model = load_float(smollm2_dir)
        quantize_model(model, tok, GPTQConfig(bits=8, group_size=128, desc_act=True, damp_percent=0.1), calib,
                       nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=8, progress=False)
        rows[GPTQ8] = score(model)
    finally:
        torch.set_num_threads(threads)
    f = ppl_from_nlls(rows["float"], EVAL_SEQLEN)
    print(f"\nSmolLM2-135M, perplexity on {EVAL_WINDOWS} x {EVAL_SEQLEN} tokens of held-out Wikipedia (windows "
          f"spread over the text); calibration {NSAMPLES} x {SEQLEN} tokens (GPTQ 4-bit took "
          f"{quant_s[GPTQ4]:.0f} s, with the clip search {quant_s[GPTQ4_CLIP]:.0f} s; all {time.time() - t0:.0f} s)")
    print("| model | perplexity | vs float | rise / RTN's rise |\n|---|---|---|---|")
    for name, v in rows.items():
        p = ppl_from_nlls(v, EVAL_SEQLEN)
        ratio = f"{rise_ratio(rows, name):.3f}" if name not in ("float", GPTQ8) else ""
        print(f"| {name} | {p:.3f} | {100 * (p / f - 1):+.2f}% | {ratio} |")
    for name in (GPTQ4, GPTQ4_CLIP):
        lo, hi = bootstrap_interval(rows, name)
        print(f"{name}: rise / RTN rise = {rise_ratio(rows, name):.3f} (90% bootstrap over windows: {lo:.3f} .. {hi:.3f})")
    return rows


def test_rise_ratio_and_bootstrap_interval():
    e = lambda nll: math.exp(nll / (EVAL_SEQLEN - 1))  # noqa: E731
    rows = {"float": [1.0, 2.0], RTN4: [3.0, 3.0], "m": [2.0, 2.9]}
    assert rise_ratio(rows, "m", [0]) == pytest.approx((e(2.0) - e(1.0)) / (e(3.0) - e(1.0)))
    assert rise_ratio(rows, "m") == pytest.approx((e(2.45) - e(1.5)) / (e(3.0) - e(1.5)))
    lo, hi = bootstrap_interval(rows, "m", draws=200)
    assert lo < rise_ratio(rows, "m") < hi  # two different windows: the resampled ratio varies


def test_window_starts_first_or_spread():
    from zephyr_plugins.evaluate import window_starts

    assert window_starts(10 * 512 + 100, 512) == [w * 512 for w in range(10)]  # the partial tail is dropped
    assert window_starts(10 * 512, 512, max_windows=3) == [0, 512, 1024]
    assert window_starts(10 * 512, 512, max_windows=4, spread=True) == [0, 2 * 512, 5 * 512, 7 * 512]
    assert window_starts(3 * 512, 512, max_windows=8, spread=True) == [0, 512, 1024]
    with pytest.raises(ValueError, match="max_windows"):
        window_starts(3 * 512, 512, max_windows=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        window_starts(100, 512)


@pytest.mark.slow
def test_gptq_8bit_within_1_percent_of_float(nlls):
    from zephyr_plugins.evaluate import ppl_from_nlls

    f, q = ppl_from_nlls(nlls["float"], EVAL_SEQLEN), ppl_from_nlls(nlls[GPTQ8], EVAL_SEQLEN)
    assert abs(q / f - 1) <= 0.01, (f, q)


@pytest.mark.slow
def test_gptq_4bit_rise_at_most_60_percent_of_rtn(nlls):
    """The acceptance bar, met with the clip search (GPTQConfig.mse=2.4).

    On the min/max grid (mse=0, AutoGPTQ's default) the ratio is 0.67 here
    (0.66-0.71 over seeds 0-2, and 0.68 with 128 x 256 calibration tokens): the
    attention sink at position 0 of each calibration window carries massive
    activations (84-94% of the Hessian trace of down_proj in layers 11 and 28)
    while it is 1 token in 256 of the other layers' Hessians, and damping
    changes little (0.67 at damp 0.01, 0.78 at 0.001). That grid must still
    beat RTN clearly.
    """
    from zephyr_plugins.evaluate import ppl_from_nlls

    assert ppl_from_nlls(nlls[RTN4], EVAL_SEQLEN) > ppl_from_nlls(nlls["float"], EVAL_SEQLEN)
    assert rise_ratio(nlls, GPTQ4_CLIP) <= 0.6, nlls
    assert rise_ratio(nlls, GPTQ4) <= 0.8, nlls


def test_windows_clipped_to_the_model_context(tiny_model, zephyr_tokenizer):
    """A seqlen beyond max_position_embeddings is clipped in both window_nlls and perplexity."""
    from zephyr_plugins.evaluate import perplexity, ppl_from_nlls, window_nlls

    text = read_text("eval", max_chars=4000)
    ctx = tiny_model.config.max_position_embeddings
    tiny_model.config.max_position_embeddings = 64
    try:
        nll = window_nlls(tiny_model, zephyr_tokenizer, text, seqlen=4096, max_windows=3)
        assert nll == window_nlls(tiny_model, zephyr_tokenizer, text, seqlen=64, max_windows=3)
        assert perplexity(tiny_model, zephyr_tokenizer, text, seqlen=4096, max_windows=3) == ppl_from_nlls(nll, 64)
    finally:
        tiny_model.config.max_position_embeddings = ctx
