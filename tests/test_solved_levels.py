"""pools=solved under --budget (allocate/solvedlevels.py): levels solved by the run's own S+LR method."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_alloc_metric import _down_proj_problem, ids

from slr.allocate import cap, search
from slr.allocate.base import Choice, Matrix, matrices, to_spec
from slr.allocate.solvedlevels import FAST, SolvedPools, SolvedSpace, k_ladder, level_solver, solve_levels
from slr.config import AllocConfig, CompressConfig
from slr.errors import SLRError
from slr.models.tiny import tiny_model
from slr.plan import Plan
from slr.solvers import METHODS


def spd(n: int, seed: int) -> torch.Tensor:
    X = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed))
    return X.T @ X / (4 * n)


def admm_cfg(allocator: str = "search", **kw) -> CompressConfig:
    return CompressConfig(method="admm", sparsity=0.6, rank=2, alloc=AllocConfig(allocator, budget=0.5), **kw)


def test_levels_are_the_runs_own_solve_and_are_read_back_from_the_cache(tmp_path):
    """Each level is admm (the fast schedule) at the deployed spec on the given H, kept on disk in bfloat16 (nothing
    resident); a second call with the same cache solves nothing and returns the same weights; another H is a miss."""
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    m, H = Matrix(0, "mlp.up_proj", W), spd(16, 2)
    solver = level_solver(admm_cfg(), "fast")
    assert solver[2] == solver[2] | FAST["admm"]  # the run's options with the short schedule on top
    base = admm_cfg().layer_spec()
    pools = solve_levels(m, H, [4, 8], 2, base, solver, tmp_path, tmp_path)
    assert isinstance(pools.W, Path) and all(isinstance(p, Path) for p in pools.weights.values())  # on disk only
    assert torch.equal(pools.original(), W)
    for k in (4, 8):
        want = METHODS["admm"].fn(W, H.clone(), to_spec(m, Choice(k, 2), "slr", None, base), **solver[2]).dense()
        got = pools.rebuild(m, 2, k * m.d_out)
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
        assert int((got != 0).sum(1).min()) > 0
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return METHODS["admm"].fn(*a, **kw)

    again = solve_levels(m, H, [4, 8], 2, base, ("admm", counting, solver[2]), tmp_path, tmp_path)
    assert not calls and all(torch.equal(again.rebuild(m, 2, k * m.d_out), pools.rebuild(m, 2, k * m.d_out))
                             for k in (4, 8))
    solve_levels(m, spd(16, 3), [4], 2, base, ("admm", counting, solver[2]), tmp_path, tmp_path)
    assert len(calls) == 1


def _space() -> SolvedSpace:
    """Matrices of three shapes with unequal steps, levels around a start plan (no weights needed to resolve)."""
    shapes = [(12, 8)] * 3 + [(4, 8)] * 2 + [(8, 20)] * 3
    mats = [Matrix(i, "m", torch.zeros(o, n)) for i, (o, n) in enumerate(shapes)]
    start = [Choice(n // 2 if i != 5 else n - 1, 1) for i, (_, n) in enumerate(shapes)]
    ladders = [k_ladder(m, ch, 0.3, 5) for m, ch in zip(mats, start)]
    return SolvedSpace(mats, [SolvedPools(Path()) for m in mats], start, ladders)


@pytest.mark.parametrize("slack", [None, 0, 7, 100])
def test_every_draw_resolves_to_solved_levels_under_the_budgets_ceiling(slack):
    """Random draws (CAP's) and chains of mutations (search's) land on solved levels only, never above the ceiling
    (the budget's S entries; the start plan's size without one) and at most one step of the widest matrix below it
    (or below the start plan, whichever is lower); a level past the dense matrix is not on the ladder."""
    sp = _space()
    assert sp.k_levels[5][3] is None and sp.k_levels[5][2] == 19  # k0 = 19 of 20: a step up is past W
    start = sp.entries(sp.centre())
    sp.ceiling = None if slack is None else start + slack
    hi = start if slack is None else start + slack
    lo = min(start, hi - sp.tol)
    assert sp.window() == (lo, hi)

    def inside(y):
        return all(sp.valid(j, int(lv)) for j, lv in enumerate(y)) and lo <= sp.entries(y) <= hi

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert inside(sp.balanced(torch.randint(0, 5, (sp.variables,), generator=g)))
    x, moved = sp.centre(), 0
    for _ in range(30):
        y = sp.mutate(x, 2, g)
        assert inside(y)
        moved += int((y != x).any())
        x = y
    assert moved > 20 and not torch.equal(x, sp.centre())
    assert torch.equal(sp.balanced(x), x)  # a mutated plan needs no repair


def test_the_budget_repair_steps_back_matrices_regardless_of_their_order():
    """CAP's draws over budget are repaired by stepping matrices back toward the start; which of the equally far ones
    is a function of the draw, not of the matrix order (stepping the first matrices back first made CAP's plans move
    only late blocks up): over many draws the first and the second half of the matrices are stepped back about
    equally often, and the same draw always resolves the same way."""
    mats = [Matrix(i, "m", torch.zeros(8, 20)) for i in range(40)]
    start = [Choice(10, 1)] * 40  # levels of 4, 10 and 16 rows
    sp = SolvedSpace(mats, [SolvedPools(Path()) for _ in mats], start, [k_ladder(m, ch, 0.3, 3) for m, ch in
                                                                         zip(mats, start)])
    g, first, total = torch.Generator().manual_seed(0), 0, 0
    for _ in range(60):
        u = torch.rand(40, generator=g)
        x = 1 + (u < 0.4).long() - (u > 0.75).long()  # ~16 a level up, ~10 down: over the budget
        y = sp.balanced(x)
        assert torch.equal(y, sp.balanced(x.clone())) and sp.entries(y) <= sp.window()[1]
        assert ((y == x) | (y == 1)).all()  # only moves taken back
        back = (y != x).nonzero().flatten()
        first, total = first + int((back < 20).sum()), total + len(back)
    assert total > 200 and 0.35 < first / total < 0.65


def test_search_on_solved_levels_improves_on_its_start_and_keeps_the_model():
    """From a start that starves down_proj (the only matrices that are not already sparse), the search on solved
    levels cuts the KL of the deployed solves, lands on the budget, is deterministic, and leaves the weights as they
    were."""
    from slr.plan import Plan
    from slr.spec import LayerSpec

    model, _ = _down_proj_problem()  # every linear 15% dense but down_proj
    mats = matrices(model)
    before = [m.weight.detach().clone() for m in mats]
    total, down = sum(m.numel for m in mats), sum(m.numel for m in mats if "down_proj" in m.name)
    other = (0.5 * total - sum(m.lr_unit for m in mats) - 0.1 * down) / (total - down)  # the start spends 0.5
    start = Plan()
    for m in mats:
        f = 0.1 if "down_proj" in m.name else other
        start.specs[m.key] = LayerSpec(sparsity=1 - round(f * m.d_in) / m.d_in, rank=1)
    kw = dict(generations=12, offspring=8, survivors=2, span=0.2, start=start, pools="solved")
    plan, info = search.allocate(model, admm_cfg(), ids(8, 32), **kw)
    assert info["pools"] == "admm solved per level (fast)" and info["solved_levels"] > len(mats) * 2
    assert info["loss"].startswith("KL(dense || solved levels)")
    assert info["final_loss"] < 0.7 * info["start_loss"] and info["kept"] == "search"
    down = [m.key for m in mats if "down_proj" in m.name]
    assert min(1 - info["per_matrix"][k]["sparsity"] for k in down) > 0.1
    assert 0.5 - 0.01 < info["achieved_fraction"] <= 0.5  # the slack under one level step is left unspent
    assert all(torch.equal(m.weight, b) for m, b in zip(mats, before))
    plan2, _ = search.allocate(model, admm_cfg(), ids(8, 32), **kw)
    assert plan2.specs == plan.specs
    # a mutation moves two matrices a level, so an offspring runs from the first block it changes on the parent's
    # recorded inputs: blocks skipped, and the same losses as a search that runs every block
    assert info["prefix_blocks"]["skipped"] > 0
    plan3, info3 = search.allocate(model, admm_cfg(), ids(8, 32), **{**kw, "prefix": False})
    assert plan3.specs == plan.specs and info3["trace"] == info["trace"]


def test_cap_on_solved_levels_and_the_errors():
    """CAP draws any levels and resolves them onto solved ones; pools=solved needs an S+LR per-matrix method and
    calibration data, and a known level_solve; each is a one-line error."""
    model = tiny_model("llama")
    plan, info = cap.allocate(model, admm_cfg("cap"), ids(8, 32), steps=2, samples=4, pools="solved")
    assert info["pools"] == "admm solved per level (fast)" and 0.5 - 0.01 < info["achieved_fraction"] <= 0.5
    assert level_solver(admm_cfg(), "full")[2]["max_iters"] == admm_cfg().solver.max_iters  # the run's own schedule
    bad = [(admm_cfg(), None, {}, "calibration data"),
           (CompressConfig(method="wanda", sparsity=0.5, alloc=AllocConfig("search", budget=0.5)), ids(8, 32), {},
            "S+LR"),
           (admm_cfg(), ids(8, 32), {"level_solve": "slow"}, "level_solve"),
           (admm_cfg(), ids(8, 32), {"level_solve": "pipeline"}, "compression pipeline"),  # no compress= given
           (admm_cfg(), ids(8, 32), {"level_cache": "/proc/nope/levels"}, "level cache")]
    for cfg, data, kw, why in bad:
        with pytest.raises(SLRError) as e:
            search.allocate(model, cfg, data, generations=1, pools="solved", **kw)
        assert why in str(e.value) and "\n" not in str(e.value)


def test_pipeline_levels_hold_the_deployed_solves_and_the_api_runs_them():
    """level_solve=pipeline: the start plan's levels are exactly the pipeline's deployed solves of that plan (float16
    storage), another level of the last block is the run's method on the H the pipeline had there, the model is left
    dense, and compress_ reaches it through plan_for (the allocator gets the pipeline)."""
    import copy

    from slr.allocate.cap import prepare
    from slr.pipeline import compress_, plan_for

    model, calib = tiny_model("llama"), ids(8, 32)
    mats = matrices(model)
    before = [m.weight.detach().clone() for m in mats]
    cfg = admm_cfg()
    st = prepare(model, cfg, calib, "cpu", "search", pools="solved", levels=3, span=0.2, init="knapsack", start=None,
                 mode=None, level_solve="pipeline", compress=compress_)
    assert all(torch.equal(m.weight, b) for m, b in zip(mats, before))
    sp = st.space
    plan = st.finish("search", sp.centre(), 0.0, {}, cfg.layer_spec())[0]
    j = max(i for i in range(len(mats)) if sp.k_levels[i][0] is not None)  # a matrix of the last block
    seen = {}

    def grab(i, Hs, results):
        seen.update({n: H.clone() for g, H in Hs.items() for n in g if i == mats[j].block})

    deployed = copy.deepcopy(model)  # solved again (no reuse), so every H is the level pass's
    compress_(deployed, cfg, calib, plan=Plan(plan.specs, plan.default), progress=False, materialize="dense",
              on_block=grab)
    for m, dm, p, ch in zip(mats, matrices(deployed), sp.pools, sp.start):
        want = dm.weight.detach()
        got = p.rebuild(m, ch.rank, ch.k_row * m.d_out)
        assert torch.allclose(got, want, rtol=2e-3, atol=1e-3 * float(want.abs().max())), m.key
    k, m = sp.k_levels[j][0], mats[j]
    name, fn, opts = level_solver(cfg, "full")
    want = fn(m.weight.detach().float(), seen[m.name], to_spec(m, Choice(k, sp.start[j].rank), "slr", None,
                                                                 cfg.layer_spec()), **opts).dense()
    got = sp.pools[j].rebuild(m, sp.start[j].rank, k * m.d_out)
    assert k != sp.start[j].k_row and torch.allclose(got, want, rtol=2e-3, atol=1e-3 * float(want.abs().max()))
    cfg2 = CompressConfig(method="admm", sparsity=0.6, rank=2, alloc=AllocConfig(
        "search", budget=0.5, options={"pools": "solved", "level_solve": "pipeline", "levels": 3, "generations": 2,
                                       "offspring": 4, "survivors": 2}))
    plan2, info = plan_for(model, cfg2, calib)
    assert info["pools"] == "admm solved per level (pipeline)" and 0.5 - 0.01 < info["achieved_fraction"] <= 0.5
    assert all(torch.equal(m.weight, b) for m, b in zip(mats, before))


def test_a_plan_on_pipeline_levels_deploys_the_levels_without_solving_them(monkeypatch):
    """level_solve=pipeline: every matrix of a mutated plan, fitted to the budget, stays on a solved level; the plan
    carries them, and compress_ puts exactly those parts in (float16 storage read back as float32) without calling
    the solver, its records marked reused; a matrix whose planned spec was not solved (here one moved off the ladder)
    is solved as usual."""
    import copy

    from slr import pipeline
    from slr.allocate.cap import prepare
    from slr.pipeline import compress_

    model, calib = tiny_model("llama"), ids(8, 32)
    cfg = admm_cfg()
    st = prepare(model, cfg, calib, "cpu", "search", pools="solved", levels=3, span=0.2, init="knapsack", start=None,
                 mode=None, level_solve="pipeline", compress=compress_)
    sp = st.space
    x = sp.mutate(sp.centre(), 3, torch.Generator().manual_seed(0))
    plan, info = st.finish("search", x, 0.0, {}, cfg.layer_spec())
    mats = matrices(model)
    base = cfg.layer_spec()
    level = {m.key: k for j, m in enumerate(mats) for k in sp.pools[j].weights
             if plan.get(m.block, m.name) == to_spec(m, Choice(k, sp.start[j].rank), "slr", None, base)}
    on_level = set(level)
    assert on_level == {m.key for m in mats}  # the budget fit moves no matrix off its levels
    assert any(level[m.key] != sp.start[j].k_row for j, m in enumerate(mats))  # off-centre levels among them
    assert info["reused_levels"] == len(plan.solved) == len(mats) and set(plan.solved) == on_level
    assert info["achieved_fraction"] <= 0.5 and info["retained_params"] <= int(0.5 * info["dense_params"])
    j_off = 0
    off = mats[j_off]
    plan.set(off.block, off.name, replace(plan.get(off.block, off.name), rank=1))  # not a solved spec any more
    calls = []
    solve = pipeline.solve_group
    monkeypatch.setattr(pipeline, "solve_group", lambda *a, **kw: calls.append(a[1]) or solve(*a, **kw))
    deployed = copy.deepcopy(model)
    rep = compress_(deployed, cfg, calib, plan=plan, progress=False, materialize="dense")
    assert sorted(n for Ws in calls for n in Ws) == sorted(  # only what has no solved level is solved
        m.name for m in mats if m.key not in on_level or m is off)
    for j, (m, dm) in enumerate(zip(mats, matrices(deployed))):
        rec = next(r for r in rep.records if (r.block, r.name) == (m.block, m.name))
        if m.key not in on_level or j == j_off:
            assert "reused" not in rec.info and (rec.rank == 1) == (j == j_off)
            continue
        assert rec.info["reused"] and torch.equal(dm.weight.detach(), sp.pools[j].result(level[m.key]).dense())


def test_a_rerun_on_cached_pipeline_levels_solves_nothing(tmp_path, monkeypatch):
    """With a level cache, a second level_solve=pipeline pass takes every start level from the cache; the start levels
    are kept in float32, so the pass propagates the same weights as the first, every later block's H is the same and
    every other level hits too: no solver call, no new file, the same levels."""
    from slr import pipeline
    from slr.allocate.cap import prepare
    from slr.pipeline import compress_

    model, calib = tiny_model("llama"), ids(8, 32)
    kw = dict(pools="solved", levels=3, span=0.2, init="knapsack", start=None, mode=None, level_solve="pipeline",
              level_cache=str(tmp_path), compress=compress_)
    first = prepare(model, admm_cfg(), calib, "cpu", "search", **kw).space
    files = {f: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    assert len(files) == sum(len(p.weights) for p in first.pools) > len(first.pools)
    calls = []
    solve = pipeline.solve_group
    monkeypatch.setattr(pipeline, "solve_group", lambda *a, **k: calls.append(a[1]) or solve(*a, **k))
    again = prepare(model, admm_cfg(), calib, "cpu", "search", **kw).space
    assert not calls
    assert {f: f.stat().st_mtime_ns for f in tmp_path.iterdir()} == files
    assert [p.weights for p in again.pools] == [p.weights for p in first.pools]


def test_levels_that_reach_further_keep_the_start_and_add_only_the_outer_solves(tmp_path):
    """reach widens the solved levels without touching the knapsack start (its trust region stays ``span``): five
    levels reaching 0.4 of d_in hold the three levels of span 0.2 as their middle and, on the same level cache, solve
    only the two outer ones of each matrix. reach without solved levels is a one-line error."""
    from slr.allocate.cap import prepare
    from slr.pipeline import compress_

    model, calib = tiny_model("llama"), ids(8, 32)
    kw = dict(pools="solved", span=0.2, init="knapsack", start=None, mode=None, level_solve="pipeline",
              level_cache=str(tmp_path), compress=compress_)
    first = prepare(model, admm_cfg(), calib, "cpu", "search", levels=3, **kw)
    files = set(tmp_path.iterdir())
    wide = prepare(model, admm_cfg(), calib, "cpu", "search", levels=5, reach=0.4, **kw)
    assert [kl[1:4] for kl in wide.space.k_levels] == first.space.k_levels
    assert wide.info["reach"] == 0.4 and wide.info["span"] == 0.2
    outer = sum(k is not None for kl in wide.space.k_levels for k in (kl[0], kl[4]))
    assert outer > 0 and len(set(tmp_path.iterdir()) - files) == outer
    with pytest.raises(SLRError) as e:
        search.allocate(model, admm_cfg(), calib, generations=1, reach=0.3)  # whitened pools
    assert "reach" in str(e.value) and "\n" not in str(e.value)
