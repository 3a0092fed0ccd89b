"""The level space that CAP and the search allocator share (see ``cap``'s docstring): per matrix a rank level and a
density level around a start plan, every plan resolved to spend the budget exactly, and its fitness, the KL of the
compressed model's next-token distributions to the dense model's with every matrix rebuilt from its pools."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..kl import kl, next_logits
from .base import Choice, Matrix
from .prefix import Prefixes

if TYPE_CHECKING:
    from .cap import Pools


@dataclass
class LevelSpace:
    """Per matrix a categorical over rank levels (S+LR, rank-only) and one over density offsets (S+LR, pruning), both
    centred on the start plan; ``resolve`` turns one level per variable into a plan that spends the budget exactly."""

    mats: list[Matrix]
    pools: list[Pools]
    start: list[Choice]
    mode: str
    budget: float
    span: float
    rank_levels: list[list[int]]  # [n_mats][levels]
    dens_off: list[list[float]]  # [n_mats][levels]: offsets of the sparse retained fraction
    loaded: dict = field(default_factory=dict, repr=False)  # matrix index -> the level its weights hold now
    candidate = "pool rebuild"  # what a plan's matrices are rebuilt from (not a field: no annotation)

    @property
    def variables(self) -> int:
        return len(self.mats) * (2 if self.mode == "slr" else 1)

    def split(self, x: torch.Tensor) -> tuple[list[int], list[int]]:
        """(rank level, density level) per matrix from a level per variable [variables]."""
        n = len(self.mats)
        c = len(self.rank_levels[0]) // 2
        if self.mode == "slr":
            return x[:n].tolist(), x[n:].tolist()
        if self.mode == "rank":
            return x.tolist(), [c] * n
        return [c] * n, x.tolist()

    def resolve(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(rank, kept entries) per matrix. Ranks are the sampled levels (rank-only: scaled by one common factor);
        the sparse parts take their start fraction plus the sampled offset plus one common shift found by bisection
        so the total is the budget, each clamped to the trust region budget ± span."""
        K = self.budget * sum(m.numel for m in self.mats)
        ri, di = self.split(x)
        ranks = [self.rank_levels[j][i] for j, i in enumerate(ri)]
        if self.mode == "rank":
            lo, hi = 0.0, 4.0
            for _ in range(40):
                mid = (lo + hi) / 2
                cost = sum(max(1, int(r * mid)) * m.lr_unit for r, m in zip(ranks, self.mats))
                lo, hi = (mid, hi) if cost <= K else (lo, mid)
            return [(min(max(1, int(r * lo)), m.d_out, m.d_in), 0) for r, m in zip(ranks, self.mats)]
        base = [ch.k_row * m.d_out / m.numel + self.dens_off[j][i]
                for j, (m, ch, i) in enumerate(zip(self.mats, self.start, di))]
        lims = []
        for m, r in zip(self.mats, ranks):
            lr = r * m.lr_unit / m.numel
            lims.append((max(self.budget - self.span - lr, 0.0), max(min(self.budget + self.span - lr, 1.0), 0.0)))

        def fracs(shift: float) -> list[float]:
            return [min(max(b + shift, lo), hi) for b, (lo, hi) in zip(base, lims)]

        rank_cost = sum(r * m.lr_unit for r, m in zip(ranks, self.mats))
        lo, hi = -1.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            cost = rank_cost + sum(f * m.numel for f, m in zip(fracs(mid), self.mats))
            lo, hi = (mid, hi) if cost <= K else (lo, mid)
        return [(r, int(f * m.numel)) for r, f, m in zip(ranks, fracs(lo), self.mats)]

    def centre(self) -> torch.Tensor:
        """The start plan's levels [variables]."""
        return torch.full((self.variables,), len(self.rank_levels[0]) // 2, dtype=torch.long)

    def choices(self, x: torch.Tensor) -> list[Choice]:
        out = []
        for m, (r, e) in zip(self.mats, self.resolve(x)):
            k_row = None if self.mode == "rank" else min(m.d_in, int(round(e / m.d_out)))
            if r == 0 and not k_row:  # never drop a whole matrix: keep one row-unit (or rank 1)
                r, k_row = (1, k_row) if self.mode == "rank" else (0, 1)
            out.append(Choice(k_row, r))
        return out


def draw_order(x: torch.Tensor) -> list[int]:
    """Each matrix's turn [n_mats] in a permutation drawn from the plan ``x`` itself: the tie-break of a budget
    repair, so that the same plan always resolves the same way and no block is stepped back first (the matrices'
    own order would undo most of CAP's moves in the first blocks)."""
    seed = zlib.crc32(x.to(torch.int64).contiguous().numpy().tobytes())
    return torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).argsort().tolist()


