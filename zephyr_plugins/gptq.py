"""The GPTQ algorithm (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization").

One linear layer ``y = x @ W.T`` is quantized column by column (input by
input). After each column is rounded, its rounding error is spread over the
columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ``||W X - Q X||^2``; that Hessian is ``H = 2/n sum x x^T``
over the calibration activations ``x`` seen by the layer.

Example::

    >>> acc = HessianAccumulator(layer.in_features)
    >>> acc.add(x)                                   # x: [..., K] inputs of the layer
    >>> res = gptq_quantize(layer.weight, acc, GPTQConfig(bits=4, group_size=128, desc_act=True))
    >>> tensors = pack_layer(res.q, res.zeros, res.scales, res.g_idx, cfg)   # checkpoint tensors
    >>> layer.weight.data = res.weight.to(layer.weight.dtype)               # what the checkpoint dequantizes to
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from .config import GPTQConfig
from .reference import min_max_grid

BLOCK_SIZE = 128
# Clip search (GPTQConfig.mse > 0): ranges 1 - i / MSE_GRID of min/max, i < MSE_MAX_SHRINK * MSE_GRID.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
# Cholesky retries: each multiplies the dampening by 10 (0.01 -> 0.1 -> 1 x mean diag ...).
MAX_DAMP_RETRIES = 4
_FP16_TINY = 2.0**-24  # the smallest positive fp16 value (a subnormal)


class HessianAccumulator:
    """Running fp32 estimate of ``H = 2/n sum_x x x^T`` over the rows ``x`` of a layer's inputs.

    Each call to :meth:`add` takes a batch of activations ``[..., K]`` (every
    token is one sample). The running mean keeps the values O(1) however many
    tokens pass, so fp32 suffices.
    """

    def __init__(self, in_features: int, device=None):
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"activations have {x.shape[-1]} features, the layer has {self.in_features} inputs")
        x = x.detach().reshape(-1, self.in_features).to(device=self.H.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        # H_new = (H_old * n_old + 2 * x^T x) / n_new, done in place.
        self.H.mul_(self.nsamples / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.nsamples = total


@dataclass
class GPTQResult:
    """One layer's quantization.

    - ``q``: int32 ``[K, N]`` codes in the layer's own input order.
    - ``zeros``: int32 ``[G, N]`` real zero points; ``scales``: fp32 ``[G, N]`` (values exact in fp16).
    - ``g_idx``: int32 ``[K]``, group of each input row.
    - ``weight``: fp32 ``[N, K]``, the dequantized weight (``scales * (q - zeros)``).
    - ``loss``: sum of the per-column GPTQ losses (error weighted by the inverse Hessian).
    - ``damp``: the dampening (fraction of mean diag H) that made the Cholesky succeed.
    """

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    weight: torch.Tensor
    loss: float
    damp: float


def group_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype=torch.float16, mse: float = 0.0):
    """Scale and zero point for each row of ``w [N, m]`` (one group of m inputs per output row).

    The same min/max grid as :func:`zephyr_plugins.reference.quantize_rtn`
    (:func:`~zephyr_plugins.reference.min_max_grid`), so the stored checkpoint
    dequantizes to exactly the values the error feedback assumed. With
    ``mse = p > 0``, each row takes the shrunken range (``s * [min, max]``,
    ``s = 1, 0.99, ... 0.21``) whose grid rounds the row with the least
    ``sum |w - q(w)|^p`` (the first such ``s`` on ties).
    """
    wmin = torch.clamp(w.min(dim=1).values, max=0)
    wmax = torch.clamp(w.max(dim=1).values, min=0)

    def grid(shrink: float):
        scale, zero = min_max_grid(shrink * wmin, shrink * wmax, bits, sym, scale_dtype)
        # A tiny range could round to 0 in fp16; the smallest fp16 value keeps codes finite.
        return torch.clamp(scale, min=_FP16_TINY), zero

    scale, zero = grid(1.0)
    if not mse:
        return scale, zero
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    best = None
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        s, z = grid(1 - i / MSE_GRID) if i else (scale, zero)
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
        err = (s[:, None] * (q - z[:, None]) - w).abs_().pow_(mse).sum(dim=1)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


@contextlib.contextmanager
def _single_thread(device: torch.device):
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _upper_inverse_cholesky(H: torch.Tensor, damp_percent: float, name: str):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, retrying with more damping."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = damp_percent
    for attempt in range(MAX_DAMP_RETRIES + 1):
        Hd = H + (damp * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    warnings.warn(
                        f"GPTQ {name}: the Hessian was not positive definite with damp_percent={damp_percent}; "
                        f"succeeded with damp_percent={damp:g}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return U, damp
        damp *= 10
    raise RuntimeError(
        f"GPTQ {name}: Cholesky factorisation failed even with damp_percent={damp / 10:g}; "
        "the calibration activations are degenerate (NaN/inf or far too few samples)"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: HessianAccumulator | torch.Tensor,
    config: GPTQConfig,
    name: str = "layer",
    block_size: int = BLOCK_SIZE,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQResult:
    """GPTQ-quantize ``weight [N, K]`` (nn.Linear layout) given the Hessian of its inputs.

    Runs on the weight's device, in fp32. ``hessian`` is a
    :class:`HessianAccumulator` (or a ``[K, K]`` tensor); an accumulator that
    saw no data is an error, naming ``name``.
    """
    if isinstance(hessian, HessianAccumulator):
        if hessian.nsamples == 0:
            raise ValueError(
                f"GPTQ {name}: the layer saw no calibration data (0 activation rows); "
                "check that the calibration set is not empty and that the layer runs in the model's forward"
            )
        H = hessian.H
    else:
        H = hessian
    W = weight.detach().to(torch.float32).clone()  # [N, K]
    n_out, k = W.shape
    if H.shape != (k, k):
        raise ValueError(f"GPTQ {name}: Hessian has shape {tuple(H.shape)}, the weight needs ({k}, {k})")
    if not torch.isfinite(H).all():
        raise ValueError(f"GPTQ {name}: the Hessian has NaN/inf entries (non-finite calibration activations)")
    H = H.to(device=W.device, dtype=torch.float32).clone()
    bits, sym, maxq, mse = config.bits, config.sym, (1 << config.bits) - 1, float(config.mse)
    gs = config.effective_group_size(k)
    groups = config.num_groups(k)

    # Inputs that never fire carry no information: fix their Hessian diagonal so
    # it stays invertible and quantize their (irrelevant) weights to zero.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if config.static_groups and config.group_size != -1:
        # Group parameters from the unpermuted weight, before any error feedback.
        static = [group_params(W[:, g * gs : (g + 1) * gs], bits, sym, scale_dtype, mse) for g in range(groups)]

    perm = None
    if config.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    # LAPACK's potri under OpenMP was 100x slower than one thread on a busy CPU.
    with _single_thread(H.device):
        U, damp = _upper_inverse_cholesky(H, config.damp_percent, name)
    del H

    codes = torch.zeros(n_out, k, dtype=torch.float32, device=W.device)
    Q = torch.zeros_like(W)
    scales = torch.zeros(groups, n_out, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(groups, n_out, dtype=torch.float32, device=W.device)
    losses = torch.zeros(n_out, dtype=torch.float32, device=W.device)
    if config.group_size == -1:
        scale, zero = group_params(W, bits, sym, scale_dtype, mse)
        scales[0], zeros[0] = scale, zero
    # Blocks hold whole groups, so a group's parameters are always taken from
    # weights that already carry every earlier column's error feedback.
    if config.group_size != -1:
        block_size = gs * max(1, block_size // gs)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        # Hundreds of tiny ops per column: on the CPU, thread fan-out costs
        # far more than it saves (75x slower on a busy 2-core machine).
        with _single_thread(W.device):
            for i in range(i2 - i1):
                col = i1 + i
                if config.group_size != -1:
                    if static is not None:
                        g = (int(perm[col]) if perm is not None else col) // gs
                        scale, zero = static[g]
                    elif col % gs == 0:
                        scale, zero = group_params(W1[:, i : i + gs], bits, sym, scale_dtype, mse)
                        scales[col // gs], zeros[col // gs] = scale, zero
                w = W1[:, i]
                d = U1[i, i]
                q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
                deq = scale * (q - zero)
                codes[:, col] = q
                Q1[:, i] = deq
                losses += (w - deq) ** 2 / d**2 / 2
                err = (w - deq) / d
                # Spread this column's error over the rest of the block now; over
                # later blocks once per block (the "lazy batch" update).
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
                Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static is not None:
        for g, (scale, zero) in enumerate(static):
            scales[g], zeros[g] = scale, zero
        g_idx = torch.arange(k, dtype=torch.int32) // gs
    elif perm is not None:
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm.cpu()] = (torch.arange(k) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // gs).to(torch.int32)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
    return GPTQResult(
        q=codes.t().contiguous().to(torch.int32),
        zeros=zeros.to(torch.int32),
        scales=scales,
        g_idx=g_idx,
        weight=Q,
        loss=float(losses.sum()),
        damp=damp,
    )


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    """Relative ``||W X - Q X|| / ||W X||`` on activations ``x [..., K]`` (for tests and reports)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    ref = x @ weight.to(torch.float32).t()
    out = x @ quantized.to(torch.float32).t()
    return float(torch.linalg.norm(ref - out) / max(torch.linalg.norm(ref).item(), 1e-30))
