"""Budgets in bits (``AllocConfig.budget_bits``): each matrix's bit width of S, and its rank, under one average of bits
per weight over the compressed linears.

Cost. A candidate of a matrix costs what ``slr.formats.theoretical_bytes`` counts for its spec, x 8 (``spec_bits``):
S's b-bit codes on the config's support (dense with sparsity 0: no index; else the kept values and their N:M index or
bitmask / CSR), one fp16 scale per group of group_size inputs (and b-bit zero points when asymmetric), and
r (m + n) factor values, fp16 (RunOptions' default factor dtype) or --factor-bits codes with their scales. A plan
must fit budget_bits x Σ m n bits.

Candidates. b in ``BIT_WIDTHS`` with the config's group size and symmetry; r = 0 only when the run has no low-rank
part (config.rank 0), else knapsack's rank grid (``mckp.rank_grid``) plus config.rank, from ``rank_floor`` up
(default 0). The sparse support is the config's (sparsity or N:M pattern): only b and r move.

Proxy (approximate). In the layer metric ||E||_H^2 = ||E G||_F^2, G G^T = H (``base.whitener`` of the dense model's
input second moment on ``max_samples`` calibration windows; metric="diag": G = diag(d), d = sqrt(mean x^2); without
data G = I), for every width b:
  support: the config's, kept by the largest |W_ij| d_j with d_j = sqrt(H_jj) (the whole of W when S is dense);
  E_b = W - rtn_b(W)   (round to nearest on the support, zero off it, so for a sparse support E_b holds the dropped
                        entries too: the low-rank part fits them as an S+LR solver's L does);
  A_b = E_b G,  tail_b(r) = Σ_{i>r} σ_i(A_b)^2  (what the metric-optimal rank-r L fitted to W - S leaves).
The loss of (b, r) is tail_b(r) / ||W G||^2 x ``base.loss_weight`` (m n (F̄ ||W G||^2 / m n)^fisher_power with the
Fisher sensitivity F̄ of ``base.output_grad_sq`` when there is data, "fisher"; m n without, "size"), as knapsack
normalises its losses. Round to nearest overstates what compensating solvers (GPTQ, SparseGPT) reach, and not by
the same factor for every matrix; ``proxy="solved"`` (whitened metric only) takes E_b = W - S_b with S_b the run's
own method solved at width b on the whitener's H instead (``solve_widths``: one solve per width and matrix, kept as
codes so that CAP and search rebuild the same S_b). Cost: one rounding (or solve) per width and matrix, and with
ranks one singular-value decomposition per width; no pass over the data beyond knapsack's (H and the Fisher pass).

Solver: ``mckp.solve_knapsack`` on (bits, loss). The cheapest plan (every matrix at its cheapest candidate) is
checked against the budget from the shapes alone, before any pass over the data. knapsack's span (a trust region on
retained fractions), samples and points do not apply here.

Uniform (``uniform_plan``): config.bits everywhere; with a low-rank part every matrix gets the largest rank whose bits
fit budget_bits x its weights, without one the config's spec must fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import input_sq_norms
from ..errors import SLRError
from ..formats import theoretical_bytes
from ..options import as_kwargs
from ..plan import Plan
from ..quant import BITS, QuantSpec, dequantize, quantize, rtn
from ..solvers.base import method
from ..solvers.masks import select
from ..spec import LayerSpec, keep_per_row
from .base import (
    Choice,
    Matrix,
    alloc_mode,
    finish,
    loss_weight,
    matrices,
    nm_of,
    output_grad_sq,
    resolve_normalize,
    scales,
    to_spec,
    whitened_metrics,
)
from .mckp import rank_grid, solve_knapsack

if TYPE_CHECKING:
    from ..config import CompressConfig

BIT_WIDTHS = BITS  # every width S can be stored at (quant.BITS; LayerSpec admits no other)
BITS_ALLOCATORS = ("knapsack", "uniform", "cap", "search")  # the allocators that take a budget in bits


def spec_bits(spec: LayerSpec, d_out: int, d_in: int) -> int:
    """Bits of a [d_out, d_in] matrix under ``spec``: ``formats.theoretical_bytes``' total x 8 (fp16 floats)."""
    q = {} if spec.bits is None else {"S": spec.quant}
    if spec.rank and spec.factor_bits != 16:
        q |= {"U": spec.factor_quant(spec.rank), "V": spec.factor_quant(d_in)}
    nnz = 0 if spec.sparsity == 1.0 and spec.nm is None else spec.kept(d_out, d_in)
    return 8 * theoretical_bytes(d_out, d_in, nnz, spec.rank, nm=spec.nm, quant=q)["total"]


