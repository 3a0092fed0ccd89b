"""CAP (Zhou et al., ICLR 2026; methods.md §1.1): probabilistic global allocation over candidate pools.

Stage 1, pools (per matrix; the RPCA pools are data-free):
  pools="rpca" (the paper): W ~= L + S by IALM robust PCA (``rpca_pools``). Candidates are the singular directions
      σ_i u_i v_i^T of L and the nonzeros of S.
  pools="whitened" (ours): the top p singular directions of A = W G mapped back by G^{-1} (G G^T = H), with H the dense
      model's X^T X / n on ``max_samples`` windows streamed block by block (A = W diag(d), d_j = sqrt(mean x_j^2),
      when ``norms`` is passed; A = W without data), p = min(min(m, n), budget * m n / (m + n)) (the rank that alone
      would spend the matrix's share of the budget). Sparse candidates are the entries of the residual W - L_r0 with
      r0 = ``residual_rank`` (default: the run's uniform rank, --rank), scored by the OBS saliency e^2 / [H^-1]_jj (the
      knapsack's "low rank, then the most salient entries" proxy). A rebuild is the kept directions' L with W itself on
      the kept entries' support (``Pools.rebuild``). One SVD per matrix and one Cholesky per input group, much
      cheaper than RPCA. Why r0 and not p: entries of W - L_p have had all p directions removed, so they would rank
      by what the directions already explain.
  Pure pruning has no directions (the candidates are the entries of W); rank-only methods have no sparse part (the
  directions of the whitened SVD of W, whatever ``pools`` says).

Sparse entries are ranked by |value| * d_j (Wanda-like; |value| without data; the square root of the OBS saliency for
the full-H whitened pools).

Stage 2, allocation (the paper's idea, keep-probabilities trained by REINFORCE under one global budget, re-cast so
that it learns on a CPU budget; BENCHMARKS.md, "Global allocation"). The policy has a few variables per matrix, not
one per candidate: a categorical over ``levels`` rank levels (S+LR and rank-only; the start plan's rank times
2^((l - c) / c), c the centre, clipped to [rank_floor, p]) and one over ``levels`` density offsets (S+LR and pruning;
the start plan's sparse fraction plus span (l - c) / c). A drawn plan is made to spend the budget exactly: the sparse
fractions move by one common shift found by bisection, each clamped to the trust region budget ± ``span`` (rank-only:
the ranks scale by one common factor). Its loss is what the deployed model is judged by: KL(dense || compressed) of the
next-token distributions on ``windows`` calibration windows cut to ``tokens`` tokens (dense log-probabilities computed
once), with every matrix rebuilt from its pools at the plan's rank and entry count (the top directions, then each
row's top-scored entries, the solvers' per-row count: ``Pools.rebuild``); data-free, the weight-only relative
error. Losses are memoised per plan.
Each of ``steps`` steps draws ``samples`` plans; the logits move by Adam (``lr``) along the leave-one-out REINFORCE
estimate of the gradient of the expected loss, advantages divided by the samples' standard deviation
(``policy_search``). Each variable's categorical is a discretised Gaussian over its ordered levels, exp(-(l - μ)^2 /
(2 ``sigma``^2)), with μ learned from the centre (the start plan) and σ fixed, so it never collapses onto a wrong level
and stops exploring its neighbours (a free categorical did, within tens of steps). The final plan is one of
the policy's modes along the way: of those that score no worse than the start plan on the fitness windows, the one
with the lowest loss on as many further calibration windows that the search never saw, kept only if it beats the
start there too (``levels.select``; info "kept"); ``fit_budget`` then settles rounding
(not on solved levels, whose plans already sit under the budget: ``solvedlevels``).
Start (``init``): "knapsack" (default; the knapsack allocator's plan with the same pricing, floor and span, whose
whitened pass over the calibration data also builds the full-H pools), "uniform", or a ``start`` plan (Python only).
``normalize``/``fisher_*`` are the knapsack start's pricing.
Rank floor (S+LR; ``rank_floor``, default the run's --rank): no rank level goes below it.
Under a budget in bits (config.alloc.budget_bits) the levels are S's bit width and the rank on the run's support, each
matrix rebuilt as round-to-nearest S plus the whitened refit of the rest (``bitlevels``; pools="solved": S solved at
every width by the run's method instead); the start is the knapsack's plan in bits, the rank floor defaults to 0 as
there, and N:M patterns are allowed (the support does not move).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import input_sq_norms
from ..errors import SLRError
from ..plan import Plan
from ..solvers.rpca import rpca_pools
from . import knapsack, uniform
from .base import (
    SPAN,
    Choice,
    Matrix,
    alloc_mode,
    check_span,
    choice_params,
    finish,
    fit_budget,
    matrices,
    nm_of,
    resolve_budget,
    resolve_normalize,
    scales,
    whitened_metrics,
)
from .bitlevels import BitSpace, bit_plan, make_bit_pools
from .bits import info as bits_info
from .bits import method_solver, solve_widths
from .levels import Fitness, LevelSpace, fitness_info, heldout, level_plan, rank_ladder, select
from .solvedlevels import SolvedSpace, level_solver, pipeline_space, solved_space

if TYPE_CHECKING:
    from ..config import CompressConfig


@dataclass
class Pools:
    """Candidates of one matrix (cpu): directions (U[:, i] * sigma[i]) @ Vt[i], best first, and sparse entries, each
    with its position ``pos`` in its row's score order. Pools of every entry of W (pruning, residual pools) hold W
    itself and pos [m, n] (int16: 6 bytes per weight in all); RPCA's S holds its nonzeros as a list."""

    U: torch.Tensor  # [m, p]
    sigma: torch.Tensor  # [p]
    Vt: torch.Tensor  # [p, n]
    pos: torch.Tensor  # [m, n] with W, else [nnz]: the entry's rank within its row by score (0 = best)
    W: torch.Tensor | None = None  # [m, n] float32, the dense weights (the model's are swapped during the search)
    values: torch.Tensor | None = None  # [nnz] RPCA's S, added to L
    index: torch.Tensor | None = None  # [nnz] int32 flat row-major

    def rebuild(self, m: Matrix, rank: int, entries: int) -> torch.Tensor:
        """Dense W [m, n] float32 from the top ``rank`` directions and, in every row, the row's top-scored
        round(entries / d_out) entries: the per-row count the solvers keep (``LayerSpec.kept``), so a rebuild prunes
        like the deployed solve does. RPCA pools add the kept entries of S to L (the paper's W ~= L + S); pools of
        every entry put W itself on the kept support, L elsewhere (residual pools choose the entries on W - L_r0;
        adding that residual to L instead would count the directions past r0 twice)."""
        r = min(rank, self.sigma.numel())
        L = (self.U[:, :r] * self.sigma[:r]) @ self.Vt[:r] if r else torch.zeros(m.d_out, m.d_in)
        k = int(round(max(entries, 0) / m.d_out))
        if not k:
            return L
        keep = self.pos < k
        if self.W is not None:  # one dense select: W on the kept support, L elsewhere
            return torch.where(keep, self.W, L)
        L.view(-1)[self.index[keep].long()] += self.values[keep]
        return L

    @property
    def has_original(self) -> bool:
        """Whether ``original()`` gives the dense W (pools of every entry hold it; others do not)."""
        return self.W is not None

    def original(self) -> torch.Tensor:
        return self.W


