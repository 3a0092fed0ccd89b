"""The layer-sequential pipeline on tiny random models of every supported family: replacement, exact patterns and
budgets, data-free runs, low-rank and shared factors, per-matrix plans, Hessian statistics, propagation through the
compressed blocks, and per-layer block kwargs (Gemma 3 sliding/full attention)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from slr import CompressConfig, LayerSpec, Plan, SLRError, compress_
from slr.calibration import HessianCollector, block_forward, capture_inputs
from slr.models.adapters import get_adapter
from slr.models.tiny import FAMILIES, tiny_config, tiny_model
from slr.nn import SharedProjection, SLRLinear
from slr.solvers.magnitude import magnitude

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

VOCAB = 128  # tiny_config vocab_size


def random_ids(n: int = 8, L: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, L), generator=torch.Generator().manual_seed(seed))


def gemma_mixed(seed: int = 0):
    """Tiny Gemma 3 with one sliding-window and one full-attention layer: the two blocks get different kwargs
    (attention mask, local vs global RoPE) once sequences are longer than the window (32)."""
    cfg = tiny_config("gemma3_text")
    cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).float().eval()


def compressed_linears(model):
    ad = get_adapter(model)
    return [(i, n, lin) for i, b in enumerate(ad.blocks(model)) for n, lin in ad.linears(b).items()]


def assert_nm(mask: torch.Tensor, n: int, m: int):
    d_out, d_in = mask.shape
    assert (mask.reshape(d_out, d_in // m, m).sum(-1) == n).all()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


# ---- every family: SparseGPT 2:4 into SLRLinear ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_2of4_every_family(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    dense = {(i, n): lin.weight.detach().clone() for i, n, lin in compressed_linears(model)}
    calib = random_ids(8, 32)
    rep = compress_(model, CompressConfig(method="sparsegpt", sparsity=None, pattern="2:4"), calib,
                    batch_size=4, materialize="slr", progress=False, keep_results=True)
    lins = compressed_linears(model)
    assert len(lins) == len(ad.blocks(model)) * len(ad.linear_names)
    for i, n, lin in lins:
        assert isinstance(lin, SLRLinear), (i, n, type(lin))
        assert lin.nm == (2, 4) and lin.rank == 0
        assert_nm(lin.mask(), 2, 4)
        W = dense[(i, n)]
        assert (lin.out_features, lin.in_features) == tuple(W.shape)
        assert lin.nnz == W.numel() // 2
        res = rep.results[f"{i}.{n}"]
        assert torch.equal(lin.mask(), res.mask)
        torch.testing.assert_close(lin.to_dense(), res.dense(), rtol=0, atol=0)
    assert rep.retained_fraction == 0.5
    assert rep.retained_params * 2 == rep.dense_params == sum(W.numel() for W in dense.values())
    assert len(rep.records) == len(lins)
    for r in rep.records:
        assert r.spec == "2:4" and r.kept * 2 == r.shape[0] * r.shape[1] and r.rank == 0
        assert 0.0 < r.rel_error < 1.0
    out = logits(model, calib[:2])
    assert out.shape == (2, 32, VOCAB) and torch.isfinite(out).all()
    assert set(rep.seconds) >= {"capture", "hessian", "solve", "propagate"}


# ---- data-free and missing data -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_magnitude_without_calibration(family):
    model = tiny_model(family)
    dense = {(i, n): lin.weight.detach().clone() for i, n, lin in compressed_linears(model)}
    rep = compress_(model, CompressConfig(method="magnitude", sparsity=0.5), None, progress=False)
    for i, n, lin in compressed_linears(model):
        assert isinstance(lin, SLRLinear)
        W = dense[(i, n)]
        expected = magnitude(W, None, LayerSpec(sparsity=0.5))
        assert torch.equal(lin.mask(), expected.mask)
        torch.testing.assert_close(lin.to_dense(), expected.S, rtol=0, atol=0)
    assert rep.retained_fraction == 0.5
    for r in rep.records:  # no H: the weight-space (Frobenius) relative error
        W = dense[(r.block, r.name)].double()
        S = magnitude(W, None, LayerSpec(sparsity=0.5)).S.double()
        assert r.rel_error == pytest.approx(float(((W - S) ** 2).sum() / (W**2).sum()), rel=1e-9)
    assert torch.isfinite(logits(model, random_ids(2, 16))).all()


def test_magnitude_with_empty_calibration():
    model = tiny_model("llama")
    rep = compress_(model, CompressConfig(method="magnitude", pattern="4:8", sparsity=None),
                    torch.empty(0, 32, dtype=torch.long), progress=False)
    assert rep.retained_fraction == 0.5


@pytest.mark.parametrize("calib", [None, torch.empty(0, 32, dtype=torch.long)], ids=["none", "empty"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "admm"])
def test_data_methods_need_calibration(method, calib):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SLRError, match="needs calibration data"):
        compress_(model, CompressConfig(method=method, sparsity=0.5), calib, progress=False)
    for k, v in model.state_dict().items():  # nothing was touched
        assert torch.equal(v, before[k])


# ---- low rank: ADMM and the shared-V joint solver -------------------------------------------------------------


def test_admm_sparse_plus_low_rank():
    model = tiny_model("llama")
    cfg = CompressConfig(method="admm", sparsity=0.6, rank=4, solver={"max_iters": 10, "min_iters": 10,
                                                                           "polish_rounds": 1})
    rep = compress_(model, cfg, random_ids(8, 32), batch_size=4, progress=False)
    spec = LayerSpec(sparsity=0.6, rank=4)
    total = 0
    for _i, _n, lin in compressed_linears(model):
        assert isinstance(lin, SLRLinear)
        assert 0 < lin.rank <= 4 and lin.U.shape[1] == lin.rank and lin.V.shape[0] == lin.rank
        assert lin.shared is None
        assert lin.nnz == spec.kept(lin.out_features, lin.in_features)
        total += lin.num_params()
    assert rep.retained_params == total
    assert all(r.rank <= 4 and r.spec == "u60+r4" for r in rep.records)
    assert torch.isfinite(logits(model, random_ids(2, 16))).all()


def test_joint_shares_one_v_per_group():
    model = tiny_model("llama")
    ad = get_adapter(model)
    cfg = CompressConfig(method="joint", sparsity=1.0, rank=8)
    rep = compress_(model, cfg, random_ids(8, 32), batch_size=4, progress=False)
    total = 0
    for block in ad.blocks(model):
        lins = ad.linears(block)
        qkv = [lins[f"self_attn.{p}_proj"] for p in "qkv"]
        sp = qkv[0].shared
        assert isinstance(sp, SharedProjection) and sp.rank == 8 and sp.n_consumers == 3
        assert all(lin.shared is sp for lin in qkv)
        assert all(lin.V is None and lin.values is None and lin.rank == 8 for lin in qkv)
        gu = lins["mlp.gate_proj"].shared
        assert isinstance(gu, SharedProjection) and gu is not sp and lins["mlp.up_proj"].shared is gu
        for single in ("self_attn.o_proj", "mlp.down_proj"):  # a group of one keeps its own V
            assert lins[single].shared is None and lins[single].V.shape[0] == 8
        total += sum(lin.num_params() for lin in lins.values())
        # one x V^T per block forward for q, k and v together
        before = sp.n_computed
        with torch.no_grad():
            block_out = logits(model, random_ids(1, 8, seed=3))
        assert sp.n_computed - before == 1 and torch.isfinite(block_out).all()
    # V counted once per group: qkv = 8*64 + 8*(64+32+32), gate/up = 8*64 + 8*(128+128), o = 8*(64+64),
    # down = 8*(128+64) per block
    per_block = (8 * 64 + 8 * 128) + (8 * 64 + 8 * 256) + 8 * 128 + 8 * 192
    assert rep.retained_params == total == 2 * per_block


# ---- plans ----------------------------------------------------------------------------------------------------


def test_custom_plan_per_block():
    model = tiny_model("llama")
    ad = get_adapter(model)
    plan = Plan(default=LayerSpec(sparsity=0.75))
    for n in ad.linear_names:
        plan.set(0, n, LayerSpec(nm=(2, 4)))
    plan.set(1, "mlp.down_proj", LayerSpec(nm=(1, 4)))
    rep = compress_(model, CompressConfig(method="sparsegpt", sparsity=0.5), random_ids(8, 32), plan=plan,
                    batch_size=4, progress=False)
    for i, n, lin in compressed_linears(model):
        spec = plan.get(i, n)
        rec = next(r for r in rep.records if r.block == i and r.name == n)
        assert rec.spec == spec.label
        assert lin.nnz == rec.kept == spec.kept(lin.out_features, lin.in_features)
        if i == 0:
            assert lin.nm == (2, 4)
            assert_nm(lin.mask(), 2, 4)
        elif n == "mlp.down_proj":
            assert lin.nm == (1, 4)
            assert_nm(lin.mask(), 1, 4)
        else:
            assert (lin.mask().sum(1) > 0).all()
            assert lin.nnz == lin.out_features * lin.in_features // 4
    dense = sum(r.shape[0] * r.shape[1] for r in rep.records)
    assert rep.retained_params == sum(r.kept for r in rep.records)
    assert rep.retained_fraction == rep.retained_params / dense
    assert {r.spec for r in rep.records} == {"2:4", "1:4", "u75"}


# ---- Hessian statistics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_hessian_collector_stop_early_gives_the_same_h_and_skips_the_rest(family):
    """stop_early cuts each forward once every group's input is recorded: same H, and the last linear never runs."""
    model = tiny_model(family)
    ad = get_adapter(model)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(model, ad, ids, 2, "cpu")
    block = ad.blocks(model)[0]
    linears = ad.linears(block)
    groups = [g for g in ad.groups if all(n in linears for n in g)]
    last = groups[-1][0]
    ran = []
    hook = linears[last].register_forward_hook(lambda *_: ran.append(1))
    Hs = {}
    with torch.no_grad():
        for stop in (False, True):
            coll = HessianCollector(linears, groups, stop_early=stop)
            outs = [coll.forward(block, inputs, 0, h) for h in inputs.hidden]
            Hs[stop] = coll.finish()
            if stop:
                assert outs == [None] * len(outs)
            else:
                assert len(ran) == len(outs) and all(o is not None for o in outs)
    hook.remove()
    assert len(ran) == len(inputs.hidden)  # the stopped forwards never computed the last linear's output
    assert Hs[True].keys() == Hs[False].keys()
    for g in Hs[True]:
        assert torch.equal(Hs[True][g], Hs[False][g])