def _setup(config: CompressConfig, mode: str | None):
    mode = alloc_mode(config, mode)
    if mode == "rank":
        raise SLRError("a rank-only run has no quantized S for --budget-bits to size", "use --budget instead")
    return mode, nm_of(config), config.layer_spec()


def _k_row(m: Matrix, base: LayerSpec, nm) -> int | None:
    return None if nm is not None else keep_per_row(m.d_in, base.sparsity)


def _cost(m: Matrix, c: Choice, mode: str, nm, base: LayerSpec) -> int:
    spec = to_spec(m, c, mode, nm, base)
    spec.validate(m.d_out, m.d_in)
    return spec_bits(spec, m.d_out, m.d_in)


def _too_small(budget_bits: float, cheapest_bits: float, total: int, what: str) -> SLRError:
    low = math.ceil(cheapest_bits / total * 1000) / 1000
    return SLRError(f"--budget-bits {budget_bits:g} is below the smallest reachable {low:.3f} bits per weight ({what})",
                    f"pass --budget-bits {low:.3f} or more")


def uniform_ranks(mats: list[Matrix], mode: str, nm, base: LayerSpec, budget_bits: float) -> list[Choice]:
    """config.bits everywhere; with a low-rank part (base.rank > 0) each matrix's largest rank whose bits fit
    budget_bits x its weights (rank 0 where none does). SLRError when rank 0 everywhere exceeds the budget."""
    total = sum(m.numel for m in mats)
    choices = [Choice(_k_row(m, base, nm), 0, base.bits) for m in mats]
    floor = sum(_cost(m, c, mode, nm, base) for m, c in zip(mats, choices))
    if floor > budget_bits * total:
        raise _too_small(budget_bits, floor, total, f"every matrix at --bits {base.bits}, rank 0")
    if mode == "slr" and base.rank > 0:
        for m, c in zip(mats, choices):
            lo, hi = 0, min(m.d_out, m.d_in)  # the largest r with cost(r) <= budget_bits x m n (cost grows with r)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _cost(m, Choice(c.k_row, mid, c.bits), mode, nm, base) <= budget_bits * m.numel:
                    lo = mid
                else:
                    hi = mid - 1
            c.rank = lo
    return choices


def info(mats, choices, mode, nm, base, budget_bits: float) -> dict:
    """The bits entries of an allocator's info: budget, achieved bits per weight, weights per width."""
    total = sum(m.numel for m in mats)
    costs = [_cost(m, c, mode, nm, base) for m, c in zip(mats, choices)]
    at: dict[int, int] = {}
    for m, c in zip(mats, choices):
        at[c.bits] = at.get(c.bits, 0) + m.numel
    return {"budget_bits": budget_bits, "achieved_bpw": sum(costs) / total, "bits_total": sum(costs),
            "weights_at_bits": {str(b): n / total for b, n in sorted(at.items())}}


def uniform_plan(model: nn.Module, config: CompressConfig, mode: str | None = None) -> tuple[Plan, dict]:
    """The uniform allocator under config.alloc.budget_bits (see the module docstring)."""
    t0 = time.perf_counter()
    mode, nm, base = _setup(config, mode)
    mats = matrices(model)
    choices = uniform_ranks(mats, mode, nm, base, config.alloc.budget_bits)
    extra = info(mats, choices, mode, nm, base, config.alloc.budget_bits)
    return finish("uniform", mats, choices, mode, nm, None, t0, extra, base=base)


def _candidates(m: Matrix, mode: str, nm, base: LayerSpec, floor: int, extra: int) -> list[Choice]:
    ranks = [0]
    if mode == "slr" and base.rank > 0:
        lo = min(floor, m.d_out, m.d_in)
        ranks = sorted({r for r in {*rank_grid(m, base.rank), extra} if r >= lo} | {lo})
    return [Choice(_k_row(m, base, nm), r, b) for b in BIT_WIDTHS for r in ranks]


Solved = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # b -> (codes uint8 [m, n], scale, zero)


