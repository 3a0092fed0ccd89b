"""Knapsack allocation (ours): per-matrix loss-vs-cost curves from cheap proxies, one global multiple-choice knapsack.

Proxy (approximate, documented). Each matrix is scored in its layer metric ||E||_H^2 = tr(E H E^T):
  metric="whitened" (default with calibration data): H = X^T X / n of the *dense* model on ``max_samples`` windows
      (8), streamed block by block (one block's Hessians alive at a time). A = W G (G G^T = H, Cholesky); its
      rank-r truncation gives the metric-optimal L_r = A_r G^{-1}, so ||W - L_r||_H^2 = Σ_{i>r} σ_i(A)^2 exactly
      (what the whitened lowrank step and ADMM's L step reach); a residual entry e_ij is weighed by the OBS
      saliency e_ij^2 / [H^-1]_jj (its cost when the rest of the row compensates, as SparseGPT does).
  metric="diag": only d_j = sqrt(mean x_j^2) (Wanda / OATS scaling): A = W diag(d), entries weighed by d_j^2. This
      ignores the cross-channel correlations of H and undervalues low rank. The proxy scores each matrix alone, so
      what it misses is how errors add up through the blocks (BENCHMARKS.md, "Global allocation").
  Without calibration data both use the plain weights (d = 1). For a candidate (k kept values per row, rank r):

  loss(r, k) = ||W - L_r||_H^2 * (1 - captured_r(k))

where captured_r(k) is the fraction of the residual's saliency mass held by its k * d_out most salient entries.
That is "low rank first, then keep the most salient residual entries": an upper bound on what the joint S+LR solvers
reach, but it orders matrices sensibly. captured_r is estimated on a fixed random sample of ``samples`` entries per
matrix (exact when the matrix is smaller): the residual at the sampled entries for every grid rank comes from one
cumulative sum over the singular triplets, so each matrix costs one SVD plus O(samples * r_max) (plus one Cholesky per
input group for the whitened metric). Pure pruning uses r = 0 only; rank-only methods use loss = Σ_{i>r} σ_i^2 for
every r; with an N:M pattern the sparse part is fixed and the dropped saliency is computed exactly for each grid rank.
``span`` (default 0.1, ``base.check_span``; span=1 turns it off): a trust region that keeps every matrix's retained
fraction within budget ± span (the uniform choice always stays available).

Normalisation across matrices (``normalize``): how a matrix's relative error ||A - Â||^2 / ||A||^2 is priced
against the others' (``base.loss_weight``).
  "fisher" (default with calibration data, ours): weight m n (F̄ ||A||^2 / m n)^fisher_power, where F̄ is the
      linear's mean squared per-token loss gradient at its output on ``fisher_samples`` windows (4; one forward and
      backward of the dense model, activation gradients only), the output factor of the diagonal Fisher / K-FAC
      curvature. At power 1 the loss is the Fisher estimate ½ F̄ ||ΔW||_H^2 of the loss increase; the default power
      0.25 tempers F̄'s dynamic range (about seven decades over SmolLM2's blocks; BENCHMARKS.md, "Tuning notes").
  "size" (the default without data) = relative error times m n: equal relative errors cost the same per parameter
      everywhere, so identically shaped curves give the uniform plan; "relative" = plain sum of relative errors
      (favours keeping small matrices dense); "absolute" = metric energies ||ΔW||_H^2 (dominated by high-activation
      layers).
Rank floor (``rank_floor``, S+LR only; default the run's --rank, 0 with N:M where the ranks are all that moves):
every matrix keeps at least this rank, since the proxy ("low rank first, then sparse", no joint fit) undervalues
low rank against what ADMM-type solvers get from it. ``rank_floor=0`` frees it.

Solver. Choose one candidate (cost c = d_out * k + r (d_out + d_in), loss l) per matrix to minimise Σ l subject to
Σ c <= budget * Σ m n. Lagrangian relaxation: for a multiplier λ every matrix independently picks argmin l + λ c,
which equalises the marginal loss per parameter across matrices (the optimum of the problem convexified to each
curve's lower hull); the chosen cost falls as λ grows, so bisection on log λ finds the smallest λ whose plan fits.
The leftover (at most about one hull step per matrix) is then spent greedily on the upgrade with the largest loss
decrease per extra parameter, and ``fit_budget`` settles row rounding. Cost: one SVD per matrix, one Cholesky per input
group and a dense forward pass over ``max_samples`` calibration windows (timed in BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import input_sq_norms
from ..errors import SLRError
from ..plan import Plan
from ..solvers.masks import nm_mask
from ..spec import keep_per_row
from . import bits, uniform
from .base import (
    SPAN,
    Choice,
    Matrix,
    alloc_mode,
    check_span,
    choice_params,
    finish,
    fit_budget,
    loss_weight,
    matrices,
    nm_of,
    output_grad_sq,
    resolve_budget,
    resolve_normalize,
    scales,
    whitened_metrics,
)
from .mckp import rank_grid, solve_knapsack

if TYPE_CHECKING:
    from ..config import CompressConfig


def keep_grid(d_in: int, points: int, extra: int | None = None) -> list[int]:
    ks = {int(round(i * d_in / (points - 1))) for i in range(points)} if d_in >= points else set(range(d_in + 1))
    if extra is not None:
        ks.add(extra)
    return sorted(ks)


@dataclass
class Metric:
    """The layer metric of one matrix, ||E||_M^2 = tr(E H E^T), in the pieces the proxy needs.

    A = W G with G G^T = H (so a rank-r truncation of A is the metric-optimal rank-r L = A_r G^{-1}); ``back`` =
    G^{-1} [d_in, d_in] (or a [d_in] diagonal); ``saliency`` [d_in] = per-column weight of a single entry's loss:
    1 / [H^{-1}]_jj (the OBS cost of zeroing one weight with the rest of its row compensating) or d_j^2 (diag).
    """

    A: torch.Tensor  # [d_out, d_in]
    back: torch.Tensor | None  # [d_in, d_in] or [d_in]; None = identity
    saliency: torch.Tensor | None  # [d_in]; None = 1

    @classmethod
    def diag(cls, W: torch.Tensor, d: torch.Tensor | None) -> Metric:
        if d is None:
            return cls(W, None, None)
        d = d.float()
        return cls(W * d[None, :], 1.0 / d, d * d)

    @classmethod
    def whitened(cls, W: torch.Tensor, white: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Metric:
        G, Gi, sal = white
        return cls(W @ G, Gi, sal)

    def to_w(self, Qt: torch.Tensor) -> torch.Tensor:
        """Right singular vectors of A [r, d_in] mapped to W's coordinates (Qt G^{-1})."""
        if self.back is None:
            return Qt
        return Qt * self.back[None, :] if self.back.dim() == 1 else Qt @ self.back


