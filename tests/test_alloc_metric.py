"""The allocators' layer metric: streamed dense Hessians, the whitener, and the knapsack proxy in the full-H metric."""

from __future__ import annotations

import pytest
import torch

from slr.allocate import make_plan
from slr.allocate.base import Choice, Matrix, matrices, whitener
from slr.allocate.cap import make_pools
from slr.allocate.knapsack import Metric, matrix_curve
from slr.calibration import dense_block_hessians
from slr.config import AllocConfig, CompressConfig
from slr.errors import SLRError
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.solvers.base import damp_hessian


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) * torch.logspace(0, 1.5, n)  # correlated, badly scaled columns
    X[:, 1] += 3 * X[:, 0]
    return (X.T @ X / X.shape[0]).double()


def ids(n: int = 6, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_hessians_match_a_full_forward(family):
    """Block-by-block streaming gives the same H as hooks on one full dense forward pass."""
    model = tiny_model(family)
    ad = get_adapter(model)
    calib = ids()
    want: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def hook(k):
        def fn(_m, args, _o):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            want[k] = want.get(k, 0) + x.T @ x
        return fn

    for i, b in enumerate(ad.blocks(model)):
        for n, lin in ad.linears(b).items():
            hooks.append(lin.register_forward_hook(hook((i, n))))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    tokens = calib.numel()
    seen = 0
    for i, Hs in dense_block_hessians(model, calib, max_samples=None, batch_size=4):
        assert set(Hs) == set(ad.linears(ad.blocks(model)[i]))
        for n, H in Hs.items():
            torch.testing.assert_close(H, want[(i, n)] / tokens, rtol=1e-4, atol=1e-6)
            seen += 1
    assert seen == len(want)


def test_whitener():
    H = spd(12)
    G, Gi, sal = whitener(H)
    Hd = damp_hessian(H, 0.01)
    torch.testing.assert_close((G @ G.T).double(), Hd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((G @ Gi).double(), torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(sal.double(), 1 / torch.linalg.inv(Hd).diagonal(), rtol=1e-4, atol=0)


def test_whitened_proxy_is_exact_where_it_claims():
    """With every entry sampled: loss(r, k) = ||W - L_r||_H^2 * (dropped OBS-saliency share), L_r the H-optimal
    rank-r fit; and a diagonal H gives the diag metric's curve."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(10, 12, generator=g)
    m = Matrix(0, "x", W)
    H = spd(12, seed=1)
    white = whitener(H)
    ch, _, loss = matrix_curve(m, Metric.whitened(W, white), "slr", None, uni=Choice(6, 2), normalize="absolute")
    G, Gi, sal = (t.double() for t in white)
    Hd = damp_hessian(H, 0.01)
    P, s, Qt = torch.linalg.svd(W.double() @ G, full_matrices=False)
    checked = 0
    for c, lo in zip(ch, loss.tolist()):
        L = (P[:, :c.rank] * s[:c.rank]) @ Qt[:c.rank] @ Gi
        E = W.double() - L
        err = float(torch.trace(E @ Hd @ E.T))
        e2 = (E ** 2 * sal[None, :]).flatten().sort(descending=True).values
        kept = float(e2[: c.k_row * m.d_out].sum()) / float(e2.sum())
        assert lo == pytest.approx(err * (1 - kept), rel=2e-3, abs=1e-6)
        checked += 1
    assert checked == len(ch) > 20
    # a diagonal H: the whitened metric reduces to the diag one (d_j^2 = damped H_jj)
    Hdiag = torch.diag(torch.rand(12, generator=g).double() + 0.1)
    d = damp_hessian(Hdiag, 0.01).diagonal().sqrt()
    _, _, lw = matrix_curve(m, Metric.whitened(W, whitener(Hdiag)), "slr", None, uni=Choice(6, 2))
    _, _, ld = matrix_curve(m, Metric.diag(W, d), "slr", None, uni=Choice(6, 2))
    torch.testing.assert_close(lw, ld, rtol=1e-4, atol=1e-6)


def _white_pools(seed: int, h_seed: int):
    """A random 16 x 12 matrix and its full-H CAP pools (r0 = 2)."""
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(seed))
    m = Matrix(0, "x", W)
    return W, m, make_pools(m, None, "slr", "whitened", 0.5, 5, residual_rank=2, white=whitener(spd(12, h_seed)))


def test_cap_full_h_pools_rebuild_the_matrix():
    """Keeping every entry of the full-H pools rebuilds W; the directions are the whitened SVD's, best first."""
    W, m, p = _white_pools(4, 2)
    torch.testing.assert_close(p.rebuild(m, 2, m.numel), W, rtol=1e-4, atol=1e-4)
    assert p.sigma.numel() == int(0.5 * m.numel / m.lr_unit)
    assert bool((p.sigma[:-1] >= p.sigma[1:]).all())
    s = torch.linalg.svdvals(W.double() @ whitener(spd(12, 2))[0].double())
    torch.testing.assert_close(p.sigma.double(), s[: p.sigma.numel()], rtol=1e-4, atol=1e-5)


def test_cap_residual_pools_put_w_on_the_kept_support():
    """Kept entries carry W itself, the rest is the kept directions' L: no direction past r0 is counted twice."""
    W, m, p = _white_pools(5, 3)
    out = p.rebuild(m, 4, 3 * m.d_out)  # two directions past r0, three entries per row
    on = p.pos < 3
    assert int(on.sum()) == 3 * m.d_out
    L = (p.U[:, :4] * p.sigma[:4]) @ p.Vt[:4]
    torch.testing.assert_close(out[on], W[on], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[~on], L[~on], rtol=1e-4, atol=1e-4)


def test_prefix_rebuild_prunes_row_wise_like_wanda():
    """Pruning pools rebuilt at e entries keep round(e / d_out) per row, each row's largest |w| d_j (Wanda's mask)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)
    d = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    m = Matrix(0, "x", W)
    p = make_pools(m, d, "sparse", "whitened", 0.5, 0)
    out = p.rebuild(m, 0, 13 * 24)
    want = torch.zeros_like(W, dtype=torch.bool).scatter_(1, (W.abs() * d.float()).topk(13, dim=1).indices, True)
    assert torch.equal(out != 0, want) and torch.equal(out[want], W[want])


def test_knapsack_metric_and_span():
    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method="knapsack", budget=0.5))
    plans = {}
    for metric in ("whitened", "diag"):
        plan, info = make_plan(model, cfg, ids(8), metric=metric, normalize="size")
        assert info["metric"] == metric and info["calib_windows"] == 8
        assert info["proxy_loss"] <= info["uniform_proxy_loss"]
        assert abs(info["achieved_fraction"] - 0.5) <= 1e-3
        plans[metric] = plan.to_dict()
    assert plans["whitened"] != plans["diag"]
    _, info = make_plan(model, cfg, None)
    assert info["metric"] == "weights" and info["data_free"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_output_grad_sq_is_the_mean_squared_per_token_gradient(family):
    """F̄ of every linear = mean over tokens and output channels of (dℓ_t/dy)^2, computed with plain autograd."""
    from slr.allocate.base import output_grad_sq
    from slr.plan import key

    model = tiny_model(family)
    x = ids(4, 16)
    got = output_grad_sq(model, x, max_samples=None, batch_size=3)  # two batches (3 + 1)
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), "weights must get no gradient"
    ad = get_adapter(model)
    outs, hooks = {}, []

    def keeper(k):
        def keep(_m, _a, out):
            out.retain_grad()
            outs[k] = out
        return keep

    for i, block in enumerate(ad.blocks(model)):
        for n, lin in ad.linears(block).items():
            hooks.append(lin.register_forward_hook(keeper(key(i, n))))
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                      reduction="sum").backward()
    for h in hooks:
        h.remove()
    assert set(got) == set(outs)
    for k, out in outs.items():
        want = float((out.grad.double() ** 2).mean())
        assert got[k] == pytest.approx(want, rel=1e-4), k
    assert output_grad_sq(model, None) is None and output_grad_sq(model, x[:0]) is None


def test_fisher_normalisation_is_the_default_with_data():
    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method="knapsack", budget=0.5))
    _, info = make_plan(model, cfg, ids(4, 16))
    assert info["normalize"] == "fisher" and info["fisher_windows"] == 4
    _, info = make_plan(model, cfg, None)
    assert info["normalize"] == "size" and "fisher_windows" not in info
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method="cap", budget=0.5))
    _, info = make_plan(model, cfg, ids(4, 16), samples=1, steps=1, windows=2)
    assert info["normalize"] == "fisher"


SEARCH_OPTS = {"cap": {"samples": 2, "steps": 2, "windows": 2},
               "search": {"generations": 2, "offspring": 2, "survivors": 1, "windows": 2}}


@pytest.mark.parametrize("allocator", ["knapsack", "cap", "search"])
def test_rank_floor(allocator):
    """S+LR plans keep at least the run's --rank everywhere by default; rank_floor=0 frees it."""
    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method=allocator, budget=0.5))
    opts = SEARCH_OPTS.get(allocator, {})
    plan, info = make_plan(model, cfg, ids(4, 16), **opts)
    assert info["rank_floor"] == 4 and abs(info["achieved_fraction"] - 0.5) <= 1e-3
    assert all(s.rank >= 4 for s in plan.specs.values())
    plan, info = make_plan(model, cfg, ids(4, 16), rank_floor=8, **opts)
    assert all(s.rank >= 8 for s in plan.specs.values())
    _, info = make_plan(model, cfg, ids(4, 16), rank_floor=0, **opts)
    assert info["rank_floor"] == 0


@pytest.mark.parametrize("allocator", ["knapsack", "cap", "search"])
def test_trust_region(allocator):
    """Every matrix keeps a retained fraction within budget ± span (default 0.1); span=1 turns it off."""
    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method=allocator, budget=0.5))
    opts = SEARCH_OPTS.get(allocator, {})
    for span in (None, 0.05):
        _, info = make_plan(model, cfg, ids(4, 16), **opts, **({} if span is None else {"span": span}))
        assert info["span"] == (span or 0.1) and abs(info["achieved_fraction"] - 0.5) <= 1e-3
        for mat in matrices(model):
            v = info["per_matrix"][mat.key]
            kept = round((1 - v["sparsity"]) * mat.d_in) * mat.d_out + v["rank"] * mat.lr_unit
            # fit_budget may move a rank unit; CAP rounds its kept entries to whole rows
            slack = (2 * mat.lr_unit + mat.d_out) / mat.numel
            assert abs(kept / mat.numel - 0.5) <= info["span"] + slack, mat.key
    _, info = make_plan(model, cfg, ids(4, 16), span=1, **opts)
    assert info["span"] == 1