def _row_pos(score: torch.Tensor) -> torch.Tensor:
    """[m, n] -> each entry's rank within its row by descending score (int16 where it fits)."""
    n = score.shape[1]
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    dt = torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
    return torch.empty(score.shape, dtype=dt).scatter_(1, order, torch.arange(n, dtype=dt).expand_as(order))


def _list_pos(index: torch.Tensor, score: torch.Tensor, d_in: int) -> torch.Tensor:
    """[nnz] -> each listed entry's rank within its row by descending score."""
    rows = index.long() // d_in
    order = torch.argsort(score, descending=True, stable=True)
    perm = order[torch.argsort(rows[order], stable=True)]  # grouped by row, score order kept inside a row
    counts = torch.bincount(rows)
    starts = counts.cumsum(0) - counts
    pos = torch.empty(rows.numel(), dtype=torch.int32)
    pos[perm] = (torch.arange(rows.numel()) - starts[rows[perm]]).int()
    return pos


def make_pools(m: Matrix, d: torch.Tensor | None, mode: str, pools: str, budget: float, rpca_iters: int,
               residual_rank: int = 0, white: tuple | None = None) -> Pools:
    """Candidate pools of one matrix. ``white`` = whitener(H) switches the whitened pools to the full-H metric."""
    W = m.weight.detach().float().cpu().clone()
    if white is not None and mode in ("slr", "rank") and pools == "whitened":
        return _white_pools(m, W, mode, budget, residual_rank, white)
    dd = d.float() if d is not None else None
    col = dd[None, :] if dd is not None else 1.0  # the Wanda-like score |value| * d_j's d_j
    if mode == "slr" and pools == "rpca":
        rp = rpca_pools(W, iters=rpca_iters)
        score = rp.values.abs() * (dd[rp.index % m.d_in] if dd is not None else 1.0)
        return Pools(rp.U.float(), rp.sigma.float(), rp.Vt.float(), _list_pos(rp.index, score, m.d_in),
                     values=rp.values.float(), index=rp.index.int())
    if mode in ("slr", "rank"):
        P, s, Qt = torch.linalg.svd(W * col, full_matrices=False)
        p = min(m.d_out, m.d_in) if mode == "rank" else min(m.d_out, m.d_in, int(budget * m.numel / m.lr_unit))
        U, sigma = P[:, :p].contiguous(), s[:p].contiguous()
        Vt = (Qt[:p] / dd[None, :]) if dd is not None else Qt[:p].contiguous()
        if mode == "rank":
            return Pools(U, sigma, Vt, torch.zeros(0, dtype=torch.int16))
        r0 = min(residual_rank, p)
        R = W - (U[:, :r0] * sigma[:r0]) @ Vt[:r0]  # entries chosen on the residual, stored as W
        return Pools(U, sigma, Vt, _row_pos(R.abs() * col), W)
    if mode == "sparse":
        return Pools(torch.zeros(m.d_out, 0), torch.zeros(0), torch.zeros(0, m.d_in), _row_pos(W.abs() * col), W)
    raise SLRError(f"unknown pools {pools!r}", "use rpca or whitened")


