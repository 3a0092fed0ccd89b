"""Evolutionary search over per-matrix levels (``--allocate search``; in the spirit of EvoPress, methods.md §8).

The space is CAP's (``cap.prepare``): per matrix a rank level and a density level around a start plan (default the
knapsack's), every plan resolved to spend the budget exactly, each matrix rebuilt from its whitened pools (top
directions, then the top-scored entries) and scored by KL(dense || compressed) of the next-token distributions.
A (1 + λ) search with multi-step selection: each generation mutates the parent ``offspring`` times (``mutations``
pairs of variables of the same kind, one a level up and the other a level down, so the budget moves little before the
common shift makes it exact), screens the offspring on ``screen_windows`` windows, scores the best ``survivors`` on
``windows`` windows, and replaces the parent when one beats it there. Losses are memoised per plan, so a plan is
never scored twice at the same fidelity. Under a budget in bits the levels are CAP's in bits (``bitlevels``): S's
width and the rank per matrix. With ``pools="solved"`` under --budget (``solvedlevels``) every candidate matrix is the
run's own method solved once per level, one variable per matrix (S's row count at the start plan's rank), and a
mutation moves one matrix up a level and another down by about as many entries, so an offspring is run from the
first block it changes, on the parent's recorded inputs to it (``prefix.Prefixes``). Of the parents, the one that scores
lowest on as many further calibration windows replaces the start plan if it beats it there too (``levels.select``:
validation early stopping). Seeded, so the same seed gives the same plan.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SLRError
from ..plan import Plan
from .base import SPAN
from .cap import prepare
from .levels import Fitness, fitness_info, heldout, select
from .solvedlevels import SolvedSpace

if TYPE_CHECKING:
    from ..config import CompressConfig


def mutate(x: torch.Tensor, kinds: torch.Tensor, valid, pairs: int, gen: torch.Generator) -> torch.Tensor:
    """``pairs`` times: one variable a level up and another of the same kind (``kinds`` [V]) a level down, both to
    levels that ``valid(variable, level)`` admits."""
    y = x.clone()
    for _ in range(pairs):
        for _try in range(20):
            i, j = torch.randint(0, len(y), (2,), generator=gen).tolist()
            if i != j and kinds[i] == kinds[j] and valid(i, int(y[i]) + 1) and valid(j, int(y[j]) - 1):
                y[i] += 1
                y[j] -= 1
                break
    return y


def recorded_tokens(options, calib_windows: int) -> int:
    """Tokens whose block inputs the prefix reuse may hold at once under --budget (``slr.estimate``; the reuse is off
    under --budget-bits), 0 when it is off: the full fitness keeps the parent and the last ``survivors`` plans, the
    screening the parent, the held-out fitness one plan (records of skipped blocks share their tensors, so this is an
    upper bound)."""
    o = options
    if not (getattr(o, "prefix", False) and getattr(o, "pools", None) == "solved") or calib_windows <= 0:
        return 0
    full = min(o.windows, calib_windows)
    held = min(o.windows, max(calib_windows - full, 0))
    return ((o.survivors + 1) * full + min(o.screen_windows, full) + held) * o.tokens


def allocate(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None, device="cpu", *,
             generations: int = 40, offspring: int = 16, survivors: int = 4, mutations: int = 2, levels: int = 5,
             screen_windows: int = 1, windows: int = 4, tokens: int = 128, batch_size: int = 4,
             max_samples: int | None = 8, norms: dict | None = None, normalize: str | None = None,
             fisher_samples: int | None = 4, fisher_power: float = 0.25, rank_floor: int | None = None,
             span: float = SPAN, init: str = "knapsack", start: Plan | None = None,
             mode: str | None = None, pools: str = "whitened", level_solve: str = "fast",
             level_cache: str = "", prefix: bool = True, compress=None, reach: float | None = None
             ) -> tuple[Plan, dict]:
    """Search plan (see the module docstring); ``start`` (Python only) = a plan to start from; ``pools`` = "solved"
    rebuilds S from the run's method solved at every width under --budget-bits (``bitlevels``), and scores S+LR levels
    solved by the run's method under --budget (``solvedlevels``; ``level_solve`` = "fast", "full" or "pipeline",
    ``level_cache`` = a directory that keeps the solves; ``compress``, Python only: ``pipeline.compress_``, which
    level_solve="pipeline" runs; ``reach``: how far those levels reach from the start, a fraction of d_in, default
    ``span``); ``prefix`` = on solved levels, score each offspring from the first block it changes
    (the same losses, less time; ``prefix.Prefixes``)."""
    t0 = time.perf_counter()
    if not (0 < survivors <= offspring) or screen_windows < 1 or windows < screen_windows:
        raise SLRError(f"search needs 0 < survivors <= offspring and 1 <= screen_windows <= windows (got "
                       f"survivors={survivors}, offspring={offspring}, screen_windows={screen_windows}, "
                       f"windows={windows})", "use e.g. --alloc-opt offspring=16 --alloc-opt survivors=4")
    st = prepare(model, config, calib, device, "search", pools=pools, levels=levels, span=span, init=init,
                 start=start, mode=mode, max_samples=max_samples, norms=norms, normalize=normalize,
                 fisher_samples=fisher_samples, fisher_power=fisher_power, rank_floor=rank_floor,
                 level_solve=level_solve, level_cache=level_cache, compress=compress, reach=reach)
    x, extra = evolve(model, st, calib, device, config.seed, generations=generations, offspring=offspring,
                      survivors=survivors, mutations=mutations, levels=levels, screen_windows=screen_windows,
                      windows=windows, tokens=tokens, batch_size=batch_size, prefix=prefix)
    return st.finish("search", x, t0, extra, config.layer_spec())


def evolve(model: nn.Module, st, calib: torch.Tensor | None, device, seed: int, *, generations: int, offspring: int,
           survivors: int, mutations: int, levels: int, screen_windows: int, windows: int, tokens: int,
           batch_size: int, prefix: bool = True) -> tuple[torch.Tensor, dict]:
    """The search on a prepared ``cap.Setup``: (the kept plan's levels [variables], its info)."""
    data = calib if st.data else None
    # only on solved levels does a mutation change a few matrices (the other spaces shift every matrix to the budget);
    # the parent's block inputs are kept (anchor), and the full scores' last ``survivors``: a new parent is one of them
    prefix = prefix and isinstance(st.space, SolvedSpace)
    screen = Fitness(model, st.space, data, device, screen_windows, tokens, batch_size, prefix=0 if prefix else None)
    full = Fitness(model, st.space, data, device, windows, tokens, batch_size, prefix=survivors if prefix else None)
    held = heldout(full, data, windows)
    n = len(st.mats)
    kinds = torch.arange(st.space.variables) // n  # S+LR: ranks then densities; otherwise one kind
    if isinstance(st.space, SolvedSpace):  # one variable per matrix, moves that keep the plan's size
        step = st.space.mutate
    else:
        def step(x, pairs, gen):
            return mutate(x, kinds, lambda _j, lv: 0 <= lv < levels, pairs, gen)
    gen = torch.Generator().manual_seed(seed)
    t1 = time.perf_counter()
    trace, path = [], []  # path: each new parent
    with st.swapping():
        start = parent = st.space.centre()
        best = full(parent)
        for f in (full, screen):
            f.anchor(parent)
        bar = tqdm(range(generations), desc="search", unit="gen", disable=None)  # None: only on a terminal
        for g in bar:
            kids = [step(parent, mutations, gen) for _ in range(offspring)]
            kids.sort(key=screen)
            scored = [(full(k), i) for i, k in enumerate(kids[:survivors])]
            loss, i = min(scored)
            if loss < best:
                parent, best = kids[i], loss
                path.append(parent)
                for f in (full, screen):
                    f.anchor(parent)
            trace.append({"generation": g, "best_loss": best, "survivor_losses": [s for s, _ in scored]})
            bar.set_postfix(loss=f"{best:.4f}")
        kept, take, losses = select(full, held, start, path)
    extra = {**fitness_info(calib, windows, tokens, st.space.candidate),
             "screen_windows": screen_windows if st.data else 0, "generations": generations, "offspring": offspring,
             "survivors": survivors, "mutations": mutations,
             **losses, "kept": "search" if take else "start", "trace": trace,
             "loss_evals": {"screen": screen.evals, "full": full.evals}, "seconds_search": time.perf_counter() - t1}
    if prefix and full.prefixes is not None:  # blocks run / skipped by the prefix reuse, over every forward
        fs = [f.prefixes for f in (screen, full, held) if f is not None]
        extra["prefix_blocks"] = {"run": sum(p.run for p in fs), "skipped": sum(p.skipped for p in fs)}
    return kept, extra
