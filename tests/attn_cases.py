"""Random arguments for ``zephyr::decode_attention`` (CPU and GPU tests)."""

import torch


def make_case(bsz=3, h=6, hkv=2, hd=16, bmax=4, lmax=40, slot=25, pads=(0, 4, 26), dtype=torch.float32, seed=0,
              device="cpu"):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    cache = lambda: torch.randn(bmax, hkv, lmax, hd, generator=g).to(device, dtype)  # noqa: E731
    angles = torch.rand(bsz, hd // 2, generator=g) * 6.0
    return dict(
        qkv=torch.randn(bsz, (h + 2 * hkv) * hd, generator=g).to(device, dtype),
        cos=angles.cos().to(device), sin=angles.sin().to(device),
        k_cache=cache(), v_cache=cache(),
        slot=torch.tensor([slot], device=device), pad=torch.tensor(pads[:bsz], device=device),
        locks=torch.zeros(bmax * hkv, dtype=torch.int32, device=device),
    )  # fmt: skip
