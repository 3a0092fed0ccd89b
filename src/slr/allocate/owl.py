"""OWL (Yin et al., ICML 2024; methods.md §4): per-block sparsity from the block's outlier ratio.

For block l, concatenate the Wanda scores |W_ij| * ||X_j|| of all its compressed linears (|W_ij| alone when there is
no calibration data) and let D_l be the fraction of scores above M times their mean (M = 5). The block densities
are  d_l = (D_l - min D) / (max D - min D) * 2 lambda,  shifted to the mean density (lambda = 0.08), so the block
sparsities lie in [S - lambda, S + lambda] around the mean sparsity S (blocks with more outliers keep more).

Pure pruning: S = 1 - budget. S+LR (config.rank > 0): every matrix keeps rank config.rank and the sparse part gets
the OWL profile around the mean density that the rest of the budget pays for, S = 1 - (budget * Σmn - Σ r (m + n))
/ Σmn. Outlier ratios are measured on W itself (not on W - L). The shift is computed by bisection on the
parameter-weighted mean after clipping densities to [0, 1], so the global fraction holds exactly up to row rounding
(``fit_budget``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import input_sq_norms
from ..errors import SLRError
from ..plan import Plan
from ..spec import keep_per_row
from .base import (
    Choice,
    alloc_mode,
    finish,
    fit_budget,
    matrices,
    nm_of,
    resolve_budget,
    scales,
    uniform_choice,
)

if TYPE_CHECKING:
    from ..config import CompressConfig


def outlier_ratio(scores: torch.Tensor, M: float = 5.0) -> float:
    """Fraction of entries greater than M times the mean entry."""
    return float((scores > M * scores.mean()).double().mean())


def owl_offsets(ratios: list[float], lam: float) -> torch.Tensor:
    """Zero-mean (unweighted, as in OWL) density offsets in [-lam, lam] from the outlier ratios."""
    D = torch.tensor(ratios, dtype=torch.float64)
    span = float(D.max() - D.min()) if len(ratios) else 0.0
    if span <= 0:
        return torch.zeros_like(D)
    d = (D - D.min()) / span * 2 * lam
    return d - d.mean()


def center(offsets: torch.Tensor, sizes: torch.Tensor, mean_density: float) -> torch.Tensor:
    """Densities clip(mean + offset + shift, 0, 1) whose size-weighted mean is ``mean_density`` (bisection)."""
    def avg(shift: float) -> float:
        return float(((mean_density + offsets + shift).clamp(0, 1) * sizes).sum() / sizes.sum())

    lo, hi = -2.0, 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if avg(mid) > mean_density:
            hi = mid
        else:
            lo = mid
    return (mean_density + offsets + lo).clamp(0, 1)


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *, M: float = 5.0,
             lam: float = 0.08, max_samples: int | None = 16, norms: dict | None = None,
             mode: str | None = None) -> tuple[Plan, dict]:
    """OWL plan. ``norms`` (key -> mean x^2 [d_in]) may be passed to skip the calibration forward pass."""
    t0 = time.perf_counter()
    mode = alloc_mode(config, mode)
    nm = nm_of(config)
    if mode == "rank" or nm is not None:
        raise SLRError("OWL allocates unstructured sparsity", "use --allocate knapsack or cap for N:M or rank-only")
    mats = matrices(model)
    budget = resolve_budget(config, mats, mode)
    spec = config.layer_spec()
    base = [uniform_choice(m, spec, mode) for m in mats]
    if norms is None:
        norms = input_sq_norms(model, calib, device, max_samples)
    n_blocks = max(m.block for m in mats) + 1
    ratios = []
    sizes = torch.zeros(n_blocks, dtype=torch.float64)
    for b in range(n_blocks):
        parts = []
        for m in mats:
            if m.block != b:
                continue
            W = m.weight.detach().float().abs().cpu()
            d = scales(m, norms)
            parts.append((W * d.float()[None, :] if d is not None else W).flatten())
            sizes[b] += m.numel
        ratios.append(outlier_ratio(torch.cat(parts), M))
    total = float(sizes.sum())
    lr = sum(c.rank * m.lr_unit for m, c in zip(mats, base))
    mean_density = (budget * total - lr) / total
    if mean_density <= 0:
        raise SLRError(f"rank {config.rank} alone exceeds the budget {budget}", "raise --budget or lower --rank")
    dens = center(owl_offsets(ratios, lam), sizes, mean_density)
    choices = [Choice(keep_per_row(m.d_in, 1.0 - float(dens[m.block])), c.rank) for m, c in zip(mats, base)]
    choices = fit_budget(mats, choices, int(budget * total), mode, nm)
    extra = {"M": M, "lambda": lam, "data_free": norms is None, "outlier_ratio": ratios,
             "block_sparsity": [1.0 - float(x) for x in dens], "mean_sparsity": 1.0 - mean_density}
    return finish("owl", mats, choices, mode, nm, budget, t0, extra, base=config.layer_spec())