def test_cap_knapsack_init_is_the_knapsack_plan():
    """Before any policy-gradient step, CAP's plan (init="knapsack") is the knapsack's, up to one row of entries;
    init="uniform" starts from the uniform plan."""
    model = tiny_model("llama")
    _, kinfo = make_plan(model, CompressConfig(method="admm", sparsity=0.6, rank=4,
                                               alloc=AllocConfig(method="knapsack", budget=0.5)),
                         ids(4, 16))
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method="cap", budget=0.5))
    _, info = make_plan(model, cfg, ids(4, 16), steps=0, windows=2)
    assert info["init"] == "knapsack" and info["trace"] == [] and info["final_loss"] == info["start_loss"]
    for k, v in kinfo["per_matrix"].items():
        assert info["per_matrix"][k]["rank"] == v["rank"], k
        assert abs(info["per_matrix"][k]["sparsity"] - v["sparsity"]) <= 2 / 64 + 1e-6, k  # d_in >= 64
    _, uinfo = make_plan(model, cfg, ids(4, 16), steps=0, windows=2, init="uniform")
    _, uni = make_plan(model, CompressConfig(method="admm", sparsity=0.6, rank=4,
                                             alloc=AllocConfig(method="uniform", budget=0.5)), ids(4, 16))
    assert uinfo["init"] == "uniform" and all(v["rank"] == 4 for v in uinfo["per_matrix"].values())
    assert uinfo["per_matrix"] != info["per_matrix"]
    with pytest.raises(SLRError, match="unknown CAP init"):
        make_plan(model, cfg, ids(4, 16), init="density")