def _white_pools(m: Matrix, W: torch.Tensor, mode: str, budget: float, residual_rank: int, white: tuple) -> Pools:
    """Whitened pools in the full metric tr(E H E^T): directions of A = W G mapped back by G^{-1}; residual entries
    scored by the OBS saliency w^2 / [H^{-1}]_jj."""
    G, Gi, sal = white
    P, s, Qt = torch.linalg.svd(W @ G, full_matrices=False)
    p = min(m.d_out, m.d_in) if mode == "rank" else min(m.d_out, m.d_in, int(budget * m.numel / m.lr_unit))
    U, sigma, Vt = P[:, :p].contiguous(), s[:p].contiguous(), (Qt[:p] @ Gi).float()
    if mode == "rank":
        return Pools(U, sigma, Vt, torch.zeros(0, dtype=torch.int16))
    r0 = min(residual_rank, p)
    R = W - (U[:, :r0] * sigma[:r0]) @ Vt[:r0]  # entries chosen on the residual, stored as W (see Pools.rebuild)
    return Pools(U, sigma, Vt, _row_pos(R.abs() * sal.sqrt().float()[None, :]), W)


def policy_search(fitness, variables: int, levels: int, *, steps: int, samples: int, lr: float, sigma: float,
                  gen: torch.Generator) -> tuple[list[torch.Tensor], list[dict]]:
    """REINFORCE on ordered categoricals: variable v draws level l with probability ∝ exp(-(l - μ_v)^2 / (2 σ^2)),
    μ [variables] starting at the centre level (the start plan), σ fixed so that the policy keeps exploring the
    neighbouring levels (a free categorical collapses onto a wrong level within tens of steps). Each step draws
    ``samples`` plans, scores them with ``fitness`` and moves μ by Adam along the leave-one-out estimate of the
    gradient of E[loss]: mean_i A_i ∇ log p(x_i), A_i = (loss_i - mean_{k != i} loss_k) / std(loss). Returns the
    policy's modes (the levels nearest μ) after each step that changed it, the last one last (the start's when no
    step did), and the per-step trace."""
    c = (levels - 1) / 2
    lv = torch.arange(levels, dtype=torch.float64)
    mu = torch.full((variables,), c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=lr)
    trace, modes = [], [mu.detach().round().long()]
    bar = tqdm(range(steps), desc="cap", unit="step", disable=None)  # None: only on a terminal
    for step in bar:
        logp = torch.log_softmax(-(lv[None, :] - mu[:, None]) ** 2 / (2 * sigma ** 2), -1)  # [V, L]
        X = torch.multinomial(logp.detach().exp(), samples, replacement=True, generator=gen).T  # [N, V]
        loss = torch.tensor([fitness(x) for x in X], dtype=torch.float64)  # [N]
        adv = loss - (loss.sum() - loss) / max(samples - 1, 1)
        adv = adv / loss.std().clamp_min(1e-12) if samples > 1 else adv * 0
        opt.zero_grad()
        (adv[:, None] * logp.gather(1, X.T).T).sum(1).mean().backward()  # ∇ of the surrogate mean_i A_i log p(x_i)
        opt.step()
        with torch.no_grad():
            mu.clamp_(0, levels - 1)
        if not torch.equal(mode := mu.detach().round().long(), modes[-1]):
            modes.append(mode)
        trace.append({"step": step, "mean_loss": float(loss.mean()), "min_loss": float(loss.min()),
                      "mean_shift": float((mu.detach() - c).abs().mean())})
        bar.set_postfix(loss=f"{trace[-1]['mean_loss']:.4f}")
    return modes, trace


