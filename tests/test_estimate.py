"""The memory estimate's phases on a tiny model: each mode adds what slr.estimate models, and only that."""

from __future__ import annotations

import pytest

from slr import estimate as E
from slr.estimate import describe, estimate_run
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model

W, L = 16, 32  # calibration windows, seqlen


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def sizes(model):
    ad = get_adapter(model)
    lins = [m.weight for b in ad.blocks(model) for m in ad.linears(b).values()]
    block = sum(m.weight.numel() for m in ad.linears(ad.blocks(model)[0]).values())
    return sum(w.numel() for w in lins), block


def test_total_is_the_largest_phase(model):
    for kw in ({}, {"rebuild": False}, {"onload": True}, {"allocate": "cap"}, {"refine": "tm"}):
        est = estimate_run(model, W, L, **kw)
        assert est["total"] == max(est["phases"].values())
        assert "estimated peak memory" in describe(est)
    assert "evaluate" not in estimate_run(model, W, L, rebuild=False)["phases"]
    assert "capture" not in estimate_run(model, 0, L)["phases"]  # data-free: no calibration forward


def test_tm_adds_targets_graph_and_state(model):
    d, n_block = 64, sizes(model)[1]
    plain = estimate_run(model, W, L, rebuild=False)
    tm = estimate_run(model, W, L, rebuild=False, refine="tm")
    targets = W * L * d * 4
    graph = E.backward_bytes(8 * L, d, 128)  # chunk of min(TM batch 8, pipeline batch 8, windows) windows
    state = E.TM_STATE_COPIES * n_block * 4
    assert tm["block_parts"]["TM targets (every window, fp32)"] == targets
    assert tm["phases"]["blocks"] - plain["phases"]["blocks"] == targets + graph + state
    assert tm["total"] > plain["total"]
    # the targets are kept for every window (also with activations on disk); tm_samples only shrinks the chunk
    few = estimate_run(model, W, L, rebuild=False, refine="tm", tm_samples=2)
    assert tm["phases"]["blocks"] - few["phases"]["blocks"] == E.backward_bytes(6 * L, d, 128)
    off = estimate_run(model, W, L, rebuild=False, refine="tm", offload_activations=True)
    assert off["block_parts"]["TM targets (every window, fp32)"] == targets
    dense = estimate_run(model, W, L, rebuild=False, refine="tm", tm_dense_targets=True)
    assert dense["phases"]["blocks"] - tm["phases"]["blocks"] == targets  # the dense path's copy of the activations
    # more windows, more targets
    assert estimate_run(model, 4 * W, L, rebuild=False, refine="tm")["total"] > tm["total"]
    assert estimate_run(model, 0, L, refine="tm")["phases"] == estimate_run(model, 0, L)["phases"]  # no data, no TM


def test_knapsack_and_cap_add_their_allocation_phase(model):
    n_lin = sizes(model)[0]
    plain = estimate_run(model, W, L, rebuild=False)
    base = plain["model"] + plain["runtime"]
    ks = estimate_run(model, W, L, rebuild=False, allocate="knapsack")
    fisher = E.fisher_bytes(L, 128, 64, 128, 2)
    assert ks["allocate"] == max(fisher, E.head_bytes(4 * L, 128, 1) + E.forward_workspace_bytes(4, L, 4, 128))
    assert ks["phases"]["allocate"] == base + ks["allocate"]
    assert {k: v for k, v in ks["phases"].items() if k != "allocate"} == plain["phases"]
    cap = estimate_run(model, W, L, rebuild=False, allocate="cap")
    assert cap["pools"] == E.CAP_POOL_BYTES_PER_PARAM * n_lin
    loss = E.head_bytes(4 * L, 128, 3)
    assert cap["allocate"] == cap["pools"] + max(ks["allocate"], loss)
    assert cap["phases"]["allocate"] > ks["phases"]["allocate"] > base
    assert "CAP pools" in describe(cap)
    # the Fisher pass grows with the sequence length, the pools with the parameters only
    assert estimate_run(model, W, 4 * L, allocate="knapsack")["allocate"] > ks["allocate"]
    free = estimate_run(model, 0, L, allocate="cap")  # data-free CAP: pools only
    assert free["allocate"] == free["pools"]
    assert "allocate" not in estimate_run(model, 0, L, allocate="knapsack")
    for a in ("uniform", "owl"):
        assert estimate_run(model, W, L, rebuild=False, allocate=a)["phases"] == plain["phases"]


def test_onload_and_evaluation_phases(model):
    mem = estimate_run(model, W, L)
    eval_ws = E.head_bytes(4 * 512, 128, 3) + E.forward_workspace_bytes(4, 512, 4, 128)
    leftover = 32 * (3 * 64 ** 2 + 128 ** 2) + W * L * 64 * 4  # eigen-caches of the 4 input groups, activations
    assert mem["phases"]["evaluate"] == mem["model"] + mem["runtime"] + mem["compressed"] + leftover + eval_ws
    on = estimate_run(model, W, L, onload=True)
    streamed = estimate_run(model, W, L, onload=True, rebuild=False)
    assert "capture" not in on["phases"] and on["model"] < mem["model"]
    assert on["phases"]["final"] > streamed["phases"]["final"]  # rebuilt and evaluated vs streamed
    assert "with onloading" in describe(on) and "streamed save" in describe(streamed)
    off = estimate_run(model, W, L, onload=True, offload_activations=True)
    assert off["phases"]["blocks"] < on["phases"]["blocks"]


def test_the_search_on_solved_levels_counts_its_recorded_block_inputs(model):
    from slr.allocate import allocator
    from slr.allocate.search import recorded_tokens
    from slr.options import make_options

    opts = make_options(allocator("search").options, {"pools": "solved", "windows": 8, "tokens": 256,
                                                      "screen_windows": 2, "survivors": 4}, flag="--alloc-opt",
                        what="the search allocator")
    # parent + 4 survivors on 8 windows, the parent on 2 screening windows, one plan on 8 held-out windows
    assert recorded_tokens(opts, 128) == (5 * 8 + 2 + 8) * 256
    assert recorded_tokens(opts, 12) == (5 * 8 + 2 + 4) * 256  # only 4 windows left for the held-out fitness
    assert recorded_tokens(opts, 0) == 0  # data-free: no forward to record
    for off in ({"prefix": False}, {"pools": "whitened"}):  # no prefix reuse
        assert recorded_tokens(make_options(allocator("search").options, {"pools": "solved", **off},
                                            flag="--alloc-opt", what="the search allocator"), 128) == 0
    search = estimate_run(model, W, L, rebuild=False, allocate="search", solved=True)
    rec = estimate_run(model, W, L, rebuild=False, allocate="search", solved=True, prefix_tokens=1000)
    assert rec["allocate"] - search["allocate"] == rec["prefix records"] == 1000 * 64 * 2 * 4  # d_model 64, 2 blocks
    assert "recorded block inputs" in describe(rec) and "recorded" not in describe(search)
    assert estimate_run(model, W, L, rebuild=False, allocate="cap", solved=True,
                        prefix_tokens=1000)["allocate"] == search["allocate"]  # CAP records nothing