def test_loss_weight_interpolates_size_and_fisher():
    from slr.allocate.base import loss_weight

    assert loss_weight(100, 7.0, None) == 100.0
    assert loss_weight(100, 7.0, 3.0, power=0.0) == pytest.approx(100.0)
    assert loss_weight(100, 7.0, 3.0, power=1.0) == pytest.approx(21.0)  # F̄ ||A||^2
    assert loss_weight(100, 7.0, 3.0, power=0.5) == pytest.approx((100.0 * 21.0) ** 0.5)


@pytest.mark.parametrize("allocator", ["knapsack", "cap", "search"])
def test_normalize_errors_come_first(allocator):
    from slr.errors import SLRError

    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method=allocator, budget=0.5))
    with pytest.raises(SLRError, match="normalize"):
        make_plan(model, cfg, ids(4, 16), normalize="bogus")
    with pytest.raises(SLRError, match="needs calibration data"):
        make_plan(model, cfg, None, normalize="fisher")


def test_policy_search_reaches_a_known_optimum():
    """REINFORCE over categorical levels finds the plan of a separable loss with a known minimum (levels drawn at
    random), from the centre start; with lr=0 the mode stays at the start."""
    from slr.allocate.cap import policy_search

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (12,), generator=g)

    def fitness(x):
        return float((x - target).abs().sum())

    modes, trace = policy_search(fitness, 12, 5, steps=40, samples=16, lr=0.2, sigma=0.5,
                                 gen=torch.Generator().manual_seed(1))
    assert torch.equal(modes[-1], target) and torch.equal(modes[0], torch.full((12,), 2)) and len(modes) > 2
    assert trace[-1]["mean_loss"] < 0.5 * trace[0]["mean_loss"]
    modes0, _ = policy_search(fitness, 12, 5, steps=40, samples=16, lr=0.0, sigma=0.5,
                              gen=torch.Generator().manual_seed(1))
    assert len(modes0) == 1 and torch.equal(modes0[0], torch.full((12,), 2))


