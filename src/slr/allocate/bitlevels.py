"""Levels in bits (--budget-bits) for CAP and the search allocator: a level of a matrix is (sparsity, rank, bits).

The sparse support is the run's (its sparsity or N:M pattern), as for the knapsack under a budget in bits
(``bits``); per matrix, the policy moves S's bit width over ``bits.BIT_WIDTHS`` (a window of ``levels`` widths centred
on the start plan's, clipped at the ends) and, with a low-rank part, the rank over the same rank levels as in
``levels.level_plan``. A drawn plan spends at most the budget: the ranks scale by one common factor found by
bisection (never below the floor), and when the drawn widths alone exceed the budget the widest matrices step down
one width at a time (``BitSpace.resolve``; among equally wide and large ones in ``levels.draw_order``).

A candidate is rebuilt as the deployed model's S and L would be (``BitPools.rebuild``): S = round-to-nearest of W on
the support at the drawn width, L = the top ``rank`` directions of the whitened SVD of the rest, W - S, for that width
(computed once per width; the knapsack's ``bits.bit_tails`` takes the same SVDs for its proxy). With ``pools=solved``
(``--alloc-opt pools=solved``), S at each width is instead the run's own method solved once on the matrix's dense H
(GPTQ's error-compensated sweep, not rounding) and cached as codes: the fitness then ranks the plans that GPTQ-style
solvers will deploy. H here is the whitener's damped H (G G^T), so the solver's own damping comes on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..solvers.masks import select
from ..spec import LayerSpec
from .base import Choice, Matrix
from .bits import BIT_WIDTHS, Solved, _cost, _k_row, s_at
from .levels import draw_order


@dataclass
class BitPools:
    """One matrix under a budget in bits: W on the support at each width, plus the factors that refit the rest."""

    W: torch.Tensor  # [m, n] float32, the dense weights (the model's are swapped during the search)
    mask: torch.Tensor | None  # [m, n] bool, the run's support (None: dense S)
    base: LayerSpec  # the run's group size and symmetry
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # b -> (U σ [m, p], Vt [p, n])
    solved: Solved | None = None  # S of the run's method at every width (pools=solved), else rounding

    has_original = True

    def original(self) -> torch.Tensor:
        return self.W

    def rebuild(self, m: Matrix, rank: int, entries: int, bits: int) -> torch.Tensor:
        """S at ``bits`` plus its rank-``rank`` refit (``entries`` is the fixed support's count)."""
        S = s_at(self.W, self.mask, self.base, bits, self.solved)
        if rank:
            US, Vt = self.factors[bits]
            r = min(rank, Vt.shape[0])
            S = S + US[:, :r] @ Vt[:r]
        return S


def make_bit_pools(m: Matrix, white: tuple | None, d: torch.Tensor | None, base: LayerSpec,
                   max_rank: int, solved: Solved | None = None) -> BitPools:
    """``white`` = ``base.whitener(H)`` (G G^T = H, G^-1, ...) or ``d`` [n] = sqrt(diag H) or neither; the support is
    kept by the largest |W_ij| sqrt(H_jj), as ``bits.bit_tails`` keeps it. ``solved``: S at every width as the run's
    method solved it (``bits.solve_widths``) instead of rounding."""
    W = m.weight.detach().float().cpu().clone()
    G, Gi = (white[0], white[1]) if white is not None else (None, None)
    col = (G.double() ** 2).sum(1).sqrt() if G is not None else d  # [n] sqrt(diag H)
    dense = base.nm is None and base.sparsity == 0.0
    mask = None if dense else select(W.abs().double() * (col[None, :].double() if col is not None else 1.0), base)
    pools = BitPools(W, mask, base, solved=solved)
    for b in BIT_WIDTHS if max_rank > 0 else ():  # LayerSpec admits no other width
        E = W - s_at(W, mask, base, b, solved)  # [m, n] what L refits
        A = E @ G if G is not None else (E * d.float()[None, :] if d is not None else E)
        P, s, Qt = torch.linalg.svd(A, full_matrices=False)  # A ~= P s Qt, so E ~= P s (Qt G^-1)
        p = min(max_rank, s.numel())
        if G is not None:
            Vt = Qt[:p] @ Gi
        else:
            Vt = Qt[:p] / d.float()[None, :] if d is not None else Qt[:p]
        pools.factors[b] = ((P[:, :p] * s[:p]).contiguous(), Vt.contiguous())
    return pools


@dataclass
class BitSpace:
    """Per matrix a categorical over bit widths and, with a low-rank part, one over rank levels, both centred on the
    start plan; ``resolve`` turns one level per variable into a plan that fits ``budget_bits`` (see the module doc)."""

    mats: list[Matrix]
    pools: list[BitPools]
    start: list[Choice]
    mode: str
    nm: tuple[int, int] | None
    base: LayerSpec
    budget_bits: float
    floor: int
    rank_levels: list[list[int]] | None  # [n_mats][levels], None without a low-rank part
    bit_levels: list[list[int]]  # [n_mats][levels]
    _costs: dict = field(default_factory=dict)
    loaded: dict = field(default_factory=dict, repr=False)  # matrix index -> the level its weights hold now
    candidate = "pool rebuild"  # what a plan's matrices are rebuilt from (not a field: no annotation)

    @property
    def variables(self) -> int:
        return len(self.mats) * (2 if self.rank_levels is not None else 1)

    def cost(self, j: int, rank: int, bits: int) -> int:
        """Bits of matrix j at (rank, bits), as ``formats.theoretical_bytes`` counts them."""
        k = (j, rank, bits)
        if k not in self._costs:
            m = self.mats[j]
            self._costs[k] = _cost(m, Choice(_k_row(m, self.base, self.nm), rank, bits), self.mode, self.nm, self.base)
        return self._costs[k]

    def resolve(self, x: torch.Tensor) -> list[tuple[int, int, int]]:
        """(rank, kept entries, bits) per matrix, within the budget (see the module docstring)."""
        n = len(self.mats)
        widths = [self.bit_levels[j][i] for j, i in enumerate(x[-n:].tolist())]
        ranks = [0] * n
        if self.rank_levels is not None:
            ranks = [self.rank_levels[j][i] for j, i in enumerate(x[:n].tolist())]
        limit = self.budget_bits * sum(m.numel for m in self.mats)
        cap = [max(ls) for ls in self.rank_levels] if self.rank_levels is not None else [0] * n

        def scaled(f: float) -> list[int]:
            return [min(max(int(r * f), self.floor if r else 0), c) for r, c in zip(ranks, cap)]

        def total(rs: list[int]) -> int:
            return sum(self.cost(j, r, b) for j, (r, b) in enumerate(zip(rs, widths)))

        lo = 0.0
        if any(ranks):
            hi = 4.0
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if total(scaled(mid)) <= limit else (lo, mid)
        rs = scaled(lo)
        turn = draw_order(x[-n:]) if total(rs) > limit else []
        while total(rs) > limit:  # the widths alone are over: the widest matrix steps down one width
            j = max((j for j in range(n) if widths[j] > BIT_WIDTHS[0]), default=None,
                    key=lambda j: (widths[j], self.mats[j].numel, -turn[j]))
            if j is None:
                break
            widths[j] = BIT_WIDTHS[BIT_WIDTHS.index(widths[j]) - 1]
        return [(r, 0, b) for r, b in zip(rs, widths)]

    def centre(self) -> torch.Tensor:
        return torch.full((self.variables,), len(self.bit_levels[0]) // 2, dtype=torch.long)

    def choices(self, x: torch.Tensor) -> list[Choice]:
        return [Choice(_k_row(m, self.base, self.nm), r, b) for m, (r, _, b) in zip(self.mats, self.resolve(x))]


def bit_plan(mats: list[Matrix], pools: list[BitPools], start: list[Choice], mode: str, nm, base: LayerSpec,
             budget_bits: float, floor: int, levels: int, rank_levels: list[list[int]] | None) -> BitSpace:
    """The policy's variables around a start plan: ``levels`` widths centred on each matrix's start width."""
    c = levels // 2
    bit_levels = []
    for ch in start:
        i = BIT_WIDTHS.index(ch.bits if ch.bits is not None else base.bits)
        bit_levels.append([BIT_WIDTHS[min(max(i + k - c, 0), len(BIT_WIDTHS) - 1)] for k in range(levels)])
    return BitSpace(mats, pools, start, mode, nm, base, budget_bits, floor, rank_levels, bit_levels)