def method_solver(config: CompressConfig) -> tuple[Callable, dict]:
    """(solver fn, options) of the run's method, for S solved per width: a per-matrix method that quantizes S."""
    m = method(config.method)
    if m.group or not m.bits or m.kind == "rank":
        raise SLRError(f"S solved per width needs a per-matrix method that quantizes S, and {config.method} is not "
                       "one", "use --method gptq or prune+lr, or drop the 'solved' allocator option")
    return m.fn, as_kwargs(config.solver) if config.solver is not None else {}


def solve_widths(W: torch.Tensor, G: torch.Tensor, base: LayerSpec, solver: tuple[Callable, dict]) -> Solved:
    """S of W [m, n] solved by ``solver`` at every width of ``BIT_WIDTHS`` (rank 0, the run's support, group size and
    symmetry) on H = G G^T, the whitener's damped H (the solver's own damping comes on top), kept as codes."""
    fn, opts = solver
    H = (G.double() @ G.double().T).float()  # [n, n]
    out = {}
    for b in BIT_WIDTHS:
        spec = replace(base, bits=b, rank=0, factor_bits=16)
        res = fn(W.float(), H, spec, **opts)
        scale, zero = res.qparams["S"]
        out[b] = (quantize(res.S, scale, zero, spec.quant), scale, zero)
    return out


def s_at(W: torch.Tensor, mask: torch.Tensor | None, base: LayerSpec, b: int, solved: Solved | None) -> torch.Tensor:
    """S [m, n] at width b: the solved codes when given (zero codes off the solver's support give 0), else W rounded
    to nearest on ``mask``."""
    q = QuantSpec(b, base.group_size, base.sym)
    if solved is not None:
        return dequantize(*solved[b], q)
    return rtn(W, q, mask)[0]


def bit_tails(W: torch.Tensor, G: torch.Tensor | None, d: torch.Tensor | None, base: LayerSpec,
              max_rank: int, solved: Solved | None = None) -> tuple[dict[int, torch.Tensor], float]:
    """({b: tail_b [max_rank + 1] float64}, ||W G||^2) of one matrix: tail_b[r] = Σ_{i>r} σ_i((W - S_b) G)^2 with
    S_b = rtn_b(W), or the ``solved`` S_b.

    ``G`` [d_in, d_in] (whitened) or ``d`` [d_in] (diagonal) or neither (plain weights); the support is the config's,
    kept by the largest |W_ij| sqrt(H_jj)."""
    W = W.float()

    def metric(E: torch.Tensor) -> torch.Tensor:
        if G is not None:
            return E @ G
        return E * d.float()[None, :] if d is not None else E

    col = (G.double() ** 2).sum(1).sqrt() if G is not None else d  # sqrt(diag H)
    dense = base.nm is None and keep_per_row(W.shape[1], base.sparsity) == W.shape[1]
    mask = None
    if not dense:
        score = W.abs().double() * (col[None, :].double() if col is not None else 1.0)
        mask = select(score, base)
    energy = float((metric(W).double() ** 2).sum())
    tails = {}
    for b in BIT_WIDTHS:
        A = metric(W - s_at(W, mask, base, b, solved))
        if max_rank > 0:
            s2 = torch.linalg.svdvals(A).double() ** 2
            tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])[: max_rank + 1]
        else:
            tail = (A.double() ** 2).sum().reshape(1)
        tails[b] = tail
    return tails, energy


