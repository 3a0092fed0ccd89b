"""The multiple-choice knapsack behind the knapsack allocator (retained parameters) and the bits allocator (bits):
one candidate per matrix, the least total proxy loss under one global cost; and the rank grid both put on every matrix.

Lagrangian relaxation: for a multiplier λ every matrix independently picks argmin l + λ c, which equalises the marginal
loss per unit of cost across matrices (the optimum of the problem convexified to each curve's lower hull); the chosen
cost falls as λ grows, so bisection on log λ finds the smallest λ whose plan fits. The leftover (at most about one
hull step per matrix) is then spent greedily on the upgrade with the largest loss decrease per extra unit of cost.
"""

from __future__ import annotations

import math

import torch

from ..errors import SLRError
from .base import Matrix

RANK_FRACS = (1 / 64, 1 / 32, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2)


def rank_grid(m: Matrix, extra: int = 0) -> list[int]:
    """0 and fractions (up to 1/2) of the largest useful rank r_max = m n / (m + n) (factors as costly as W)."""
    rmax = min(m.d_out, m.d_in, m.numel // m.lr_unit)
    grid = {0} | {max(1, int(round(f * rmax))) for f in RANK_FRACS}
    if 0 < extra <= rmax:
        grid.add(extra)
    return sorted(grid)


def solve_knapsack(costs: list[torch.Tensor], losses: list[torch.Tensor], budget: float,
                   max_upgrades: int = 100000) -> tuple[list[int], float]:
    """Multiple-choice knapsack by Lagrangian bisection + greedy leftover upgrades. Returns (choice per item, λ)."""
    n = len(costs)
    width = max(len(c) for c in costs)
    C = torch.full((n, width), math.inf, dtype=torch.float64)
    L = torch.full((n, width), math.inf, dtype=torch.float64)
    for i, (c, loss) in enumerate(zip(costs, losses)):
        C[i, : len(c)] = c
        L[i, : len(c)] = loss
    rows = torch.arange(n)
    min_cost = float(C.min(1).values.sum())
    if min_cost > budget:
        raise SLRError(f"even the cheapest candidates need {min_cost:.0f} > {budget:.0f} parameters",
                       "raise the budget")

    Cz = torch.where(torch.isinf(C), torch.zeros_like(C), C)
    tie = 1e-12 * Cz / float(Cz.max().clamp_min(1.0))  # ties -> the cheaper candidate

    def pick(lam: float) -> torch.Tensor:
        return (L + lam * Cz + tie).argmin(1)  # padding has L = inf

    def total(sel: torch.Tensor) -> float:
        return float(C[rows, sel].sum())

    lo, hi = -60.0, 60.0  # log10 λ
    sel = pick(0.0)
    lam = 0.0
    if total(sel) > budget:
        if total(pick(10.0 ** hi)) > budget:  # λ not large enough: fall back to the cheapest candidates
            sel = C.argmin(1)
        else:
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if total(pick(10.0 ** mid)) > budget:
                    lo = mid
                else:
                    hi = mid
            lam = 10.0 ** hi
            sel = pick(lam)
    left = budget - total(sel)
    for _ in range(max_upgrades):
        cur_c = C[rows, sel][:, None]
        cur_l = L[rows, sel][:, None]
        dc = C - cur_c
        dl = cur_l - L  # loss decrease
        ok = (dc > 0) & (dc <= left) & (dl > 0) & ~torch.isinf(C)
        if not bool(ok.any()):
            break
        gain = torch.where(ok, dl / dc.clamp_min(1e-300), torch.full_like(dl, -1.0))
        flat = int(gain.argmax())
        i, j = divmod(flat, width)
        left -= float(dc[i, j])
        sel[i] = j
    return sel.tolist(), lam
