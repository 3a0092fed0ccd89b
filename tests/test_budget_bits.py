"""Budgets in bits (--budget-bits): the allocator picks each matrix's bit width of S (and rank) so that the compressed
linears average at most B bits per weight, counted as slr.formats counts their bytes."""

from __future__ import annotations

import math

import pytest
import torch
from test_cli import run

import slr
import slr.allocate.bits as bits_alloc
from slr.allocate import make_plan
from slr.cli import build_parser, compress_request
from slr.config import AllocConfig, CompressConfig, load_toml
from slr.errors import SLRError
from slr.formats import model_bytes, theoretical_bytes
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.nn import SLRLinear
from slr.plan import key


def calib(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(0))


def gptq(budget_bits: float, method: str = "knapsack", bits: int = 4) -> CompressConfig:
    return CompressConfig(method="gptq", bits=bits, alloc=AllocConfig(method, budget_bits=budget_bits))


def linears(model):
    ad = get_adapter(model)
    return {key(i, n): lin for i, b in enumerate(ad.blocks(model)) for n, lin in ad.linears(b).items()}


def plan_bits(model, plan) -> float:
    """Bits per weight of a plan, priced here straight from formats.theoretical_bytes (fp16 floats)."""
    total = weights = 0
    for k, lin in linears(model).items():
        s = plan.specs[k]
        d_out, d_in = lin.weight.shape
        q = {"S": s.quant} | ({"U": s.factor_quant(s.rank), "V": s.factor_quant(d_in)}
                              if s.rank and s.factor_bits != 16 else {})
        total += 8 * theoretical_bytes(d_out, d_in, s.kept(d_out, d_in), s.rank, nm=s.nm, quant=q)["total"]
        weights += d_out * d_in
    return total / weights


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and " -- fix: " in msg
    return msg


def test_config_errors_are_one_line():
    with pytest.raises(SLRError) as e:
        AllocConfig("knapsack", budget=0.5, budget_bits=3.0)
    assert "--budget and --budget-bits" in one_line(e)
    for bad in (0, -1.0, math.nan, math.inf, True):
        with pytest.raises(SLRError) as e:
            AllocConfig("knapsack", budget_bits=bad)
        assert "is not a positive number of bits per weight" in one_line(e)
    for name in ("owl",):
        with pytest.raises(SLRError) as e:
            AllocConfig(name, budget_bits=3.0)
        assert f"{name} does not take --budget-bits yet" in one_line(e) and "knapsack" in str(e.value)
    with pytest.raises(SLRError) as e:
        CompressConfig(method="sparsegpt", sparsity=0.5, alloc=AllocConfig("knapsack", budget_bits=3.0))
    assert "--budget-bits needs --bits and a method that quantizes, e.g. gptq or prune+lr" in one_line(e)
    cfg = gptq(3.25)
    assert not cfg.alloc.is_uniform and not gptq(3.25, "uniform").alloc.is_uniform
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["alloc"]["budget_bits"] == 3.25