@dataclass
class Setup:
    """What the level-space allocators (CAP, search) share: the matrices, the budget, the level space around the start
    plan, and the info that describes them."""

    mats: list[Matrix]
    mode: str
    budget: float | None  # the retained fraction; None under a budget in bits (the space's)
    space: LevelSpace | BitSpace | SolvedSpace
    data: bool
    info: dict

    @contextmanager
    def swapping(self):
        """Fitness evaluations write candidate weights into the model; the originals come back afterwards."""
        # a copy of W only where the pools hold none; pools.original() is read after the search (solved levels keep
        # W on disk, so nothing is loaded for the whole model up front)
        copies = None
        if self.data:
            copies = [None if p.has_original else m.weight.detach().clone()
                      for m, p in zip(self.mats, self.space.pools)]
        try:
            yield
        finally:
            self.space.loaded.clear()
            if copies is not None:
                for m, p, c in zip(self.mats, self.space.pools, copies):
                    m.weight.data.copy_(p.original() if c is None else c)

    def finish(self, who: str, x: torch.Tensor, t0: float, extra: dict, base) -> tuple[Plan, dict]:
        """The plan of levels ``x`` [variables], fitted to the budget."""
        sp = self.space
        if isinstance(sp, BitSpace):  # resolve already spends at most the bits budget
            choices = sp.choices(x)
            extra = {**extra, **bits_info(self.mats, choices, self.mode, sp.nm, base, sp.budget_bits)}
            return finish(who, self.mats, choices, self.mode, sp.nm, None, t0, {**self.info, **extra}, base=base)
        target = int(self.budget * sum(m.numel for m in self.mats))
        choices = sp.choices(x)
        if not isinstance(sp, SolvedSpace) or sum(choice_params(m, c, self.mode, None)
                                                  for m, c in zip(self.mats, choices)) > target:
            choices = fit_budget(self.mats, choices, target, self.mode, None)  # solved levels keep their slack
        plan, info = finish(who, self.mats, choices, self.mode, None, self.budget, t0, {**self.info, **extra},
                            base=base)
        if isinstance(sp, SolvedSpace) and sp.attach(plan, base):
            info["reused_levels"] = len(plan.solved)  # matrices the pipeline takes from the level pass
        return plan, info


def _start(model, config, calib, device, init: str, mode: str, kw: dict) -> Plan:
    if init == "knapsack":
        return knapsack.allocate(model, config, calib, device, mode=mode, **kw)[0]
    return uniform.allocate(model, config, calib, device, mode=mode)[0]


def _start_choices(start: Plan, mats: list[Matrix], mode: str) -> list[Choice]:
    """(kept per row, rank) of each matrix in the start plan (None per row for rank-only, rank 0 for pruning)."""
    out = []
    for m in mats:
        s = start.get(m.block, m.name)
        out.append(Choice(None if mode == "rank" else s.kept(m.d_out, m.d_in) // m.d_out,
                          0 if mode == "sparse" else s.rank))
    return out