def _down_proj_problem():
    """A tiny llama whose linears are exactly 15% dense except down_proj, and a start plan that gives down_proj 0.2
    of its weights and the rest of the 0.5 budget to the others."""
    from slr.plan import Plan
    from slr.spec import LayerSpec

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    mats = matrices(model)
    with torch.no_grad():
        for m in mats:
            if "down_proj" not in m.name:
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < 0.15)
    total = sum(m.numel for m in mats)
    down = sum(m.numel for m in mats if "down_proj" in m.name)
    start = Plan()
    for m in mats:
        f = 0.2 if "down_proj" in m.name else (0.5 * total - 0.2 * down) / (total - down)
        start.specs[m.key] = LayerSpec(sparsity=1 - round(f * m.d_in) / m.d_in)
    return model, start


def test_cap_moves_from_a_bad_start_to_the_known_best():
    """A tiny llama whose linears are all exactly 15% dense except down_proj: pruning any of them to >= 15% is
    lossless, so the best plan puts them at the lowest density level and down_proj at the highest. Started from the
    opposite (down_proj at budget - span), CAP's policy must move down_proj up to the top of its trust region and cut
    the KL to dense several-fold; the plan keeps the budget."""
    from slr.allocate import cap

    model, start = _down_proj_problem()
    mats = matrices(model)
    cfg = CompressConfig(method="wanda", sparsity=0.5, alloc=AllocConfig(method="cap", budget=0.5))
    plan, info = cap.allocate(model, cfg, ids(8, 32), steps=20, samples=16, span=0.3, start=start)
    assert info["init"] == "given" and info["kept"] == "policy"
    assert info["final_loss"] < info["start_loss"] / 4
    assert info["heldout_windows"] == 4 and 0 < info["heldout_final_loss"] < info["heldout_start_loss"] / 2
    assert info["heldout_start_loss"] == pytest.approx(info["start_loss"], rel=0.5)  # KL to dense, like the fitness
    assert abs(info["achieved_fraction"] - 0.5) <= 1e-3
    for m in mats:
        if "down_proj" in m.name:  # start 0.2; the top level is 0.2 + span, plus the common shift
            assert 1 - info["per_matrix"][m.key]["sparsity"] >= 0.5, m.key
    assert len(info["trace"]) == 20 and info["trace"][-1]["mean_loss"] < info["trace"][0]["mean_loss"]
    plan2, _ = cap.allocate(model, cfg, ids(8, 32), steps=20, samples=16, span=0.3, start=start)
    assert plan2.specs == plan.specs  # the same seed gives the same plan


