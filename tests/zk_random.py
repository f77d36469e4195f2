"""Fresh random GPTQ layers in checkpoint layout, for the kernel tests (CPU and GPU).

Values are drawn directly (not quantized from a float weight), so every
quantized value, zero point and scale is exercised, never zeros.
"""

from __future__ import annotations

import torch

from zephyr_plugins.packing import pack_cols, pack_rows


def random_gptq_layer(
    k: int,
    n: int,
    bits: int,
    group_size: int,
    act_order: bool,
    sym: bool,
    zero_offset: int = 1,
    scale_dtype: torch.dtype = torch.float16,
    seed: int = 0,
    device="cpu",
) -> dict[str, torch.Tensor]:
    """``{qweight, qzeros, scales, g_idx}`` of a random ``K x N`` layer, built on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": gen, "device": device}
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (k, n), **kw, dtype=torch.int32)
    if sym:
        z = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32, device=device)
    else:
        z = torch.randint(0, maxq + 1, (groups, n), **kw, dtype=torch.int32)
    stored = (z - zero_offset) & maxq
    # Scales like a real layer's: about amax/maxq for weights of ~0.02.
    scales = (torch.rand(groups, n, **kw) * 0.004 + 0.001).to(scale_dtype)
    if act_order:
        g_idx = (torch.argsort(torch.rand(k, **kw)) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k, device=device) // gs).to(torch.int32)
    return {"qweight": pack_rows(q, bits), "qzeros": pack_cols(stored, bits), "scales": scales, "g_idx": g_idx}
