"""Density levels solved by the run's own method (``--alloc-opt pools=solved`` under --budget, S+LR; issue 22).

The pool rebuilds that CAP and the search score by default are a proxy for the deployed solve, and a biased one: their
error falls by about the same amount at each step of the kept fraction, while admm's returns diminish
(``benchmarks/level_fidelity.md``), so a plan that moves far from the start is scored too well. Here every candidate
matrix is the run's method itself, solved once per level on the matrix's dense H and kept on disk (bfloat16; across
runs with ``level_cache``), so a search over thousands of plans re-solves nothing and scores what it will deploy.

Levels: per matrix the start plan's rank is kept and S's row count k takes ``levels`` values k0 + (l - c) dk, c the
centre, dk = round(span / c * d_in). A plan's S entries stay in a window one step of the widest matrix wide (0.14% of
SmolLM2's budget at g70 with the defaults) whose top is the budget's (``ceiling``): the search's mutations move one
matrix a level up and another down by the whole number of its steps nearest that size, kept only inside the window,
and ``resolve`` repairs any other draw (CAP's) by stepping the furthest-out matrix back toward its start. So every
matrix of the final plan sits on a solved level; the budget's slack below the ceiling is left unspent rather than
spread as single rows, which would move matrices off their levels (each then solved afresh, and not the model that
was scored). A level past the dense matrix or below zero entries is never solved.

Nothing is held for the whole model: each level is written to disk as it is solved (under ``level_cache``, or a
temporary directory that lives as long as the space) and read back when a plan puts it into the model, and so is
each matrix's dense W that restores the model afterwards.

``level_solve="fast"`` solves admm's levels with a short schedule (``FAST``: 40 iterations, fast rho growth; how its
gains between levels follow the default's: ``benchmarks/fast_levels.md``); "full" with the run's own options. Other
methods solve with their own options either way. Both solve every matrix on its own on the dense model's H.

``level_solve="pipeline"`` solves the levels where the deployed model is solved: the compression pipeline runs the
start plan on a copy of the model (block order, each block's H from the inputs that the compressed blocks before it
produce, the run's own options), and as it reaches each matrix it solves that matrix's other levels on the same H.
The start plan's levels are then exactly its deployed solves (kept in float32; the other levels in float16), and a
plan's levels model differs from a fresh compression of that plan only in the H of the matrices after its first
change. It costs one compression pass plus (levels - 1) solves per matrix; with ``level_cache``, a second pass takes
each start level from the cache instead of solving it, so it propagates the same weights, meets the same H at every
block, and solves nothing. The levels are kept as their parts (S, mask, U, V), and the plan that the allocator
returns carries them (``SolvedSpace.attach``, ``Plan.solved``): the pipeline puts each matrix's level in as it is
instead of solving it again, so the deployed model is the levels model the fitness scored, and nothing is solved
again.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import SLRError
from ..fsutil import atomic_file
from ..options import as_kwargs
from ..plan import Plan
from ..solvers.base import SolveResult, method
from ..spec import LayerSpec
from .base import Choice, Matrix, to_spec, whitened_metrics
from .levels import draw_order

FAST = {"admm": {"max_iters": 40, "min_iters": 10, "rho_grow": (1.3, 1.5, 1.5)}}


def level_solver(config, level_solve: str) -> tuple:
    """(name, solver fn, options) that solve one level: the run's per-matrix S+LR method."""
    m = method(config.method)
    if m.kind != "slr" or m.group:
        raise SLRError(f"pools=solved under --budget solves S + L per matrix, and {config.method} is not such a method",
                       "use --method admm (or hassle, oats), or drop --alloc-opt pools=solved")
    if level_solve not in ("fast", "full", "pipeline"):
        raise SLRError(f"unknown level_solve {level_solve!r}",
                       "use --alloc-opt level_solve=fast, level_solve=full or level_solve=pipeline")
    opts = as_kwargs(config.solver) if config.solver is not None else {}
    if level_solve == "fast":
        opts = {**opts, **FAST.get(config.method, {})}
    return config.method, m.fn, opts


PARTS = ("S", "mask", "U", "V")


