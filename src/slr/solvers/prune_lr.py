"""Prune, then fit a low-rank correction to the pruning error (EoRA / SLiM style). One shot.

S = SparseGPT(W) (or Wanda), then L = argmin_{rank <= r} ||X (W - S - L)^T|| in closed form (whitened SVD).
With ``spec.bits`` (SLiM-style S + Q + L): S is pruned and quantized in one SparseGPT/GPTQ sweep (Wanda: its kept
values rounded to the grid), L is fitted to W - S *including* the rounding error, and with ``spec.factor_bits`` < 16
the factors are quantized with their own error compensation (``factors.quantize_factors``).
"""

from __future__ import annotations

import time

import torch

from ..quant import QuantSpec
from ..quant import rtn as round_to_grid
from ..spec import LayerSpec
from .base import SolveResult, Timer, damp_hessian, layer_objective, register, validate_inputs
from .factors import quantize_factors
from .lowrank import whitened_lowrank, whitener_for
from .masks import select
from .obs import prune_quantize
from .wanda import wanda_score


def prune(
    W: torch.Tensor, H: torch.Tensor, spec: LayerSpec, pruner: str, Hd: torch.Tensor, blocksize: int = 128,
    quant: QuantSpec | None = None, actorder: bool = False, clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(S, mask, (scale, zero) or None) from SparseGPT on the damped Hd, or Wanda (row-wise / N:M, no weight update);
    with ``quant`` S's kept values are on that grid (SparseGPT: quantized inside the sweep, with GPTQ's ``actorder``
    and ``clip`` options, ``obs.prune_quantize``; Wanda: rounded)."""
    if pruner == "sparsegpt":
        # Hd already carries the damping, so SparseGPT adds none of its own
        return prune_quantize(W, Hd, spec, quant, blocksize=blocksize, percdamp=0.0, actorder=actorder, clip=clip)
    if pruner == "wanda":
        mask = select(wanda_score(W, H), spec)
        if quant is None:
            return W.float() * mask, mask, None
        S, scale, zero = round_to_grid(W.float(), quant, mask)
        return S, mask, (scale, zero)
    raise ValueError(f"unknown pruner {pruner!r} (use 'sparsegpt' or 'wanda')")


@register("prune+lr", kind="slr", bits=True)
def prune_lr(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: LayerSpec,
    pruner: str = "sparsegpt",
    percdamp: float = 0.005,
    diag_frac: float = 0.005,
    blocksize: int = 128,
    actorder: bool = False,
    clip: bool = False,
) -> SolveResult:
    """S = prune(W) with SparseGPT (default) or Wanda; L = whitened rank-r fit of W - S.

    Damping percdamp=diag_frac=0.005 (3BASiL defaults) is shared by the pruner and the L fit, so this is exactly the
    first iterate of ``hassle``. With spec.bits / factor_bits: S, then L, on their grids (module docstring);
    ``actorder`` (dense S only) and ``clip`` as in ``gptq``.
    """
    validate_inputs(W, H, spec)
    t0 = time.perf_counter()
    timer = Timer()
    with timer("prune"):
        Hd = damp_hessian(H, percdamp, diag_frac)
        S, mask, qs = prune(W, H, spec, pruner, Hd, blocksize, spec.quant, actorder, clip)
    qparams = {"S": qs} if qs is not None else {}
    U = V = None
    if spec.rank > 0:
        with timer("L-step"):
            U, V = whitened_lowrank(W.float() - S, None, spec.rank, whitener=whitener_for(H, percdamp, diag_frac))
        if spec.factor_bits != 16:
            with timer("factor-quant"):
                U, V, qf = quantize_factors(W.float() - S, U, Hd, spec, blocksize)
            qparams |= qf
    res = SolveResult(S=S, mask=mask, U=U, V=V, qparams=qparams)
    res.info = {"objective": [layer_objective(W, H, res.dense())], "seconds": time.perf_counter() - t0, "time": timer.s}
    return res