def test_hessian_collector_matches_hand_computed():
    model = tiny_model("llama")
    ad = get_adapter(model)
    block = ad.blocks(model)[1]
    linears = ad.linears(block)
    groups = list(ad.groups)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}

    def grab(name):
        def hook(_m, args, _o):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return hook

    hooks = [linears[n].register_forward_hook(grab(n)) for n in seen]
    coll = HessianCollector(linears, groups)
    with torch.no_grad():  # two batches of different sizes: the statistic must average over all tokens
        logits(model, random_ids(4, 24, seed=1))
        logits(model, random_ids(3, 24, seed=2))
    Hs = coll.finish()
    for h in hooks:
        h.remove()
    for name, group in (("self_attn.q_proj", groups[0]), ("mlp.down_proj", groups[3])):
        X = torch.cat(seen[name])  # [tokens, d_in]
        assert X.shape[0] == 7 * 24 == coll.n[group]
        ref = X.T @ X / X.shape[0]
        H = Hs[group]
        assert H.dtype == torch.float64 and H.shape == ref.shape
        assert float((H - ref).norm() / ref.norm()) < 1e-6
    # q, k and v read the same input, so one H serves the group
    torch.testing.assert_close(torch.cat(seen["self_attn.k_proj"]), torch.cat(seen["self_attn.q_proj"]))
    assert set(Hs) == set(groups)
    # finish() removed the hooks
    n_before = dict(coll.n)
    logits(model, random_ids(2, 8))
    assert coll.n == n_before