def rank_ladder(start: int, floor: int, top: int, levels: int) -> list[int]:
    """``levels`` ranks start x 2^((i - c) / c), c the centre, within [floor, top]; the centre is ``start`` itself."""
    c = (levels - 1) / 2
    rs = [min(max(int(round(max(start, 1) * 2 ** ((i - c) / c))), floor), top) for i in range(levels)]
    rs[int(c)] = min(start, top)
    return rs


def level_plan(mats: list[Matrix], pools: list[Pools], start: list[Choice], mode: str, budget: float, span: float,
               floor: int, levels: int) -> LevelSpace:
    """The policy's variables around a start plan (see the module docstring)."""
    c = (levels - 1) / 2
    rank_levels, dens_off = [], []
    for m, p, ch in zip(mats, pools, start):
        if mode == "sparse":
            rank_levels.append([0] * levels)
        else:
            pmax = p.sigma.numel() if mode == "slr" else min(m.d_out, m.d_in)
            cap = max(int((min(budget + span, 1.0)) * m.numel / m.lr_unit), 0)  # ranks past the trust region are out
            rs = rank_ladder(ch.rank, max(floor, 0 if mode == "slr" else 1), min(pmax, cap), levels)
            rs[levels // 2] = min(ch.rank, pmax)  # the start plan itself, even past the trust region
            rank_levels.append(rs)
        dens_off.append([span * (i - c) / c for i in range(levels)] if mode != "rank" else [0.0] * levels)
    return LevelSpace(mats, pools, start, mode, budget, span, rank_levels, dens_off)


class Fitness:
    """Loss of a plan: KL(dense || candidate) of the next-token distributions on calibration windows, every matrix
    rebuilt from its pools at the plan's (rank, entries); the weight-only proxy without data. Memoised per plan."""

    def __init__(self, model, space: LevelSpace, calib, device, windows: int, tokens: int, batch_size: int,
                 offset: int = 0, prefix: int | None = None):
        """``prefix``: keep the block inputs of the anchor and of that many recent plans, and run each new plan from
        the first block it changes (``prefix.Prefixes``; for plans scored near each other, as the search's); None:
        every forward runs every block."""
        self.model, self.space, self.device, self.batch_size = model, space, device, batch_size
        self.ids = None if calib is None or len(calib) <= offset else calib[offset:offset + windows, :tokens]
        self.evals, self.memo = 0, {}
        self.dense = self.prefixes = None
        if self.ids is not None:
            with torch.no_grad():  # [w, T-1, V] dense log-probabilities, computed once
                self.dense = [F.log_softmax(next_logits(model, self.ids[s:s + batch_size].to(device)), -1)
                              for s in range(0, len(self.ids), batch_size)]
            if prefix is not None:
                self.prefixes = Prefixes(model, [m.block for m in space.mats], prefix)

    def __call__(self, x: torch.Tensor) -> float:
        k = tuple(x.tolist())
        if k not in self.memo:
            self.evals += 1
            self.memo[k] = self._loss(self.space.resolve(x))
        return self.memo[k]

    def anchor(self, x: torch.Tensor) -> None:
        """Keep plan ``x``'s block inputs while it is the plan that the next ones are drawn near (the search's
        parent); scores it if it has none."""
        if self.prefixes is not None and not self.prefixes.pin(plan := self.space.resolve(x)):
            self.evals += 1
            self.memo[tuple(x.tolist())] = self._loss(plan, pin=True)

    def _loss(self, plan: list[tuple], pin: bool = False) -> float:
        sp = self.space
        if self.ids is None:
            err = sum(m.numel * float(((m.weight.detach().float().cpu() - p.rebuild(m, *t)).double() ** 2).sum()
                                      / (m.weight.detach().double() ** 2).sum().clamp_min(1e-300))
                      for m, p, t in zip(sp.mats, sp.pools, plan))
            return err / sum(m.numel for m in sp.mats)
        for j, (m, p, t) in enumerate(zip(sp.mats, sp.pools, plan)):
            if sp.loaded.get(j) != t:  # only the matrices whose level changed since the last plan are rebuilt
                m.weight.data.copy_(p.rebuild(m, *t).to(m.weight.device, m.weight.dtype))
                sp.loaded[j] = t
        batches = [self.ids[s:s + self.batch_size].to(self.device) for s in range(0, len(self.ids), self.batch_size)]
        with torch.no_grad():
            if self.prefixes is not None:
                kls = self.prefixes.forward(plan, batches, lambda b, q: float(kl(q, self.dense[b])), pin)
            else:
                kls = [float(kl(next_logits(self.model, ids), t)) for ids, t in zip(batches, self.dense)]
        return sum(kls) / len(kls)


def heldout(fitness: Fitness, calib, windows: int) -> Fitness | None:
    """A fitness on the ``windows`` calibration windows after ``fitness``'s, or None when the run has none. Build it
    while the model still holds its dense weights: its reference log-probabilities come from them."""
    if fitness.ids is None:
        return None
    held = Fitness(fitness.model, fitness.space, calib, fitness.device, windows, int(fitness.ids.shape[1]),
                   fitness.batch_size, offset=windows, prefix=None if fitness.prefixes is None else 1)
    return held if held.ids is not None else None


def select(fitness: Fitness, held: Fitness | None, start: torch.Tensor, path: list[torch.Tensor]
           ) -> tuple[torch.Tensor, bool, dict]:
    """The plan that replaces ``start``, from ``path``: the allocator's successive plans (the search's parents, CAP's
    policy modes), the last one last. Candidates are the plans that score no worse than the start on the fitness
    windows. With further calibration windows that the allocator never saw (``held``), the candidate with the lowest
    loss there is taken if it also beats the start there (validation early stopping: a plan fitted to the few fitness
    tokens is not taken, and neither is a later plan over an earlier one that generalises better); without, the last
    candidate. Returns (the plan, whether it replaces the start, the losses)."""
    out = {"start_loss": fitness(start)}
    cands = [i for i, x in enumerate(path) if fitness(x) <= out["start_loss"]]
    if held is not None:
        out |= {"heldout_windows": int(held.ids.shape[0]), "heldout_start_loss": held(start)}
        i = min(cands, key=lambda j: held(path[j]), default=None)  # the first of equal losses: the earliest plan
        take = i is not None and held(path[i]) <= out["heldout_start_loss"]
    else:
        i = cands[-1] if cands else None
        take = i is not None
    best = path[i] if take else (path[-1] if path else start)
    out |= {"final_loss": fitness(best), "path_plans": len(path), "path_chosen": i if take else None,
            "path_losses": [fitness(x) for x in path]}
    if held is not None:
        out["heldout_final_loss"] = held(best)
        out["path_heldout"] = [held(x) if j in cands else None for j, x in enumerate(path)]  # None: not a candidate
    return (best if take else start), take, out


def fitness_info(calib, windows: int, tokens: int, candidate: str = "pool rebuild") -> dict:
    """How the plans were scored; ``candidate`` names what each matrix was rebuilt from."""
    data = calib is not None and len(calib) > 0
    return {"loss": f"KL(dense || {candidate}), {min(windows, len(calib))} windows x {tokens} tokens" if data
            else "weight-only relative Frobenius (data-free)",
            "windows": min(windows, len(calib)) if data else 0, "tokens": tokens if data else 0}
