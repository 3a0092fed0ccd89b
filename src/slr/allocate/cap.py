"""CAP (Zhou et al., ICLR 2026; methods.md §1.1): probabilistic global allocation over candidate pools.

Stage 1, pools (per matrix; the RPCA pools are data-free):
  pools="rpca" (the paper): W ~= L + S by IALM robust PCA (``rpca_pools``). Candidates are the singular directions
      σ_i u_i v_i^T of L and the nonzeros of S.
  pools="whitened" (ours): the top p singular directions of A = W G mapped back by G^{-1} (G G^T = H), with H the dense
      model's X^T X / n on ``max_samples`` windows streamed block by block (A = W diag(d), d_j = sqrt(mean x_j^2),
      when ``norms`` is passed; A = W without data), p = min(min(m, n), budget * m n / (m + n)) (the rank that alone
      would spend the matrix's share of the budget); a direction's energy is its σ^2. Sparse candidates are the
      entries of the residual W - L_r0 with r0 = ``residual_rank`` (default: the run's uniform rank, --rank), scored
      and weighed by the OBS saliency e^2 / [H^-1]_jj, scaled so that together they are worth the residual's energy
      ||W - L_r0||_H^2 = Σ_{i>r0} σ_i^2 (the knapsack's "low rank, then the most salient entries" proxy). A sampled
      W(mask) is the kept directions' L with W itself on the kept entries' support (``Pools.build``). One SVD per
      matrix and one Cholesky per input group, much cheaper than RPCA. Why r0 and not p: entries of W - L_p have
      had the energy of all p directions removed, so next to the directions they would look cheap and the plan would
      come out rank-heavy (BENCHMARKS.md, "Tuning notes").
  Pure pruning has no directions (the candidates are the entries of W); rank-only methods have no sparse part (the
  directions of the whitened SVD of W, whatever ``pools`` says).

Tractability: sparse entries are ranked by |value| * d_j (Wanda-like; |value| without data; the square root of
the OBS saliency for the full-H whitened pools) and grouped into
``chunks`` score-sorted chunks of equal size per matrix (default 100, i.e. 1% of the pool each); a chunk is one
Bernoulli variable. Singular directions stay individual. So a model has about (100 + p) candidates per matrix.

Stage 2, allocation. Candidate j has keep-probability s_j and cost c_j (a direction costs m + n, a chunk its number
of entries). Minimise E_{mask ~ Bern(s)}[loss(W(mask))] s.t. Σ c_j s_j <= K = budget * Σ m n by REINFORCE:
g = mean over samples of (loss - b) (mask - s) / (s (1 - s)) (s clipped to [0.01, 0.99] in the denominator), with b
the mean of the last 5 losses (the loss of the initial plan seeds the window), s <- P(s - lr g), lr 0.05, 3
iterations. loss = next-token cross-entropy of the model on ``windows`` calibration windows with every compressed
weight replaced by its sampled W(mask) (the model is restored afterwards); without calibration data it is the
weight-only proxy mean_matrices ||W - W(mask)||_F^2 / ||W||_F^2.

Cost normalisation (not specified by the paper): costs are in parameters, so the projection P onto
{0 <= s <= 1, Σ c_j s_j <= K} is the exact Euclidean one, s = clip(y - θ c, 0, 1) with the scalar θ >= 0 found by
bisection: an expensive candidate is pushed down in proportion to its cost. Chunks make sparse candidates cost about
as much as a direction, so the REINFORCE gradient (which is per candidate, cost-blind) compares like with like.
Prior density (not in the paper): a candidate's share of the matrix's energy times the matrix's loss weight
(``base.loss_weight``, as the knapsack: with data the Fisher weight m n (F̄ ||A||^2 / m n)^0.25 from the
output-gradient sensitivity F̄, ``normalize="fisher"``, ``fisher_power``; data-free m n, "size"), divided by its cost.
Initialisation (``init``, not in the paper):
  "knapsack" (default): s0 centred on the knapsack allocator's plan with the same pricing, floor and span
      (``plan_init``: the plan's directions and entries above ½, the rest below, beta = ``init_temp`` = 2), so the
      policy gradient refines the knapsack plan on the real calibration loss: the knapsack's per-matrix curves
      re-fit the residual for every rank, so they split a matrix's budget between directions and entries better
      than the per-candidate priors do (BENCHMARKS.md, "Tuning notes").
  "density": s0 = sigmoid(beta (log density - log tau)), where tau is the density at which the densest-first
      candidates fill the budget: the initial mean plan is the greedy fill by prior density.
  s0 is then projected.
Rank floor (S+LR; ``rank_floor``, default the run's --rank): a matrix's top min(floor, p) directions are kept
outright (not candidates; their cost is taken off the budget first). The residual pools are W - L_r0, so entries
are only priced right next to the r0 directions they were computed after; and without a floor the plans cut ranks
the joint solvers use well (see the knapsack docstring). ``rank_floor=0`` makes every direction a candidate.
Trust region (``span``, default 0.1 as the knapsack's, ``base.check_span``; span=1 turns it off): every matrix keeps a
retained fraction within budget ± span. In each matrix's s0 order (floor directions first), the candidates that
fit in (budget - span) m n are kept outright and those past (budget + span) m n are never kept; only the band in
between is sampled and projected.
Final plan: candidates in decreasing s (ties: higher prior density) are kept while they fit in K; a matrix's rank
is its number of kept directions and its sparse count the entries of its kept chunks (then ``fit_budget``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import input_sq_norms
from ..errors import SLRError
from ..plan import Plan
from ..solvers.rpca import rpca_pools
from ..spec import keep_per_row
from . import knapsack
from .base import (
    SPAN,
    Choice,
    Matrix,
    alloc_mode,
    check_span,
    finish,
    fit_budget,
    loss_weight,
    matrices,
    nm_of,
    output_grad_sq,
    resolve_budget,
    scales,
    whitened_metrics,
)

if TYPE_CHECKING:
    from ..config import CompressConfig


def project_budget(y: torch.Tensor, cost: torch.Tensor, K: float, iters: int = 100) -> torch.Tensor:
    """Euclidean projection of y onto {0 <= s <= 1, Σ cost * s <= K} (cost > 0): clip(y - θ cost, 0, 1), θ by bisection.

    The returned point is always feasible (θ is taken from the feasible end of the bisection bracket).
    """
    y = y.double()
    c = cost.double()
    s = y.clamp(0, 1)
    if float((c * s).sum()) <= K:
        return s
    lo, hi = 0.0, float((y / c).max().clamp_min(0.0)) + 1.0  # at hi every s is 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((c * (y - mid * c).clamp(0, 1)).sum()) > K:
            lo = mid
        else:
            hi = mid
    return (y - hi * c).clamp(0, 1)


@dataclass
class Pools:
    """Candidates of one matrix (cpu). W(mask) = (U[:, d] * sigma[d]) @ Vt[d] + scatter(values[e] at index[e])."""

    U: torch.Tensor  # [m, p]
    sigma: torch.Tensor  # [p]
    Vt: torch.Tensor  # [p, n]
    values: torch.Tensor  # [nnz], score-sorted
    index: torch.Tensor  # [nnz] int32 flat row-major
    sizes: torch.Tensor  # [n_chunks] int64 entries per chunk
    dir_energy: torch.Tensor  # [p] float64, relative
    chunk_energy: torch.Tensor  # [n_chunks] float64, relative
    energy: float = 1.0  # ||A||^2 in the pool's metric (what the relative energies are shares of)
    on_support: bool = False  # False: values are RPCA's S, added to L; True: values are W itself, see build

    def build(self, m: Matrix, dirs: torch.Tensor | None, chunks: torch.Tensor | None) -> torch.Tensor:
        """Dense W(mask) [m, n] float32 from boolean keep masks (None = keep all).

        RPCA pools: the kept directions of L plus the kept entries of S (the paper's W ~= L + S). Residual pools
        (``on_support``; entries chosen and priced on W - L_r0, stored as W's own values): the kept directions
        L_kept, with W itself on the kept entries' support (adding the r0-residual's values to L_kept instead would
        count the directions past r0 twice on the support).
        """
        d = torch.ones_like(self.sigma, dtype=torch.bool) if dirs is None else dirs
        W = (self.U[:, d] * self.sigma[d]) @ self.Vt[d] if bool(d.any()) else torch.zeros(m.d_out, m.d_in)
        if self.values.numel():
            keep = torch.ones_like(self.values, dtype=torch.bool) if chunks is None else \
                torch.repeat_interleave(chunks, self.sizes)
            idx = self.index[keep].long()
            vals = self.values[keep]
            if self.on_support:
                W.view(-1)[idx] = vals
            else:
                W.view(-1)[idx] += vals
        return W


def _chunked(values: torch.Tensor, index: torch.Tensor, score: torch.Tensor, n_chunks: int, d: torch.Tensor | None,
             n_in: int, energy: float):
    order = torch.argsort(score, descending=True)
    values, index = values[order], index[order]
    nnz = values.numel()
    k = min(n_chunks, nnz)
    if k == 0:
        return values, index.int(), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    bounds = torch.linspace(0, nnz, k + 1).round().long()
    sizes = bounds.diff()
    keep = sizes > 0
    sizes = sizes[keep]
    w = values.double() * (d[(index % n_in).long()] if d is not None else 1.0)
    seg = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    ce = torch.zeros(sizes.numel(), dtype=torch.float64).index_add_(0, seg, w * w) / energy
    return values, index.int(), sizes, ce


def make_pools(m: Matrix, d: torch.Tensor | None, mode: str, pools: str, budget: float, n_chunks: int,
               rpca_iters: int, residual_rank: int = 0, white: tuple | None = None) -> Pools:
    """Candidate pools of one matrix. ``white`` = whitener(H) switches the whitened pools to the full-H metric."""
    W = m.weight.detach().float().cpu()
    if white is not None and mode in ("slr", "rank") and pools == "whitened":
        return _white_pools(m, W, mode, budget, n_chunks, residual_rank, white)
    dd = d.float() if d is not None else None
    A = W * dd[None, :] if dd is not None else W
    energy = max(float((A.double() ** 2).sum()), 1e-300)
    empty_f, empty_i = torch.zeros(0), torch.zeros(0, dtype=torch.int32)
    on_support = False
    U, sigma, Vt = torch.zeros(m.d_out, 0), torch.zeros(0), torch.zeros(0, m.d_in)
    values, index, sizes, ce = empty_f, empty_i, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    if mode == "slr" and pools == "rpca":
        rp = rpca_pools(W, iters=rpca_iters)
        U, sigma, Vt = rp.U, rp.sigma, rp.Vt
        score = rp.values.abs() * (dd[rp.index % m.d_in] if dd is not None else 1.0)
        values, index, sizes, ce = _chunked(rp.values, rp.index, score, n_chunks, d, m.d_in, energy)
    elif mode in ("slr", "rank"):
        P, s, Qt = torch.linalg.svd(A, full_matrices=False)
        p = min(m.d_out, m.d_in) if mode == "rank" else min(m.d_out, m.d_in, int(budget * m.numel / m.lr_unit))
        U, sigma = P[:, :p].contiguous(), s[:p].contiguous()
        Vt = (Qt[:p] / dd[None, :]) if dd is not None else Qt[:p].contiguous()
        if mode == "slr":
            r0 = min(residual_rank, p)
            R = W - (U[:, :r0] * sigma[:r0]) @ Vt[:r0]
            flat = R.flatten()
            idx = torch.arange(m.numel)
            score = flat.abs() * (dd[idx % m.d_in] if dd is not None else 1.0)
            values, index, sizes, ce = _chunked(flat, idx, score, n_chunks, d, m.d_in, energy)
            values, on_support = W.flatten()[index.long()], True  # chosen on the residual, stored as W
    elif mode == "sparse":
        on_support = True
        flat = W.flatten()
        idx = torch.arange(m.numel)
        score = flat.abs() * (dd[idx % m.d_in] if dd is not None else 1.0)
        values, index, sizes, ce = _chunked(flat, idx, score, n_chunks, d, m.d_in, energy)
    else:
        raise SLRError(f"unknown pools {pools!r}", "use rpca or whitened")
    de = torch.zeros(0, dtype=torch.float64)
    if sigma.numel():
        vn = (Vt.double() * (d[None, :] if d is not None else 1.0)).norm(dim=1) ** 2
        de = sigma.double() ** 2 * vn / energy
    return Pools(U.float(), sigma.float(), Vt.float(), values.float(), index, sizes, de, ce, energy, on_support)


def _white_pools(m: Matrix, W: torch.Tensor, mode: str, budget: float, n_chunks: int, residual_rank: int,
                 white: tuple) -> Pools:
    """Whitened pools in the full metric tr(E H E^T): directions of A = W G mapped back by G^{-1} (each
    direction's energy is its σ^2); residual entries scored and weighed by the OBS saliency w^2 / [H^{-1}]_jj."""
    G, Gi, sal = white
    A = W @ G
    energy = max(float((A.double() ** 2).sum()), 1e-300)
    P, s, Qt = torch.linalg.svd(A, full_matrices=False)
    p = min(m.d_out, m.d_in) if mode == "rank" else min(m.d_out, m.d_in, int(budget * m.numel / m.lr_unit))
    U, sigma, Vt = P[:, :p].contiguous(), s[:p].contiguous(), Qt[:p] @ Gi
    de = sigma.double() ** 2 / energy
    values, index = torch.zeros(0), torch.zeros(0, dtype=torch.int32)
    sizes, ce = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    if mode == "slr":
        r0 = min(residual_rank, p)
        flat = (W - (U[:, :r0] * sigma[:r0]) @ Vt[:r0]).flatten()
        idx = torch.arange(m.numel)
        w = sal.sqrt()
        values, index, sizes, ce = _chunked(flat, idx, flat.abs() * w[idx % m.d_in], n_chunks, w, m.d_in, energy)
        # all residual entries together are worth the residual's energy ||W - L_r0||_H^2 = Σ_{i>r0} σ_i^2 (as in the
        # knapsack's proxy): the raw OBS saliencies sum to less (1/[H^-1]_jj <= H_jj), which made the entries look
        # cheap next to the directions and the plans rank-heavy (mean rank 102 at g50, ppl 80.1 with admm)
        tail = float((s[r0:].double() ** 2).sum()) / energy
        ce = ce * (tail / float(ce.sum())) if float(ce.sum()) > 0 else ce
        values = W.flatten()[index.long()]  # chosen on the residual, stored as W (see Pools.build)
    return Pools(U.float(), sigma.float(), Vt.float(), values.float(), index, sizes, de, ce, energy, mode == "slr")


def plan_init(mats: list[Matrix], pools: list[Pools], plan: Plan, mode: str, beta: float) -> torch.Tensor:
    """Keep-probabilities centred on a plan: a matrix's direction i (0-based) gets sigmoid(beta log(r / (i + ½)))
    for the plan's rank r, its chunk c sigmoid(beta log(k / mid_c)) for the plan's k kept entries and the chunk's
    midpoint mid_c in score order. So the plan's candidates are above ½, the rest below, and the mean plan is it."""
    out = []
    for m, p in zip(mats, pools):
        spec = plan.get(m.block, m.name)
        r = spec.rank if mode != "sparse" else 0
        k = keep_per_row(m.d_in, spec.sparsity) * m.d_out if mode != "rank" else 0
        pos = torch.arange(p.sigma.numel(), dtype=torch.float64) + 0.5
        out.append(torch.sigmoid(beta * (math.log(max(r, 1e-30)) - pos.log())))
        mid = p.sizes.double().cumsum(0) - p.sizes.double() / 2
        out.append(torch.sigmoid(beta * (math.log(max(k, 1e-30)) - mid.clamp_min(0.5).log())))
    return torch.cat(out)


class _Loss:
    """Loss of a sampled configuration: calibration CE with the weights swapped in, or the weight-only proxy."""

    def __init__(self, model, mats, pools, calib, device, windows, batch_size):
        self.model, self.mats, self.pools = model, mats, pools
        self.ids = None if calib is None or len(calib) == 0 else calib[:windows]
        self.device, self.batch_size = device, batch_size
        self.evals = 0

    def __call__(self, dirs: list, chunks: list) -> float:
        self.evals += 1
        if self.ids is None:
            err, size = 0.0, 0
            for m, p, d, c in zip(self.mats, self.pools, dirs, chunks):
                W = m.weight.detach().float().cpu()
                E = W - p.build(m, d, c)
                err += m.numel * float((E.double() ** 2).sum() / (W.double() ** 2).sum().clamp_min(1e-300))
                size += m.numel
            return err / size
        for m, p, d, c in zip(self.mats, self.pools, dirs, chunks):
            m.weight.data.copy_(p.build(m, d, c).to(m.weight.device, m.weight.dtype))
        tot, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(self.ids), self.batch_size):
                ids = self.ids[s:s + self.batch_size].to(self.device)
                logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                tgt = ids[:, 1:]
                tot += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                               reduction="sum"))
                n += tgt.numel()
        return tot / max(n, 1)


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *,
             pools: str = "rpca", iterations: int = 3, samples: int = 4, lr: float = 0.05, baseline_window: int = 5,
             chunks: int = 100, init_temp: float = 2.0, windows: int = 8, batch_size: int = 4, rpca_iters: int = 5,
             max_samples: int | None = 8, norms: dict | None = None, residual_rank: int | None = None,
             normalize: str | None = None, fisher_samples: int | None = 4, fisher_power: float = 0.25,
             rank_floor: int | None = None, span: float = SPAN, init: str = "knapsack",
             mode: str | None = None) -> tuple[Plan, dict]:
    """CAP plan (see the module docstring). ``samples`` = masks drawn per policy-gradient iteration; ``span`` = the
    trust region (each matrix's retained fraction stays within budget ± span; 1 = off); ``init`` = "knapsack"
    (the knapsack's plan) or "density" (the greedy fill by prior density)."""
    t0 = time.perf_counter()
    check_span(span, "CAP")
    if init not in ("knapsack", "density"):
        raise SLRError(f"unknown CAP init {init!r}", "use --alloc-opt init=knapsack or init=density")
    if pools not in ("rpca", "whitened"):
        raise SLRError(f"unknown CAP pools {pools!r}", "use pools='rpca' (paper) or 'whitened'")
    mode = alloc_mode(config, mode)
    if nm_of(config) is not None:
        raise SLRError("CAP allocates unstructured sparsity and ranks", "use --allocate knapsack with --pattern N:M")
    mats = matrices(model)
    budget = resolve_budget(config, mats, mode)
    data = calib is not None and len(calib) > 0
    if normalize is None:
        normalize = "fisher" if data else "size"
    if normalize not in ("fisher", "size"):  # checked before the (expensive) pools
        raise SLRError(f"unknown CAP normalize {normalize!r}", "use normalize=fisher (needs data) or normalize=size")
    if normalize == "fisher" and not data:
        raise SLRError("normalize='fisher' needs calibration data", "use --alloc-opt normalize=size when data-free")
    full_h = pools == "whitened" and data and mode in ("slr", "rank") and norms is None
    if norms is None and not full_h:
        norms = input_sq_norms(model, calib, device, max_samples)
    K = float(int(budget * sum(m.numel for m in mats)))
    r0 = config.layer_spec().rank if residual_rank is None else int(residual_rank)
    pl: list = [None] * len(mats)
    if full_h:  # full-H whitening, streamed block by block
        for j, white in whitened_metrics(model, mats, calib, device, max_samples):
            pl[j] = make_pools(mats[j], None, mode, pools, budget, chunks, rpca_iters, r0, white)
    for j, m in enumerate(mats):
        if pl[j] is None:
            pl[j] = make_pools(m, scales(m, norms), mode, pools, budget, chunks, rpca_iters, r0)
    sens = output_grad_sq(model, calib, device, fisher_samples) if normalize == "fisher" else None
    # what one unit of a matrix's relative energy is worth: its size (scale-free) or F̄ ||A||^2 (Fisher loss units)
    weight = [loss_weight(m.numel, p.energy, None if sens is None else sens[m.key], fisher_power)
              for m, p in zip(mats, pl)]
    t_pools = time.perf_counter() - t0
    # global candidate arrays: per matrix, its directions then its chunks
    floor = (config.layer_spec().rank if rank_floor is None else int(rank_floor)) if mode == "slr" else 0
    cost, dens, owner, kind, fixed = [], [], [], [], []
    for j, (m, p) in enumerate(zip(mats, pl)):
        nd, nc = p.sigma.numel(), p.sizes.numel()
        # the rank floor: a matrix's top min(floor, p) directions are kept outright (not candidates)
        fixed += [torch.arange(nd) < floor, torch.zeros(nc, dtype=torch.bool)]
        cost += [torch.full((nd,), float(m.lr_unit), dtype=torch.float64), p.sizes.double()]
        dens += [p.dir_energy * weight[j] / m.lr_unit, p.chunk_energy * weight[j] / p.sizes.double().clamp_min(1)]
        owner += [torch.full((nd + nc,), j, dtype=torch.long)]
        kind += [torch.zeros(nd, dtype=torch.bool), torch.ones(nc, dtype=torch.bool)]
    cost, dens, owner, kind = torch.cat(cost), torch.cat(dens), torch.cat(owner), torch.cat(kind)
    fixed = torch.cat(fixed)
    if cost.numel() == 0:
        raise SLRError("CAP found no candidates", "check the model's compressed linears")
    if float(cost[fixed].sum()) > K:
        raise SLRError(f"the rank floor {floor} alone exceeds the budget {budget}",
                       "lower --rank or pass --alloc-opt rank_floor=0")
    if init == "knapsack":  # s0 from the knapsack's plan with the same pricing, trust region and floor
        kplan, kinfo = knapsack.allocate(model, config, calib, device, max_samples=max_samples, normalize=normalize,
                                         fisher_samples=fisher_samples, fisher_power=fisher_power, span=span,
                                         rank_floor=rank_floor, mode=mode)
        s = plan_init(mats, pl, kplan, mode, init_temp)
        init_info = {"rule": "knapsack plan: sigmoid(beta * log(target / position))", "beta": init_temp,
                     "knapsack_seconds": kinfo["seconds"]}
    else:  # logistic in log density around the density tau at which the densest-first candidates fill the budget
        order = (~fixed).nonzero().flatten()[torch.argsort(dens[~fixed], descending=True)]
        over = (cost[order].cumsum(0) > K - float(cost[fixed].sum())).nonzero()
        tau = float(dens[order[int(over[0])]].clamp_min(1e-300)) if over.numel() else 0.0
        s = torch.sigmoid(init_temp * (dens.clamp_min(1e-300).log() - math.log(tau))) if over.numel() else \
            torch.ones_like(cost)
        init_info = {"rule": "sigmoid(beta * log(density / tau))", "beta": init_temp, "tau": tau}
    banned = torch.zeros_like(fixed)
    if span < 1:  # trust region: per matrix, in init order keep up to (budget - span) m n, never past (budget + span)
        rank_key = s + 2.0 * fixed.double() + 1e-6 * dens / float(dens.max().clamp_min(1e-300))
        for j, m in enumerate(mats):
            idx = (owner == j).nonzero().flatten()
            o = idx[torch.argsort(rank_key[idx], descending=True)]  # floor directions first
            cum = cost[o].cumsum(0)
            fixed[o[cum <= max(budget - span, 0.0) * m.numel]] = True
            banned[o[(cum > min(budget + span, 1.0) * m.numel) & ~fixed[o]]] = True
    free = ~fixed & ~banned
    K_free = K - float(cost[fixed].sum())

    def project(y: torch.Tensor) -> torch.Tensor:
        out = fixed.double()
        out[free] = project_budget(y[free], cost[free], K_free)
        return out

    s = project(s)
    splits = [int((owner == j).sum()) for j in range(len(mats))]

    def unpack(keep: torch.Tensor):
        dirs, chs = [], []
        for part, p in zip(keep.split(splits), pl):
            nd = p.sigma.numel()
            dirs.append(part[:nd])
            chs.append(part[nd:])
        return dirs, chs

    def final_keep(s: torch.Tensor) -> torch.Tensor:
        o = torch.argsort(s * (1 + 1e-9) + 1e-12 * dens / float(dens.max().clamp_min(1e-300)), descending=True)
        o = o[free[o]]
        keep = fixed.clone()
        used = K - K_free
        for i, c in zip(o.tolist(), cost[o].tolist()):
            if used + c <= K:
                keep[i] = True
                used += c
        return keep

    originals = [m.weight.detach().clone() for m in mats] if data else None
    loss_fn = _Loss(model, mats, pl, calib if data else None, device, windows, batch_size)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    trace = []
    try:
        init_loss = loss_fn(*unpack(final_keep(s)))
        history.append(init_loss)
        for it in range(iterations):
            grad = torch.zeros_like(s)
            losses = []
            for _ in range(samples):
                mask = torch.rand(s.shape, generator=gen, dtype=torch.float64) < s
                loss = loss_fn(*unpack(mask))
                b = sum(history[-baseline_window:]) / len(history[-baseline_window:])
                sc = s.clamp(0.01, 0.99)
                grad += (loss - b) * (mask.double() - s) / (sc * (1 - sc))
                history.append(loss)
                losses.append(loss)
            s = project(s - lr * grad / samples)
            trace.append({"iteration": it, "losses": losses, "mean_loss": sum(losses) / len(losses),
                          "expected_params": float((s * cost).sum())})
        keep = final_keep(s)
        final_loss = loss_fn(*unpack(keep))
    finally:
        if originals is not None:
            for m, w in zip(mats, originals):
                m.weight.data.copy_(w)
    choices = []
    for j, (m, p) in enumerate(zip(mats, pl)):
        k = keep[owner == j]
        kd, kc = k[~kind[owner == j]], k[kind[owner == j]]
        rank = int(kd.sum())
        entries = int(p.sizes[kc].sum()) if kc.numel() else 0
        k_row = None if mode == "rank" else min(m.d_in, int(round(entries / m.d_out)))
        if rank == 0 and not k_row:  # never drop a whole matrix: keep one row-unit (or rank 1)
            rank, k_row = (1, k_row) if mode == "rank" else (0, 1)
        choices.append(Choice(k_row, rank))
    nm = None
    choices = fit_budget(mats, choices, int(K), mode, nm)
    extra = {"pools": pools if mode == "slr" else ("whitened" if mode == "rank" else "weights"),
             "metric": "full H" if full_h else ("diag H" if norms is not None else "weights"),
             **({"residual_rank": r0} if mode == "slr" and pools == "whitened" else {}),
             "rank_floor": floor, "span": span, "normalize": normalize,
             **({"fisher_windows": min(len(calib), fisher_samples or len(calib)), "fisher_power": fisher_power}
                if sens is not None else {}),
             "loss": "calibration CE" if data else "weight-only relative Frobenius (data-free)",
             "windows": min(windows, len(calib)) if data else 0, "iterations": iterations, "samples": samples,
             "lr": lr, "baseline_window": baseline_window, "chunks": chunks, "candidates": int(cost.numel()),
             "init": {"name": init, **init_info, "projected": True, "loss": init_loss},
             "final_loss": final_loss, "trace": trace, "loss_evals": loss_fn.evals, "seconds_pools": t_pools}
    return finish("cap", mats, choices, mode, nm, budget, t0, extra, base=config.layer_spec())