@dataclass
class SolvedPools:
    """One matrix's solved levels, on disk: its dense W (it restores the model after the search) and, per k, the
    solve's parts S, mask, U, V (S and the factors in the level's storage dtype)."""

    W: Path  # [m, n] float32
    weights: dict[int, Path] = field(default_factory=dict)  # kept entries per row -> the level's parts

    def result(self, k: int) -> SolveResult:
        """Level k as a float32 SolveResult (``info["reused"]``: the pipeline takes it instead of solving)."""
        return load_level(self.weights[k])

    def rebuild(self, m: Matrix, rank: int, entries: int) -> torch.Tensor:
        return self.result(int(round(entries / m.d_out))).dense()

    has_original = True  # the dense W, on disk

    def original(self) -> torch.Tensor:
        """The dense W, read from disk."""
        return torch.load(self.W, weights_only=True)


def _digest(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if isinstance(p, torch.Tensor) else repr(p).encode())
    return h.hexdigest()[:20]


def load_level(path: Path) -> SolveResult:
    """A level file's parts as a float32 SolveResult (``info["reused"]``)."""
    parts = torch.load(path, weights_only=True)
    return SolveResult(**{p: (t if p == "mask" else t.float()) if (t := parts.get(p)) is not None else None
                          for p in PARTS}, info={"reused": True})


def level_path(cache: Path, W: torch.Tensor, H: torch.Tensor, solver: tuple, spec: LayerSpec) -> Path:
    """The cache file of the level that ``solver`` (name, fn, options) solves at ``spec`` for W on H."""
    name, _, opts = solver
    return cache / f"{_digest(W, H, name, sorted(opts.items()), spec, 'parts')}.pt"


def _save(t: torch.Tensor | dict, path: Path) -> Path:
    with atomic_file(path) as tmp:
        torch.save(t, tmp)
    return path


def damped_h(white: tuple) -> torch.Tensor:
    """H = G G^T [d_in, d_in] float32 from ``base.whitener``'s G: the damped H that the levels are solved on."""
    G = white[0].double()
    return (G @ G.T).float()