def prepare(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device, who: str, *, pools: str,
            levels: int, span: float, init: str, start: Plan | None, mode: str | None,
            rpca_iters: int = 5, max_samples: int | None = 8, norms: dict | None = None,
            residual_rank: int | None = None, normalize: str | None = None, fisher_samples: int | None = 4,
            fisher_power: float = 0.25, rank_floor: int | None = None, level_solve: str = "fast",
            level_cache: str = "", compress=None, reach: float | None = None) -> Setup:
    """Checks, candidate pools (stage 1) and the level space around the start plan (``solvedlevels`` with
    pools="solved" under a retained-fraction budget; ``compress`` = ``pipeline.compress_`` for
    level_solve="pipeline"; ``reach``: how far the solved levels reach from the start, as a fraction of d_in (None:
    ``span``; it does not change the knapsack start's trust region)."""
    t0 = time.perf_counter()
    given = start is not None
    check_span(span, who)
    if reach is not None and (pools != "solved" or config.alloc.budget_bits is not None):
        raise SLRError(f"{who} reach sets how far S+LR levels solved under --budget reach",
                       "drop --alloc-opt reach, or use pools=solved with --budget")
    if reach is not None:
        check_span(reach, who, "reach")  # the same bounds: a fraction of d_in either side of the start
    if init not in ("knapsack", "uniform"):
        raise SLRError(f"unknown {who} init {init!r}", "use --alloc-opt init=knapsack or init=uniform")
    bits = config.alloc.budget_bits is not None
    if pools not in ("rpca", "whitened", "solved"):
        raise SLRError(f"unknown {who} pools {pools!r}", "use pools='whitened' (default), 'rpca' (the paper's) or "
                       "'solved' (each level solved by the run's method)")
    if levels < 3 or levels % 2 == 0:
        raise SLRError(f"{who} levels={levels} must be odd and at least 3", "use e.g. --alloc-opt levels=5")
    mode = alloc_mode(config, mode)
    mats = matrices(model)
    data = calib is not None and len(calib) > 0
    normalize = resolve_normalize(normalize, data)  # the knapsack start's pricing; checked before the pools
    kw = {"max_samples": max_samples, "normalize": normalize, "fisher_samples": fisher_samples,
          "fisher_power": fisher_power, "rank_floor": rank_floor}
    if bits:
        return _prepare_bits(model, config, calib, device, mats, mode, data, levels, init, start, norms, kw, t0,
                             pools == "solved")
    if nm_of(config) is not None:
        raise SLRError(f"{who} allocates unstructured sparsity and ranks", "use --allocate knapsack with --pattern N:M")
    budget = resolve_budget(config, mats, mode)
    if pools == "solved":
        return _prepare_solved(model, config, calib, device, mats, mode, budget, data, levels, span, init, start,
                               norms, kw, t0, level_solve, level_cache, compress, span if reach is None else reach)
    full_h = pools == "whitened" and data and mode in ("slr", "rank") and norms is None
    if norms is None and not full_h:
        norms = input_sq_norms(model, calib, device, max_samples)
    r0 = config.layer_spec().rank if residual_rank is None else int(residual_rank)
    pl: list = [None] * len(mats)
    t_pools = 0.0

    def visit(j: int, white: tuple) -> None:
        nonlocal t_pools
        t = time.perf_counter()
        pl[j] = make_pools(mats[j], None, mode, pools, budget, rpca_iters, r0, white)
        t_pools += time.perf_counter() - t

    if full_h and start is None and init == "knapsack":  # the knapsack start's whitened pass builds the pools too
        start = _start(model, config, calib, device, init, mode, {**kw, "span": span, "visit": visit})
    elif full_h:  # full-H whitening, streamed block by block
        for j, white in whitened_metrics(model, mats, calib, device, max_samples):
            visit(j, white)
    t = time.perf_counter()
    for j, m in enumerate(mats):
        if pl[j] is None:
            pl[j] = make_pools(m, scales(m, norms), mode, pools, budget, rpca_iters, r0)
    t_pools += time.perf_counter() - t
    floor = (config.layer_spec().rank if rank_floor is None else int(rank_floor)) if mode == "slr" else 0
    if start is None:
        start = _start(model, config, calib, device, init, mode, {**kw, "span": span})
    start_ch = _start_choices(start, mats, mode)
    space = level_plan(mats, pl, start_ch, mode, budget, span, floor, levels)
    info = {"pools": pools if mode == "slr" else ("whitened" if mode == "rank" else "weights"),
            "metric": "full H" if full_h else ("diag H" if norms is not None else "weights"),
            **({"residual_rank": r0} if mode == "slr" and pools == "whitened" else {}),
            "rank_floor": floor, "span": span, "init": "given" if given else init,
            "normalize": normalize, "levels": levels, "variables": space.variables, "seconds_pools": t_pools,
            "seconds_start": time.perf_counter() - t0 - t_pools}
    return Setup(mats, mode, budget, space, data, info)