def matrix_curve(m: Matrix, metric: Metric, mode: str, nm: tuple[int, int] | None, *, uni: Choice,
                 samples: int = 16384, points: int = 101, normalize: str = "size",
                 seed: int = 0, sensitivity: float | None = None,
                 power: float = 1.0, rank_floor: int = 0) -> tuple[list[Choice], torch.Tensor, torch.Tensor]:
    """Candidates (choices, costs [C] float64, proxy losses [C] float64) of one matrix."""
    W = m.weight.detach().float().cpu()
    A = metric.A
    energy = float((A.double() ** 2).sum())
    sal = metric.saliency
    choices: list[Choice] = []
    losses: list[float] = []
    if mode == "sparse":
        ranks = [0]
    elif mode == "rank":
        ranks = list(range(1, min(m.d_out, m.d_in, m.numel // m.lr_unit) + 1))
        if uni.rank and uni.rank not in ranks:
            ranks.append(uni.rank)
    else:
        lo = min(rank_floor, m.d_out, m.d_in)
        ranks = sorted({r for r in rank_grid(m, uni.rank) if r >= lo} | {lo})
    if mode == "rank":
        s2 = torch.linalg.svdvals(A).double() ** 2
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])  # tail[r] = Σ_{i>=r} σ_i^2
        for r in ranks:
            choices.append(Choice(None, r))
            losses.append(float(tail[min(r, len(s2))]))
    else:
        rg = max(ranks)
        if rg > 0:
            P, s, Qt = torch.linalg.svd(A, full_matrices=False)
            s2 = s.double() ** 2
            tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
            Vw = metric.to_w(Qt[:rg])  # [rg, d_in]: the directions in W's coordinates
        else:
            tail = torch.tensor([energy], dtype=torch.float64)
        if nm is not None:
            for r in ranks:
                R = W - (P[:, :r] * s[:r]) @ Vw[:r] if r else W
                e2 = R.double() ** 2 * (sal.double()[None, :] if sal is not None else 1.0)
                keep = nm_mask(e2, *nm)
                tot = float(e2.sum())
                dropped = float(e2[~keep].sum()) / tot if tot > 0 else 0.0
                choices.append(Choice(None, r))
                losses.append(float(tail[min(r, len(tail) - 1)]) * dropped)
        else:
            g = torch.Generator().manual_seed(seed)
            n_all = m.numel
            idx = torch.arange(n_all) if n_all <= samples else torch.randperm(n_all, generator=g)[:samples]
            rows, cols = idx // m.d_in, idx % m.d_in
            w = W.flatten()[idx]  # [ns]
            cw = sal.double()[cols] if sal is not None else None
            cum = None
            if rg > 0:
                cum = ((P[rows, :rg] * s[:rg]) * Vw[:, cols].T).cumsum(1)  # [ns, rg]: L_r at the samples
            ks = keep_grid(m.d_in, points, uni.k_row)
            ns = idx.numel()
            kpos = torch.tensor([min(ns, int(round(k / m.d_in * ns))) for k in ks])
            for r in ranks:
                R = w - cum[:, r - 1] if r else w
                e2 = R.double() ** 2
                e2 = (e2 * cw if cw is not None else e2).sort(descending=True).values
                cs = torch.cat([e2.new_zeros(1), e2.cumsum(0)])
                tot = float(cs[-1])
                captured = cs[kpos] / tot if tot > 0 else torch.ones(len(ks), dtype=torch.float64)
                t = float(tail[min(r, len(tail) - 1)])
                for k, c in zip(ks, captured.tolist()):
                    if k == 0 and r == 0:
                        continue
                    choices.append(Choice(k, r))
                    losses.append(t * max(0.0, 1.0 - c))
    costs = torch.tensor([float(choice_params(m, c, mode, nm)) for c in choices], dtype=torch.float64)
    loss = torch.tensor(losses, dtype=torch.float64)
    if normalize == "size":
        loss = loss / max(energy, 1e-300) * m.numel
    elif normalize == "relative":
        loss = loss / max(energy, 1e-300)
    elif normalize == "fisher":
        if sensitivity is None:
            raise SLRError(f"no loss sensitivity for {m.key}", "normalize='fisher' needs calibration data")
        loss = loss / max(energy, 1e-300) * loss_weight(m.numel, energy, sensitivity, power)
    elif normalize != "absolute":
        raise SLRError(f"unknown normalize={normalize!r}", "use 'fisher', 'size', 'relative' or 'absolute'")
    keep = costs <= m.numel  # never pay more than the dense matrix
    keep_idx = keep.nonzero().flatten().tolist()
    return [choices[i] for i in keep_idx], costs[keep], loss[keep]


def check_opts(options) -> None:
    """Values of the knapsack's metric and span options (their types are checked by slr.options)."""
    if options.metric not in ("whitened", "diag"):
        raise SLRError(f"unknown knapsack metric {options.metric!r}", "use --alloc-opt metric=whitened or metric=diag")
    check_span(options.span, "knapsack")


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *,
             max_samples: int | None = 8, samples: int = 16384, points: int = 101, normalize: str | None = None,
             metric: str = "whitened", span: float = SPAN, norms: dict | None = None,
             fisher_samples: int | None = 4, fisher_power: float = 0.25, rank_floor: int | None = None,
             mode: str | None = None, visit: Callable[[int, tuple], None] | None = None, proxy: str = "rtn",
             solved: dict | None = None) -> tuple[Plan, dict]:
    """Knapsack plan (see the module docstring).

    ``metric``: "whitened" (full dense-model H per input group, streamed block by block) or "diag" (mean x^2 only);
    both fall back to the plain weights without calibration data. ``span``: every matrix keeps a retained
    fraction within budget ± span (a trust region around the uniform plan, like OWL's λ; 1 = off). ``norms``
    (key -> mean x^2 [d_in]) may be passed to skip the calibration forward pass of the diag metric. With
    config.alloc.budget_bits the plan is ``bits.allocate``'s (S's bit width and the rank per matrix). ``visit``
    (Python only) is called with (matrix index, whitener) for every matrix of the whitened metric, so a caller (CAP)
    can build what it needs from the same pass. ``proxy`` ("rtn" or "solved") and ``solved`` (Python only) apply
    under a budget in bits only (``bits.allocate``).
    """
    if config.alloc.budget_bits is not None:  # a budget in bits: S's width (and the rank) per matrix
        return bits.allocate(model, config, calib, device, max_samples=max_samples, normalize=normalize, metric=metric,
                             norms=norms, fisher_samples=fisher_samples, fisher_power=fisher_power,
                             rank_floor=rank_floor, mode=mode, proxy=proxy, solved=solved)
    if proxy != "rtn":
        raise SLRError(f"knapsack proxy={proxy} sizes bit widths and needs --budget-bits", "drop --alloc-opt proxy")
    t0 = time.perf_counter()
    mode = alloc_mode(config, mode)
    nm = nm_of(config)
    if metric not in ("whitened", "diag"):
        raise SLRError(f"unknown knapsack metric {metric!r}", "use --alloc-opt metric=whitened or metric=diag")
    check_span(span, "knapsack")
    if mode == "sparse" and nm is not None:
        raise SLRError("pure N:M pruning has a fixed budget: there is nothing to allocate",
                       "drop --allocate, or add a rank (S+LR method)")
    mats = matrices(model)
    budget = resolve_budget(config, mats, mode)
    data = calib is not None and len(calib) > 0
    normalize = resolve_normalize(normalize, data)  # checked before any heavy work
    whitened = metric == "whitened" and data and norms is None
    if not whitened and norms is None:
        norms = input_sq_norms(model, calib, device, max_samples)
    sens = output_grad_sq(model, calib, device, fisher_samples) if normalize == "fisher" else None
    # the floor only applies where the sparse part is free too (with N:M the ranks are all there is to move)
    floor = (config.layer_spec().rank if nm is None else 0) if rank_floor is None else int(rank_floor)
    t1 = time.perf_counter()
    # the uniform plan at the same budget is put on every grid, so its proxy loss can be reported for comparison
    uplan, _ = uniform.allocate(model, config, calib, device, mode=mode)
    unis = []
    for m in mats:
        us = uplan.get(m.block, m.name)
        unis.append(Choice(None if (mode == "rank" or nm is not None) else keep_per_row(m.d_in, us.sparsity), us.rank))
    n = len(mats)
    cands: list = [None] * n
    costs: list = [None] * n
    losses: list = [None] * n

    def curve(j: int, met: Metric) -> None:
        ch, c, lo = matrix_curve(mats[j], met, mode, nm, uni=unis[j], samples=samples, points=points,
                                 normalize=normalize, seed=config.seed + j,
                                 sensitivity=None if sens is None else sens[mats[j].key], power=fisher_power,
                                 rank_floor=floor)
        if span < 1:  # trust region; the uniform choice always stays available
            frac = c / mats[j].numel
            ok = ((frac - budget).abs() <= span) | torch.tensor(
                [x.k_row == unis[j].k_row and x.rank == unis[j].rank for x in ch], dtype=torch.bool)
            idx = ok.nonzero().flatten().tolist()
            ch, c, lo = [ch[i] for i in idx], c[ok], lo[ok]
        cands[j], costs[j], losses[j] = ch, c, lo

    if whitened:
        for j, white in whitened_metrics(model, mats, calib, device, max_samples):
            curve(j, Metric.whitened(mats[j].weight.detach().float().cpu(), white))
            if visit is not None:
                visit(j, white)
    for j, m in enumerate(mats):
        if cands[j] is None:
            curve(j, Metric.diag(m.weight.detach().float().cpu(), scales(m, norms)))
    t2 = time.perf_counter()
    total = sum(m.numel for m in mats)
    target = int(budget * total)
    sel, lam = solve_knapsack(costs, losses, float(target))
    choices = [cands[i][k] for i, k in enumerate(sel)]
    proxy = sum(float(losses[i][k]) for i, k in enumerate(sel))
    choices = fit_budget(mats, choices, target, mode, nm)
    uniform_proxy = 0.0
    for uni, ch, lo in zip(unis, cands, losses):
        hit = [i for i, c in enumerate(ch) if c.k_row == uni.k_row and c.rank == uni.rank]
        uniform_proxy = uniform_proxy + float(lo[hit[0]]) if hit and uniform_proxy is not None else None
    used = "whitened" if whitened else ("diag" if norms is not None else "weights")
    fisher = {"fisher_windows": min(len(calib), fisher_samples or len(calib)), "fisher_power": fisher_power} \
        if sens is not None else {}
    extra = {"proxy": f"{used}-metric low-rank-then-sparse energy", "metric": used, "span": span,
             **({"rank_floor": floor} if mode == "slr" else {}),
             "normalize": normalize, **fisher, "data_free": not data,
             "calib_windows": min(len(calib), max_samples or len(calib)) if data else 0, "lambda": lam,
             "proxy_loss": proxy, "uniform_proxy_loss": uniform_proxy, "candidates": sum(len(c) for c in cands),
             "seconds_stats": t1 - t0, "seconds_curves": t2 - t1, "seconds_solve": time.perf_counter() - t2}
    return finish("knapsack", mats, choices, mode, nm, budget, t0, extra, base=config.layer_spec())