def test_search_moves_from_a_bad_start_and_is_deterministic():
    """The evolutionary search on the same known-best problem: from the bad start it cuts the KL several-fold; the
    same seed gives the same plan; with zero generations it returns the start."""
    from slr.allocate import search

    model, start = _down_proj_problem()
    cfg = CompressConfig(method="wanda", sparsity=0.5, alloc=AllocConfig(method="search", budget=0.5))
    kw = dict(generations=15, offspring=8, survivors=2, span=0.3, start=start)
    plan, info = search.allocate(model, cfg, ids(8, 32), **kw)
    assert info["init"] == "given" and abs(info["achieved_fraction"] - 0.5) <= 1e-3
    assert info["final_loss"] < info["start_loss"] / 4
    assert info["loss_evals"]["screen"] > info["loss_evals"]["full"] > 1
    plan2, _ = search.allocate(model, cfg, ids(8, 32), **kw)
    assert plan2.specs == plan.specs
    _, info0 = search.allocate(model, cfg, ids(8, 32), **{**kw, "generations": 0})
    assert info0["final_loss"] == info0["start_loss"]
    with pytest.raises(SLRError, match="survivors"):
        make_plan(model, cfg, ids(8, 32), survivors=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3", "opt"])
def test_a_forward_resumed_at_a_recorded_block_equals_the_full_forward(family):
    """``prefix.logits_from``: run from any block on the inputs a full forward recorded, the logits and the block
    inputs are the full forward's, bit for bit."""
    from slr.allocate.prefix import logits_from
    from slr.kl import next_logits

    model = tiny_model(family).eval()
    x = ids(3, 17)
    blocks = get_adapter(model).blocks(model)
    full, seen = logits_from(model, blocks, x, 0, None)
    with torch.no_grad():
        assert torch.equal(full, next_logits(model, x)) and len(seen) == len(blocks)
    for start in range(1, len(blocks)):
        out, again = logits_from(model, blocks, x, start, seen)
        assert torch.equal(out, full) and all(torch.equal(a, b) for a, b in zip(again, seen))
    seen[-1] = seen[-1] + 1  # the last block really runs on the recorded input
    assert not torch.equal(logits_from(model, blocks, x, len(blocks) - 1, seen)[0], full)
    assert all(type(b).forward is b.forward.__func__ for b in blocks)  # every block has its own forward back


def test_cap_keeps_its_start_when_held_out_windows_disagree(monkeypatch):
    """A plan that wins on the fitness windows but loses on the held-out ones is not taken."""
    from slr.allocate import cap, levels

    class HeldOutPrefersStart(levels.Fitness):
        def __init__(self, *a, offset: int = 0, **kw):
            super().__init__(*a, offset=offset, **kw)
            self.offset = offset

        def __call__(self, x):
            loss = super().__call__(x)
            return -loss if self.offset else loss  # held out: the better a plan fits, the worse it scores

    monkeypatch.setattr(levels, "Fitness", HeldOutPrefersStart)  # the held-out fitness is built in levels
    model, start = _down_proj_problem()
    cfg = CompressConfig(method="wanda", sparsity=0.5, alloc=AllocConfig(method="cap", budget=0.5))
    _, info = cap.allocate(model, cfg, ids(8, 32), steps=10, samples=8, span=0.3, start=start)
    assert info["final_loss"] < info["start_loss"] and info["kept"] == "start"
    for m in matrices(model):
        if "down_proj" in m.name:
            assert abs(1 - info["per_matrix"][m.key]["sparsity"] - 0.2) <= 2 / m.d_in, m.key


def test_select_takes_the_path_plan_that_generalises_best():
    """Validation early stopping: of the path's plans that fit no worse than the start, the one with the lowest
    held-out loss, if it beats the start there; without held-out windows, the last such plan."""
    from slr.allocate.levels import select

    start, a, b, c, d = (torch.tensor([i]) for i in range(5))
    fit = {0: 1.0, 1: 0.9, 2: 0.8, 3: 1.1, 4: 0.7}  # c fits worse than the start
    held = {0: 1.0, 1: 0.95, 2: 0.85, 3: 0.1, 4: 0.9}  # b generalises best; d (the last) has overfitted

    def f(x):
        return fit[int(x)]

    class Held:  # a held-out fitness on 4 windows
        ids = torch.zeros(4, 8)

        def __call__(self, x):
            return held[int(x)]

    hf = Held()
    x, take, out = select(f, hf, start, [a, b, c, d])
    assert take and int(x) == 2 and out["path_chosen"] == 1 and out["final_loss"] == 0.8
    assert out["heldout_final_loss"] == 0.85 and out["heldout_start_loss"] == 1.0 and out["heldout_windows"] == 4
    assert out["path_losses"] == [0.9, 0.8, 1.1, 0.7] and out["path_heldout"] == [0.95, 0.85, None, 0.9]
    x, take, _ = select(f, None, start, [a, b, c, d])
    assert take and int(x) == 4
    held.update({1: 1.2, 2: 1.3, 4: 1.1})  # every candidate generalises worse than the start
    x, take, out = select(f, hf, start, [a, b, c, d])
    assert not take and int(x) == 0 and out["final_loss"] == 0.7 and out["path_chosen"] is None
    x, take, _ = select(f, hf, start, [])
    assert not take and int(x) == 0


def test_level_allocator_option_errors():
    model = tiny_model("llama")
    for a in ("cap", "search"):
        cfg = CompressConfig(method="wanda", sparsity=0.5, alloc=AllocConfig(method=a, budget=0.5))
        with pytest.raises(SLRError, match="levels=4 must be odd"):
            make_plan(model, cfg, ids(4, 16), levels=4)


def test_rpca_pools_rebuild_l_plus_the_rows_top_s_entries():
    """RPCA pools (the paper's): all directions and entries give L + S; k per row keep each row's k largest |S|."""
    from slr.solvers.rpca import rpca_pools

    W = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    m = Matrix(0, "x", W)
    p = make_pools(m, None, "slr", "rpca", 0.5, 5)
    rp = rpca_pools(W, iters=5)
    L = (rp.U * rp.sigma) @ rp.Vt
    S = torch.zeros(W.numel()).index_put_((rp.index.long(),), rp.values).view_as(W)
    torch.testing.assert_close(p.rebuild(m, p.sigma.numel(), m.numel), L + S, rtol=1e-5, atol=1e-5)
    out = p.rebuild(m, p.sigma.numel(), 2 * m.d_out) - L  # [m, n]: S's kept entries
    for i in range(m.d_out):
        row = S[i].abs()
        want = row.topk(min(2, int((row > 0).sum()))).indices
        assert set(out[i].nonzero().flatten().tolist()) == set(want.tolist()), i


def test_cap_builds_its_whitened_pools_in_the_knapsack_starts_pass(monkeypatch):
    """With the knapsack start, CAP's full-H pools come from the knapsack's own whitened pass (one pass in all), and
    the plan is the one CAP reaches when handed the same start and building its pools in a pass of its own."""
    from slr.allocate import cap, knapsack

    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, alloc=AllocConfig(method="cap", budget=0.5))
    kw = dict(steps=3, samples=4)
    passes = []
    for mod in (cap, knapsack):
        real = mod.whitened_metrics
        monkeypatch.setattr(mod, "whitened_metrics", lambda *a, _r=real, **k: passes.append(1) or _r(*a, **k))
    plan, info = cap.allocate(model, cfg, ids(8), **kw)
    assert len(passes) == 1 and info["metric"] == "full H" and info["init"] == "knapsack"
    start, _ = knapsack.allocate(model, cfg, ids(8), span=info["span"])
    passes.clear()
    plan2, _ = cap.allocate(model, cfg, ids(8), start=start, **kw)
    assert len(passes) == 1 and plan2.specs == plan.specs


def test_fitness_rebuilds_only_what_changed_and_scores_the_same():
    """Fitness rebuilds only the matrices whose level changed since the last plan; every loss equals the loss of the
    same plan scored from a model rebuilt in full."""
    from slr.allocate import cap, levels

    model, start = _down_proj_problem()
    cfg = CompressConfig(method="wanda", sparsity=0.5, alloc=AllocConfig(method="cap", budget=0.5))
    st = cap.prepare(model, cfg, ids(8, 32), "cpu", "CAP", pools="whitened", levels=5, span=0.3, init="knapsack",
                     start=start, mode=None)
    fit = levels.Fitness(model, st.space, ids(8, 32), "cpu", 4, 32, 4)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 5, (st.space.variables,), generator=g) for _ in range(4)]
    with st.swapping():
        seq = [fit(x) for x in xs]
        fresh = []
        for x in xs:
            st.space.loaded.clear()
            fresh.append(fit._loss(st.space.resolve(x)))
    assert seq == pytest.approx(fresh, rel=1e-6) and len(set(seq)) == 4
    assert not st.space.loaded  # the swap restored the dense weights and forgot the levels