def _prepare_solved(model, config, calib, device, mats, mode, budget, data, levels, span, init, start, norms, kw,
                    t0, level_solve: str, level_cache: str, compress, reach: float) -> Setup:
    """``prepare`` with every level solved by the run's method (``solvedlevels``): S's row count per matrix at the
    start plan's rank."""
    if mode != "slr" or not data or norms is not None:
        raise SLRError("pools=solved under --budget solves S + L levels on each matrix's H and needs an S+LR method "
                       "and calibration data", "drop --alloc-opt pools=solved")
    level_solver(config, level_solve)  # its one-line errors before the start plan's pass
    if level_solve == "pipeline" and compress is None:
        raise SLRError("level_solve=pipeline solves the levels in the compression pipeline, which this call was not "
                       "given", "call through slr.compress_ or plan_for, or pass compress=slr.compress_")
    given = start is not None
    if start is None:
        start = _start(model, config, calib, device, init, mode, {**kw, "span": span})
    t_start = time.perf_counter() - t0
    start_ch = _start_choices(start, mats, mode)
    if level_solve == "pipeline":
        space = pipeline_space(model, config, calib, device, mats, start_ch, reach, levels, level_cache, compress)
    else:
        space = solved_space(model, config, calib, device, mats, start_ch, reach, levels, kw["max_samples"],
                             level_solve, level_cache)
    # the budget's S entries at the start plan's ranks: the top of the window every plan stays in
    space.ceiling = int(budget * sum(m.numel for m in mats)) - sum(ch.rank * m.lr_unit for m, ch in zip(mats, start_ch))
    info = {"pools": f"{config.method} solved per level ({level_solve})", "metric": "full H",
            "span": span, "reach": reach, "init": "given" if given else init, "normalize": kw["normalize"],
            "levels": levels, "variables": space.variables, "solved_levels": sum(len(p.weights) for p in space.pools),
            "seconds_start": t_start, "seconds_pools": time.perf_counter() - t0 - t_start}
    return Setup(mats, mode, budget, space, data, info)