def test_budget_below_the_cheapest_plan_fails_before_any_pass(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("heavy work before the budget check")

    for name in ("output_grad_sq", "whitened_metrics", "input_sq_norms"):
        monkeypatch.setattr(bits_alloc, name, boom)
    model = tiny_model("llama")
    with pytest.raises(SLRError) as e:  # 2 bits in groups of 64: 2 + 16 / 64 = 2.25 bits per weight at the least
        make_plan(model, gptq(2.2), calib())
    assert "below the smallest reachable 2.250 bits per weight" in one_line(e)
    with pytest.raises(SLRError) as e:  # uniform keeps config.bits: 4.25
        make_plan(model, gptq(4.0, "uniform"), calib())
    assert "below the smallest reachable 4.250 bits per weight (every matrix at --bits 4" in one_line(e)


def test_knapsack_mixes_widths_within_the_budget():
    model = tiny_model("llama")
    plan, info = make_plan(model, gptq(3.0), calib())  # between q2g64 (2.25) and q3g64 (3.25)
    widths = {s.bits for s in plan.specs.values()}
    assert len(widths) > 1 and widths <= {2, 3, 4, 8}
    assert all(s.rank == 0 and s.sparsity == 0.0 and s.group_size == 64 for s in plan.specs.values())
    achieved = plan_bits(model, plan)
    assert info["achieved_bpw"] == pytest.approx(achieved)
    assert 3.0 - 0.15 <= achieved <= 3.0
    assert info["budget_bits"] == 3.0 and info["allocator"] == "knapsack"
    assert {k: v["bits"] for k, v in info["per_matrix"].items()} == {k: s.bits for k, s in plan.specs.items()}
    assert sum(info["weights_at_bits"].values()) == pytest.approx(1.0)


def test_sensitive_matrix_gets_more_bits(monkeypatch):
    """A matrix whose output reaches the loss strongly (a large Fisher sensitivity) is given more bits."""
    model, data = tiny_model("llama"), calib()
    plan, _ = make_plan(model, gptq(3.0), data)
    target = min(plan.specs, key=lambda k: (plan.specs[k].bits, k))  # one of the matrices at the fewest bits
    real = bits_alloc.output_grad_sq

    def sensitive(*a, **k):
        s = real(*a, **k)
        s[target] *= 1e4
        return s

    monkeypatch.setattr(bits_alloc, "output_grad_sq", sensitive)
    plan2, info2 = make_plan(model, gptq(3.0), data)
    assert plan2.specs[target].bits > plan.specs[target].bits
    assert info2["achieved_bpw"] <= 3.0


def test_uniform_with_rank_fills_the_budget():
    model = tiny_model("llama")
    cfg = CompressConfig(method="prune+lr", bits=3, rank=4, alloc=AllocConfig("uniform", budget_bits=4.0))
    plan, info = make_plan(model, cfg, None)
    lins = linears(model)
    for k, s in plan.specs.items():
        d_out, d_in = lins[k].weight.shape
        assert s.bits == 3 and s.rank > 0
        cost = [8 * theoretical_bytes(d_out, d_in, d_out * d_in, r, quant={"S": s.quant})["total"]
                for r in (s.rank, s.rank + 1)]
        assert cost[0] <= 4.0 * d_out * d_in < cost[1], k  # the largest rank that fits its share
    assert info["achieved_bpw"] == pytest.approx(plan_bits(model, plan)) and info["achieved_bpw"] <= 4.0
    plan, info = make_plan(model, gptq(4.0, "uniform", bits=3), None)  # no low-rank part: the config's spec fits
    assert {(s.bits, s.rank) for s in plan.specs.values()} == {(3, 0)} and info["achieved_bpw"] == 3.25


def test_compress_end_to_end_bytes_match_the_plan():
    model, data = tiny_model("llama"), calib()
    cfg = gptq(3.0)
    report = slr.compress_(model, cfg, data, progress=False)
    b = model_bytes(model)
    assert b["bpw"] <= 3.0
    assert b["bpw"] == pytest.approx(report.allocation["achieved_bpw"], abs=1e-4)
    for k, lin in linears(model).items():  # every matrix solved (and stored) at its own plan's width
        assert isinstance(lin, SLRLinear) and lin.qspecs["S"].bits == report.plan.specs[k].bits
    assert len({lin.qspecs["S"].bits for lin in linears(model).values()}) > 1


def test_cli_flag_parses_into_the_toml_config(capsys, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "gptq"\nbits = 4\n[alloc]\nmethod = "knapsack"\nbudget_bits = 3.25\n')
    _, tables, _ = load_toml(toml)
    a = build_parser().parse_args(["compress", "m", "--method", "gptq", "--bits", "4", "--allocate", "knapsack",
                                   "--budget-bits", "3.25"])
    _, cfg, _ = compress_request(a)
    assert cfg == CompressConfig.from_dict(tables) and cfg.alloc.budget_bits == 3.25
    code, _, err = run(capsys, "compress", tmp_path / "m", "--config", toml, "--budget", 0.5)
    assert code == 2 and "--budget and --budget-bits" in err and len(err.strip().splitlines()) == 1


def test_allocated_plans_keep_the_runs_grids():
    """With --bits, every allocator's plan solves S (and U, V) on the run's grids (plans used to drop them)."""
    model = tiny_model("llama")
    cfg = CompressConfig(method="prune+lr", bits=4, sparsity=0.5, rank=4, factor_bits=8,
                         alloc=AllocConfig("uniform", budget=0.4))
    plan, info = make_plan(model, cfg, None)
    assert {(s.bits, s.group_size, s.factor_bits) for s in plan.specs.values()} == {(4, 64, 8)}
    assert {v["bits"] for v in info["per_matrix"].values()} == {4}


def test_knapsack_with_ranks_respects_the_floor():
    model = tiny_model("llama")
    cfg = CompressConfig(method="prune+lr", bits=4, rank=8,
                         alloc=AllocConfig("knapsack", budget_bits=5.0, options={"rank_floor": 4}))
    plan, info = make_plan(model, cfg, None)
    assert min(s.rank for s in plan.specs.values()) >= 4
    assert info["achieved_bpw"] == pytest.approx(plan_bits(model, plan)) and info["achieved_bpw"] <= 5.0


def _starved_start(model):
    """A plan under 3.0 bits per weight that starves down_proj (2 bits) and gives every other linear 3."""
    from slr.allocate.base import matrices
    from slr.plan import Plan
    from slr.spec import LayerSpec

    start = Plan()
    for m in matrices(model):
        start.specs[m.key] = LayerSpec(sparsity=0.0, bits=2 if "down_proj" in m.name else 3)
    return start


@pytest.mark.parametrize("name", ["cap", "search"])
def test_level_allocators_under_a_bits_budget_move_bits_to_where_they_pay(name):
    """CAP and search with --budget-bits: levels are bit widths; from a start that starves down_proj they move bits
    to where they lower the KL to dense (by a third at least), stay within the budget as formats counts it, and the
    same seed gives the same plan."""
    from slr.allocate import cap, search

    model = tiny_model("llama")
    start = _starved_start(model)
    fn = {"cap": cap.allocate, "search": search.allocate}[name]
    kw = {"cap": dict(steps=20, samples=12), "search": dict(generations=15, offspring=8, survivors=2)}[name]
    cfg = gptq(3.0, name)
    plan, info = fn(model, cfg, calib(), start=start, **kw)
    assert info["budget_bits"] == 3.0 and info["init"] == "given"
    assert info["achieved_bpw"] == pytest.approx(plan_bits(model, plan)) and info["achieved_bpw"] <= 3.0
    assert info["final_loss"] < info["start_loss"] / 1.5 and info["kept"] != "start"
    assert all(s.sparsity == 0.0 and s.rank == 0 and s.bits in (2, 3, 4, 8) for s in plan.specs.values())
    assert plan.specs != start.specs
    plan2, _ = fn(model, cfg, calib(), start=start, **kw)
    assert plan2.specs == plan.specs


def test_cap_under_a_bits_budget_with_ranks_keeps_the_support():
    """S+LR (prune+lr, 50% + rank 4, 3-bit S) under a bits budget: sparsity stays the run's, ranks and widths move
    within the budget; data-free as well."""
    model = tiny_model("llama")
    cfg = CompressConfig(method="prune+lr", sparsity=0.5, bits=3, rank=4,
                         alloc=AllocConfig("cap", budget_bits=4.0))
    for data in (calib(), None):
        plan, info = make_plan(model, cfg, data, steps=3, samples=4)
        assert info["achieved_bpw"] <= 4.0 and info["achieved_bpw"] == pytest.approx(plan_bits(model, plan))
        assert all(abs(s.sparsity - 0.5) < 0.02 and s.bits in (2, 3, 4, 8) for s in plan.specs.values())
        assert any(s.rank > 0 for s in plan.specs.values())


def test_solved_pools_rebuild_the_runs_own_solve():
    """pools=solved: S at every width is the run's method (GPTQ) solved on the whitener's H and cached as codes, so a
    rebuild at rank 0 is exactly that solve (not round-to-nearest), and the refit factors fit W minus it."""
    from slr.allocate.base import Matrix, whitener
    from slr.allocate.bitlevels import make_bit_pools
    from slr.allocate.bits import solve_widths
    from slr.quant import QuantSpec
    from slr.quant import rtn as round_to_grid
    from slr.solvers.gptq import gptq as gptq_solve
    from slr.spec import LayerSpec

    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    white = whitener(X.T @ X / 256)
    m = Matrix(0, "q_proj", W)
    base = LayerSpec(sparsity=0.0, bits=4, group_size=32)
    opts = {"actorder": True}
    pools = make_bit_pools(m, white, None, base, 4, solve_widths(W, white[0], base, (gptq_solve, opts)))
    H = (white[0].double() @ white[0].double().T).float()
    for b in (2, 3, 4, 8):
        spec = LayerSpec(sparsity=0.0, bits=b, group_size=32)
        want = gptq_solve(W, H, spec, **opts).S
        got = pools.rebuild(m, 0, 0, b)
        assert torch.equal(got, want)
        rtn_err = ((W - round_to_grid(W, QuantSpec(b, 32), None)[0]) @ white[0]).norm()
        assert ((W - got) @ white[0]).norm() < rtn_err  # GPTQ beats rounding in the metric
        US, Vt = pools.factors[b]
        E = (W - want) @ white[0]
        assert ((E - US[:, :4] @ Vt[:4] @ white[0]).norm() < E.norm())


def test_solved_pools_search_and_their_errors(monkeypatch):
    """search with pools=solved under --budget-bits: its knapsack start ranks widths on the solved errors and hands
    them to the pools (one solve per matrix, not two); without data, or under --budget with a method that is not
    S+LR, it fails in one line."""
    from slr.allocate import bits, cap, search

    calls = []
    real = bits.solve_widths

    def counting(W, *a):
        calls.append(W.shape)
        return real(W, *a)

    monkeypatch.setattr(cap, "solve_widths", counting)
    monkeypatch.setattr(bits, "solve_widths", counting)
    model = tiny_model("llama")
    cfg = CompressConfig(method="gptq", bits=3, solver={"actorder": True}, alloc=AllocConfig("search", budget_bits=3.5))
    plan, info = search.allocate(model, cfg, calib(), generations=2, offspring=2, survivors=1, pools="solved")
    assert info["pools"] == "gptq solved per width" and info["achieved_bpw"] <= 3.5
    assert len(calls) == len(linears(model))
    for c, data, why in ((cfg, None, "needs calibration data"),
                         (CompressConfig(method="sparsegpt", sparsity=0.5, alloc=AllocConfig("search", budget=0.6)),
                          calib(), "needs an S+LR method")):
        with pytest.raises(SLRError) as e:
            search.allocate(model, c, data, generations=1, pools="solved")
        assert why in one_line(e)


def test_knapsack_solved_proxy_prices_the_runs_own_error():
    """knapsack proxy=solved under --budget-bits: every width's loss is GPTQ's error, below round-to-nearest's, so the
    uniform plan's proxy loss drops; elsewhere it is a one-line error."""
    model = tiny_model("llama")
    cfg = gptq(3.5, bits=3)
    _, rtn_info = make_plan(model, cfg, calib())
    _, info = make_plan(model, cfg, calib(), proxy="solved")
    assert info["proxy"] == "whitened-metric solved error, low-rank tail" and info["achieved_bpw"] <= 3.5
    assert info["uniform_proxy_loss"] < 0.9 * rtn_info["uniform_proxy_loss"]
    for c, data, why in ((cfg, None, "needs calibration data"),
                         (CompressConfig(method="prune+lr", sparsity=0.5, rank=4, alloc=AllocConfig("knapsack",
                                                                                                   budget=0.6)),
                          calib(), "needs --budget-bits")):
        with pytest.raises(SLRError) as e:
            make_plan(model, c, data, proxy="solved")
        assert why in one_line(e)


def test_bit_widths_over_the_budget_step_down_regardless_of_the_matrix_order():
    """A draw whose widths alone exceed the budget steps the widest matrices down; among equally wide and equally large
    ones in ``levels.draw_order`` (drawn from the plan), not the matrices' order, which made the first blocks' moves
    the ones undone: over many draws both halves of the matrices step down about equally often."""
    from slr.allocate.base import Choice, Matrix
    from slr.allocate.bitlevels import BitSpace
    from slr.spec import LayerSpec

    n = 40
    mats = [Matrix(i, "mlp.up_proj", torch.zeros(16, 32)) for i in range(n)]
    base = LayerSpec(sparsity=0.0, bits=3, group_size=32)
    # 3.5 bits per weight: the start plan (3-bit S, a 16-bit scale per 32 weights) spends the budget exactly
    sp = BitSpace(mats, [None] * n, [Choice(32, 0, 3)] * n, "sparse", None, base, 3.5, 0, None, [[2, 3, 4]] * n)
    g, first, total = torch.Generator().manual_seed(0), 0, 0
    for _ in range(40):
        u = torch.rand(n, generator=g)
        x = 1 + (u < 0.4).long() - (u > 0.75).long()  # ~16 at 4 bits, ~10 at 2: over the budget
        got = [b for _, _, b in sp.resolve(x)]
        assert got == [b for _, _, b in sp.resolve(x.clone())]
        down = [j for j in range(n) if got[j] < sp.bit_levels[j][int(x[j])]]
        first, total = first + sum(j < n // 2 for j in down), total + len(down)
    assert total > 100 and 0.35 < first / total < 0.65