def normalized(loss: torch.Tensor, energy: float, numel: int, normalize: str, sens: float | None,
               power: float) -> torch.Tensor:
    """Proxy energies priced across matrices as knapsack prices them (``base.loss_weight``)."""
    if normalize == "absolute":
        return loss
    rel = loss / max(energy, 1e-300)
    if normalize == "relative":
        return rel
    if normalize == "size":
        return rel * numel
    return rel * loss_weight(numel, energy, sens, power)


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *,
             max_samples: int | None = 8, normalize: str | None = None, metric: str = "whitened",
             norms: dict | None = None, fisher_samples: int | None = 4, fisher_power: float = 0.25,
             rank_floor: int | None = None, mode: str | None = None, proxy: str = "rtn",
             solved: dict[int, Solved] | None = None) -> tuple[Plan, dict]:
    """The knapsack allocator under config.alloc.budget_bits (see the module docstring); the options are knapsack's.
    ``proxy``: "rtn" or "solved"; ``solved`` (Python only): a dict that receives each matrix's solved S_b (by index
    into ``matrices(model)``), so that CAP's and search's pools reuse them."""
    t0 = time.perf_counter()
    mode, nm, base = _setup(config, mode)
    budget_bits = config.alloc.budget_bits
    mats = matrices(model)
    total = sum(m.numel for m in mats)
    data = calib is not None and len(calib) > 0
    normalize = resolve_normalize(normalize, data)
    floor = 0 if rank_floor is None else int(rank_floor)
    try:  # the uniform plan at the same budget, for comparison (its ranks join the grids)
        unis = uniform_ranks(mats, mode, nm, base, budget_bits)
    except SLRError:
        unis = None
    cands = [_candidates(m, mode, nm, base, floor, unis[j].rank if unis else 0) for j, m in enumerate(mats)]
    costs = [torch.tensor([float(_cost(m, c, mode, nm, base)) for c in cs], dtype=torch.float64)
             for m, cs in zip(mats, cands)]
    cheapest = sum(float(c.min()) for c in costs)
    if cheapest > budget_bits * total:  # from the shapes alone, before any pass over the data
        what = "every matrix at 2 bits" + (f", rank {floor}" if mode == "slr" and base.rank > 0 else ", rank 0")
        raise _too_small(budget_bits, cheapest, total, what)
    whitened = metric == "whitened" and data and norms is None
    if proxy not in ("rtn", "solved"):
        raise SLRError(f"unknown knapsack proxy {proxy!r}", "use --alloc-opt proxy=rtn or proxy=solved")
    if proxy == "solved" and not whitened:
        raise SLRError("proxy=solved solves S on each matrix's H and needs calibration data and metric=whitened",
                       "drop --alloc-opt proxy=solved")
    solver = method_solver(config) if proxy == "solved" else None
    if not whitened and norms is None:
        norms = input_sq_norms(model, calib, device, max_samples)
    sens = output_grad_sq(model, calib, device, fisher_samples) if normalize == "fisher" else None
    t1 = time.perf_counter()
    losses: list = [None] * len(mats)

    def curve(j: int, G: torch.Tensor | None, d: torch.Tensor | None) -> None:
        m = mats[j]
        W = m.weight.detach().float().cpu()
        sj = solve_widths(W, G, base, solver) if solver is not None else None
        if solved is not None and sj is not None:
            solved[j] = sj
        tails, energy = bit_tails(W, G, d, base, max(c.rank for c in cands[j]), sj)
        raw = torch.tensor([float(tails[c.bits][c.rank]) for c in cands[j]], dtype=torch.float64)
        losses[j] = normalized(raw, energy, m.numel, normalize, None if sens is None else sens[m.key], fisher_power)

    if whitened:
        for j, white in whitened_metrics(model, mats, calib, device, max_samples):
            curve(j, white[0], None)
    for j, m in enumerate(mats):
        if losses[j] is None:
            curve(j, None, scales(m, norms))
    t2 = time.perf_counter()
    sel, lam = solve_knapsack(costs, losses, float(budget_bits * total))
    choices = [cands[i][k] for i, k in enumerate(sel)]
    proxy = sum(float(losses[i][k]) for i, k in enumerate(sel))
    uniform_proxy = 0.0 if unis is not None else None  # None: the uniform plan does not fit, or is off the grids
    for u, ch, lo in zip(unis or [], cands, losses):
        hit = [i for i, c in enumerate(ch) if c.bits == u.bits and c.rank == u.rank]
        uniform_proxy = uniform_proxy + float(lo[hit[0]]) if hit and uniform_proxy is not None else None
    used = "whitened" if whitened else ("diag" if norms is not None else "weights")
    fisher = {"fisher_windows": min(len(calib), fisher_samples or len(calib)), "fisher_power": fisher_power} \
        if sens is not None else {}
    extra = {**info(mats, choices, mode, nm, base, budget_bits), "bit_widths": list(BIT_WIDTHS),
             "proxy": f"{used}-metric {'solved' if solver else 'round-to-nearest'} error, low-rank tail",
             "metric": used, "normalize": normalize,
             **({"rank_floor": floor} if mode == "slr" else {}), **fisher, "data_free": not data,
             "calib_windows": min(len(calib), max_samples or len(calib)) if data else 0, "lambda": lam,
             "proxy_loss": proxy, "uniform_proxy_loss": uniform_proxy, "candidates": sum(len(c) for c in cands),
             "seconds_stats": t1 - t0, "seconds_curves": t2 - t1, "seconds_solve": time.perf_counter() - t2}
    return finish("knapsack", mats, choices, mode, nm, None, t0, extra, base=base)