def _prepare_bits(model, config, calib, device, mats, mode, data, levels, init, start, norms, kw, t0,
                  solved: bool) -> Setup:
    """``prepare`` under a budget in bits: levels are (bits, rank) on the run's support (``bitlevels``)."""
    if mode == "rank":
        raise SLRError("a rank-only run has no quantized S for --budget-bits to size", "use --budget instead")
    solver = method_solver(config) if solved else None
    if solved and not (data and norms is None):
        raise SLRError("pools=solved solves S on each matrix's H and needs calibration data",
                       "drop --alloc-opt pools=solved (data-free runs rebuild S by rounding)")
    cache: dict = {}  # matrix index -> S solved per width, filled by the knapsack start's pass when it has one
    given = start is not None
    if start is None:
        start = _start(model, config, calib, device, init, mode, {**kw, "proxy": "solved", "solved": cache}
                       if solved and init == "knapsack" else kw)
    t_start = time.perf_counter() - t0
    base, nm = config.layer_spec(), nm_of(config)
    floor = int(kw["rank_floor"] or 0) if mode == "slr" and base.rank > 0 else 0
    start_ch = [Choice(None, start.get(m.block, m.name).rank, start.get(m.block, m.name).bits) for m in mats]
    ranks = None
    if mode == "slr" and base.rank > 0:
        ranks = [rank_ladder(ch.rank, floor, min(m.d_out, m.d_in), levels) for m, ch in zip(mats, start_ch)]
    top = [max(r) for r in ranks] if ranks is not None else [0] * len(mats)
    pl: list = [None] * len(mats)
    if data and norms is None:  # full-H whitening, streamed block by block
        for j, white in whitened_metrics(model, mats, calib, device, kw["max_samples"]):
            if solver is not None and j not in cache:
                cache[j] = solve_widths(mats[j].weight.detach().float().cpu(), white[0], base, solver)
            pl[j] = make_bit_pools(mats[j], white, None, base, top[j], cache.get(j))
    for j, m in enumerate(mats):  # the diagonal metric with norms, the weights without data
        if pl[j] is None:
            pl[j] = make_bit_pools(m, None, scales(m, norms), base, top[j])
    space = bit_plan(mats, pl, start_ch, mode, nm, base, config.alloc.budget_bits, floor, levels, ranks)
    s_pool = f"{config.method} solved per width" if solved else "round to nearest"
    info = {"pools": s_pool + (" + whitened refit" if ranks is not None else ""),
            "metric": "full H" if data and norms is None else ("diag H" if data else "weights"),
            "rank_floor": floor, "init": "given" if given else init, "normalize": kw["normalize"], "levels": levels,
            "variables": space.variables, "bit_widths": sorted({b for ls in space.bit_levels for b in ls}),
            "seconds_start": t_start, "seconds_pools": time.perf_counter() - t0 - t_start}
    return Setup(mats, mode, None, space, data, info)


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *,
             pools: str = "whitened", steps: int = 20, samples: int = 16, lr: float = 0.15, levels: int = 5,
             sigma: float = 0.5, windows: int = 4, tokens: int = 128, batch_size: int = 4,
             rpca_iters: int = 5, max_samples: int | None = 8, norms: dict | None = None,
             residual_rank: int | None = None, normalize: str | None = None, fisher_samples: int | None = 4,
             fisher_power: float = 0.25, rank_floor: int | None = None, span: float = SPAN, init: str = "knapsack",
             start: Plan | None = None, mode: str | None = None, level_solve: str = "fast",
             level_cache: str = "", compress=None, reach: float | None = None) -> tuple[Plan, dict]:
    """CAP plan (see the module docstring). ``steps`` × ``samples`` plans are scored on ``windows`` calibration
    windows of ``tokens`` tokens; ``levels`` per variable (odd); ``span`` = the trust region (each matrix's retained
    fraction stays within budget ± span; 1 = off) and the reach of the density levels; ``init`` = "knapsack" (the
    knapsack's plan) or "uniform"; ``start`` (Python only) = a plan to start from instead; ``pools="solved"`` with
    ``level_solve`` / ``level_cache`` / ``reach``: S+LR levels solved by the run's method (``solvedlevels``), reaching
    ``reach`` of d_in from the start (default ``span``)."""
    t0 = time.perf_counter()
    st = prepare(model, config, calib, device, "CAP", pools=pools, levels=levels, span=span, init=init, start=start,
                 mode=mode, rpca_iters=rpca_iters, max_samples=max_samples, norms=norms,
                 residual_rank=residual_rank, normalize=normalize, fisher_samples=fisher_samples,
                 fisher_power=fisher_power, rank_floor=rank_floor, level_solve=level_solve, level_cache=level_cache,
                 compress=compress, reach=reach)
    fitness = Fitness(model, st.space, calib if st.data else None, device, windows, tokens, batch_size)
    held = heldout(fitness, calib, windows)
    gen = torch.Generator().manual_seed(config.seed)
    centre = st.space.centre()
    t1 = time.perf_counter()
    with st.swapping():
        fitness(centre)
        modes, trace = policy_search(fitness, st.space.variables, levels, steps=steps, samples=samples, lr=lr,
                                     sigma=sigma, gen=gen)
        x, take, losses = select(fitness, held, centre, modes[1:])
    extra = {**fitness_info(calib, windows, tokens, st.space.candidate), "steps": steps, "samples": samples, "lr": lr,
             "sigma": sigma, **losses, "kept": "policy" if take else "start", "trace": trace,
             "loss_evals": fitness.evals, "seconds_search": time.perf_counter() - t1}
    return st.finish("cap", x, t0, extra, config.layer_spec())