def solve_levels(m: Matrix, H: torch.Tensor, ks: list[int], rank: int, base: LayerSpec, solver: tuple,
                 cache: Path, scratch: Path, known: dict[int, SolveResult] | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> SolvedPools:
    """The run's method at (rank, k kept per row) for every k of ``ks`` on H [d_in, d_in], each level's parts read
    from or written to ``cache`` with S, U, V in ``dtype`` (one file per matrix and level, named by a digest of W, H,
    the spec and the solver's options); W itself goes to ``scratch``. ``known``: levels already solved (k -> their
    SolveResult), kept in float32 as they are. Returns the files, not the tensors."""
    _, fn, opts = solver
    W = m.weight.detach().float().cpu().clone()
    pools = SolvedPools(_save(W, scratch / f"W-{m.block}-{m.name}-{_digest(W)}.pt"))
    for k in ks:
        spec = to_spec(m, Choice(k, rank), "slr", None, base)
        path = level_path(cache, W, H, solver, spec)
        if not path.exists():
            given = known is not None and k in known
            res = known[k] if given else fn(W, H.clone(), spec, **opts)
            dt = torch.float32 if given else dtype
            _save({p: (t if p == "mask" else t.to(dt)).contiguous() for p in PARTS
                   if (t := getattr(res, p)) is not None}, path)
        pools.weights[k] = path
    return pools


@dataclass
class SolvedSpace:
    """Per matrix one variable, S's row-count level around the start plan at its rank (see the module docstring)."""

    mats: list[Matrix]
    pools: list[SolvedPools]
    start: list[Choice]
    k_levels: list[list[int | None]]  # [n_mats][levels]; None: past the dense matrix or below zero
    mode: str = "slr"
    loaded: dict = field(default_factory=dict, repr=False)  # matrix index -> the level its weights hold now
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # W and uncached levels live here
    reusable: bool = False  # the levels are the pipeline's own solves (level_solve="pipeline"): a plan may reuse them
    ceiling: int | None = None  # the most S entries a plan may hold (the budget's); None: the start plan's
    candidate = "solved levels"  # what a plan's matrices are rebuilt from (not a field: no annotation)

    def attach(self, plan: Plan, base: LayerSpec) -> int:
        """With ``reusable`` levels of a float S + L run, put each planned matrix's solved level into
        ``plan.solved`` (the pipeline then takes it instead of solving; the loaders keep this space's files alive).
        Returns how many matrices got one."""
        if not self.reusable or base.bits is not None or base.factor_bits != 16:
            return 0
        for m, p, ch in zip(self.mats, self.pools, self.start):
            spec = plan.get(m.block, m.name)
            k = spec.kept(m.d_out, m.d_in) // m.d_out
            if k in p.weights and to_spec(m, Choice(k, ch.rank), "slr", None, base) == spec:  # what was solved
                plan.solved[m.key] = (spec, lambda W, H, p=p, k=k, keep=self: p.result(k))
        return len(plan.solved)

    @property
    def variables(self) -> int:
        return len(self.mats)

    def valid(self, j: int, level: int) -> bool:
        return 0 <= level < len(self.k_levels[j]) and self.k_levels[j][level] is not None

    def step(self, j: int) -> int:
        """Entries of one level step of matrix j."""
        ks, c = self.k_levels[j], len(self.k_levels[j]) // 2
        near = ks[c + 1] if ks[c + 1] is not None else (2 * ks[c] - ks[c - 1] if ks[c - 1] is not None else ks[c] + 1)
        return (near - ks[c]) * self.mats[j].d_out

    def entries(self, y: torch.Tensor) -> int:
        return sum(self.k_levels[j][int(lv)] * m.d_out for j, (m, lv) in enumerate(zip(self.mats, y)))

    @property
    def tol(self) -> int:
        """One step (entries) of the widest matrix: the least width of the window a plan's size stays in."""
        return max(self.step(j) for j in range(len(self.mats)))

    def window(self) -> tuple[int, int]:
        """(lo, hi): the S entries a plan may hold. hi = ``ceiling`` (the start plan's size when it has none or
        when the start is over it); lo = hi - ``tol``, or the start plan's size when that is lower, so the start
        plan is always inside and one level step from outside always lands inside or nearer."""
        c = self.entries(self.centre())
        hi = c if self.ceiling is None else max(self.ceiling, c)
        return min(c, hi - self.tol), hi

    def mutate(self, x: torch.Tensor, pairs: int, gen: torch.Generator) -> torch.Tensor:
        """``pairs`` times: matrix i one level up and matrix j down by the whole number of its steps nearest one of
        i's (at least one), both to solved levels, the plan's size staying inside ``window``."""
        y, (lo, hi) = x.clone(), self.window()
        for _ in range(pairs):
            for _try in range(20):
                i, j = torch.randint(0, len(y), (2,), generator=gen).tolist()
                down = max(1, round(self.step(i) / self.step(j)))
                if i == j or not (self.valid(i, int(y[i]) + 1) and self.valid(j, int(y[j]) - down)):
                    continue
                z = y.clone()
                z[i] += 1
                z[j] -= down
                if lo <= self.entries(z) <= hi:
                    y = z
                    break
        return y

    def balanced(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with every level a solved one and the plan's size inside ``window``: a matrix furthest out on
        the excess side steps back toward its start until it is; among equally far ones, in ``levels.draw_order``
        (a draw of CAP's moves ~20% of the matrices, and the repair undoes a few of them)."""
        y, c = x.clone(), len(self.k_levels[0]) // 2
        for j in range(len(y)):  # a level that was not solved (past the dense matrix) steps back toward the start
            while not self.valid(j, int(y[j])):
                y[j] += 1 if y[j] < c else -1
        lo, hi = self.window()
        if lo <= self.entries(y) <= hi:
            return y
        turn = draw_order(x)
        while not lo <= (e := self.entries(y)) <= hi:
            sign = 1 if e > hi else -1
            j = max(range(len(y)), key=lambda i: (sign * (int(y[i]) - c), -turn[i]))
            y[j] -= sign
        return y

    def resolve(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(rank, kept entries) per matrix of the balanced levels."""
        y = self.balanced(x)
        return [(ch.rank, self.k_levels[j][int(y[j])] * m.d_out)
                for j, (m, ch) in enumerate(zip(self.mats, self.start))]

    def centre(self) -> torch.Tensor:
        return torch.full((self.variables,), len(self.k_levels[0]) // 2, dtype=torch.long)

    def choices(self, x: torch.Tensor) -> list[Choice]:
        return [Choice(e // m.d_out, r) for m, (r, e) in zip(self.mats, self.resolve(x))]


def k_ladder(m: Matrix, start: Choice, span: float, levels: int) -> list[int | None]:
    """Row counts k0 + (l - c) dk of one matrix; None where the level would hold below 0 or more than W's entries."""
    c = levels // 2
    dk = max(1, int(round(span / c * m.d_in)))
    out = []
    for i in range(levels):
        k = start.k_row + (i - c) * dk
        ok = 0 <= k <= m.d_in and k * m.d_out + start.rank * m.lr_unit <= m.numel
        out.append(k if ok or i == c else None)
    return out


def _dirs(level_cache: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    """(a scratch directory that lives as long as the space, the level cache: ``level_cache`` or the scratch)."""
    if level_cache:
        try:
            Path(level_cache).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SLRError(f"cannot create the level cache {level_cache}: {e.strerror}",
                           "pass a writable directory as --alloc-opt level_cache=DIR") from None
    scratch = tempfile.TemporaryDirectory(prefix="slr-levels-")
    return scratch, Path(level_cache or scratch.name)


def solved_space(model, config, calib: torch.Tensor, device, mats: list[Matrix], start: list[Choice], span: float,
                 levels: int, max_samples: int | None, level_solve: str, level_cache: str) -> SolvedSpace:
    """Every matrix's levels around ``start``, solved on the dense model's H (``whitened_metrics``' damped H, streamed
    block by block) and kept on disk (``level_cache``, or a temporary directory), with a progress bar over the
    matrices."""
    solver = level_solver(config, level_solve)
    scratch, cache = _dirs(level_cache)
    base = config.layer_spec()
    ladders = [k_ladder(m, ch, span, levels) for m, ch in zip(mats, start)]
    pools: list = [None] * len(mats)
    bar = tqdm(total=len(mats), desc="solve levels", unit="matrix", disable=None)  # None: only on a terminal
    for j, white in whitened_metrics(model, mats, calib, device, max_samples):
        pools[j] = solve_levels(mats[j], damped_h(white), [k for k in ladders[j] if k is not None], start[j].rank,
                                base, solver, cache, Path(scratch.name))
        bar.update()
    bar.close()
    return SolvedSpace(mats, pools, start, ladders, scratch=scratch)


def pipeline_space(model, config, calib: torch.Tensor, device, mats: list[Matrix], start: list[Choice], span: float,
                   levels: int, level_cache: str, compress) -> SolvedSpace:
    """Every matrix's levels around ``start``, solved in the pipeline (``level_solve="pipeline"``, module docstring):
    ``compress`` (``pipeline.compress_``) runs the start plan on a copy of the model, and at each block the other
    levels of its matrices are solved on the H that the pipeline solved them on. The copy is dropped afterwards."""
    solver = level_solver(config, "pipeline")
    scratch, cache = _dirs(level_cache)
    base = config.layer_spec()
    ladders = [k_ladder(m, ch, span, levels) for m, ch in zip(mats, start)]
    plan = Plan()
    for m, ch in zip(mats, start):
        spec = plan.specs[m.key] = to_spec(m, ch, "slr", None, base)
        # a start level already in the cache for this W and H is taken, not solved: the pass then propagates the
        # same weights as the pass that wrote it (kept in float32), so every later block's H and levels hit too
        plan.solved[m.key] = (spec, lambda W, H, spec=spec: load_level(path) if (path := level_path(
            cache, W.cpu(), H.cpu(), solver, spec)).exists() else None)
    index = {(m.block, m.name): j for j, m in enumerate(mats)}
    pools: list = [None] * len(mats)
    bar = tqdm(total=len(mats), desc="solve levels (pipeline)", unit="matrix", disable=None)

    def on_block(i: int, Hs: dict, results: dict) -> None:
        for g, H in Hs.items():
            for n in g:
                j = index.get((i, n))
                if j is None or n not in results:
                    continue
                ch = start[j]
                pools[j] = solve_levels(mats[j], H, [k for k in ladders[j] if k is not None], ch.rank, base, solver,
                                        cache, Path(scratch.name), known={ch.k_row: results[n]},
                                        dtype=torch.float16)
                bar.update()

    work = copy.deepcopy(model)
    cfg = replace(config, refine=None, distill=None)  # the levels are the solves; TM and KD act on the final model
    compress(work, cfg, calib, plan=plan, device=device, progress=False, materialize="dense", on_block=on_block)
    del work
    bar.close()
    missing = [mats[j].key for j, p in enumerate(pools) if p is None]
    if missing:
        raise SLRError(f"the pipeline did not solve {len(missing)} of the planned matrices (first: {missing[0]})",
                       "use level_solve=full")
    return SolvedSpace(mats, pools, start, ladders, scratch=scratch, reusable=True)