# ---- propagation and block kwargs -----------------------------------------------------------------------------


def _block_input_recorder(block, store: list):
    def pre(_m, args, kw):
        h = args[0] if args else kw["hidden_states"]
        store.append(h.detach().clone())
    return block.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_next_block_sees_compressed_outputs(family):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    ad = get_adapter(model)
    calib = random_ids(8, 32)
    seen: list[torch.Tensor] = []
    hook = _block_input_recorder(ad.blocks(model)[1], seen)
    compress_(model, CompressConfig(method="wanda", sparsity=0.5), calib, batch_size=4, progress=False)
    hook.remove()
    # block 1 ran on the two calibration batches for its H, then again to propagate them (before that, capture may
    # have run the dense model once per batch size); both rounds must see the *compressed* block 0's outputs
    assert len(seen) >= 4
    got = torch.cat(seen[-4:-2])
    torch.testing.assert_close(torch.cat(seen[-2:]), got, rtol=0, atol=0)

    def block1_inputs(m):
        store: list[torch.Tensor] = []
        h = _block_input_recorder(get_adapter(m).blocks(m)[1], store)
        with torch.no_grad():
            for s in range(0, len(calib), 4):
                logits(m, calib[s : s + 4])
        h.remove()
        return torch.cat(store)

    expected = block1_inputs(model)  # embeddings + compressed block 0, through the normal forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    dense_inputs = block1_inputs(ref)
    assert (got - dense_inputs).abs().max() > 1e-3  # not vacuous: block 0's compression changed its outputs


@pytest.mark.parametrize("family", list(FAMILIES) + ["gemma3_mixed"])
def test_capture_inputs_reproduce_block_outputs(family):
    """Running each block on the captured inputs with its captured kwargs reproduces the model's own forward."""
    model = gemma_mixed() if family == "gemma3_mixed" else tiny_model(family)
    ad = get_adapter(model)
    blocks = ad.blocks(model)
    calib = random_ids(6, 48)  # 48 > the Gemma sliding window (32); batches of 4 and 2
    inputs = capture_inputs(model, ad, calib, 4, "cpu")
    assert [h.shape[0] for h in inputs.hidden] == [4, 2]
    assert set(inputs.kwargs) == {(i, b) for i in range(len(blocks)) for b in (4, 2)}
    for kw in inputs.kwargs.values():
        assert "hidden_states" not in kw and kw.get("use_cache", False) is False
        assert all(kw.get(k) is None for k in ("past_key_value", "past_key_values"))
    outs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_hook(lambda _m, _a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        for s in (0, 4):
            logits(model, calib[s : s + 4])
    for h in hooks:
        h.remove()
    with torch.no_grad():
        hidden = inputs.hidden
        for i, block in enumerate(blocks):
            hidden = [block_forward(block, inputs, i, h) for h in hidden]
            torch.testing.assert_close(torch.cat(hidden), torch.cat(outs[i]), rtol=1e-5, atol=1e-5)
    if family == "gemma3_mixed":  # the kwargs really are per layer: block 1 with block 0's kwargs is wrong
        with torch.no_grad():
            h0 = block_forward(blocks[0], inputs, 0, inputs.hidden[0])
            wrong = blocks[1](h0, **inputs.kwargs[(0, 4)])
            wrong = wrong[0] if isinstance(wrong, tuple) else wrong
        assert (wrong - outs[1][0]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3_mixed"])
def test_gemma3_slr_matches_dense_materialization(family):
    model = gemma_mixed() if family == "gemma3_mixed" else tiny_model(family)
    twin = copy.deepcopy(model)
    calib = random_ids(8, 48)
    cfg = CompressConfig(method="sparsegpt", sparsity=None, pattern="2:4")
    rep = compress_(model, cfg, calib, batch_size=4, materialize="slr", progress=False)
    rep_d = compress_(twin, cfg, calib, batch_size=4, materialize="dense", progress=False)
    assert all(isinstance(lin, SLRLinear) for _, _, lin in compressed_linears(model))
    assert all(isinstance(lin, torch.nn.Linear) for _, _, lin in compressed_linears(twin))
    for (_, _, a), (_, _, b) in zip(compressed_linears(model), compressed_linears(twin), strict=True):
        torch.testing.assert_close(a.to_dense(), b.weight, rtol=1e-5, atol=1e-6)
        assert_nm(a.mask(), 2, 4)
        assert ((b.weight != 0) <= a.mask()).all()  # the dense twin is zero off the same 2:4 support
    assert rep.retained_fraction == rep_d.retained_fraction == 0.5
    ids = random_ids(3, 48, seed=9)
    a, b = logits(model, ids), logits(twin, ids)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
