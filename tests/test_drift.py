"""Drift correction (slr.drift): the least-squares target, the paired statistics, and the pipeline (tiny random
models only)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_cli import run

from slr import pipeline
from slr.calibration import HessianCollector, block_forward, capture_inputs
from slr.cli import build_parser, compress_request
from slr.config import CompressConfig
from slr.drift import CrossCollector, corrected, drift_map
from slr.errors import SLRError
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.pipeline import compress_


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calib(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(seed))


def test_corrected_target_is_the_least_squares_fit_of_the_dense_outputs():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 400, 24, 10
    Xd = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    Xc = Xd + 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64)  # the drifted inputs
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    M = drift_map(Xc.T @ Xc / n, Xd.T @ Xc / n, damp=1e-12)
    best = torch.linalg.lstsq(Xc, Xd @ W.T).solution.T  # argmin ||Xc What^T - Xd W^T||
    torch.testing.assert_close(corrected(W, M, 1.0), best, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(corrected(W, M, 0.25), W + 0.25 * (best - W), rtol=1e-8, atol=1e-8)
    assert torch.equal(corrected(W, M, 0.0), W)
    # where the paths agree the map is the identity, with or without damping
    torch.testing.assert_close(drift_map(Xd.T @ Xd / n, Xd.T @ Xd / n), torch.eye(d_in, dtype=torch.float64))


def test_cross_collector_pairs_the_two_paths_windows():
    model = tiny_model("llama")
    ad = get_adapter(model)
    inputs = capture_inputs(model, ad, calib(), 4, "cpu")
    block = ad.blocks(model)[0]
    lin = ad.linears(block)
    groups = [g for g in ad.groups if all(n in lin for n in g)]
    cc = CrossCollector(lin, groups)
    with torch.no_grad():
        for h in inputs.hidden:
            cc.add(block, inputs, 0, h, h)  # the same inputs on both paths: C = H
    C = cc.finish()
    hc = HessianCollector(lin, groups)
    for h in inputs.hidden:
        hc.forward(block, inputs, 0, h)
    H = hc.finish()
    for g in groups:
        torch.testing.assert_close(C[g], H[g], rtol=1e-6, atol=1e-7)
    # different paths: C = X_d^T X_c, with X_d from the second argument
    seen = []
    hook = lin[groups[0][0]].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    cc = CrossCollector(lin, groups)
    with torch.no_grad():
        cc.add(block, inputs, 0, inputs.hidden[0], inputs.hidden[0] + 0.1 * torch.randn_like(inputs.hidden[0]))
    hook.remove()
    C = cc.finish()[groups[0]]
    torch.testing.assert_close(C, (seen[1].T @ seen[0]).double() / seen[0].shape[0], rtol=1e-5, atol=1e-6)


def _logit_error(model, dense, x) -> float:
    with torch.no_grad():
        return float((model(x).logits - dense(x).logits).pow(2).mean())


@pytest.mark.parametrize("method,kw", [("sparsegpt", {"pattern": "2:4"}), ("admm", {"pattern": "2:4", "rank": 4})])
def test_drift_correction_brings_the_compressed_model_closer_to_the_dense_one(method, kw):
    dense = tiny_model("llama")
    x = calib()
    errs = {}
    for a in (0.0, 1.0):
        m = copy.deepcopy(dense)
        rep = compress_(m, CompressConfig(method=method, drift_correction=a, **kw), x, batch_size=4, progress=False)
        errs[a] = _logit_error(m, dense, x)
        if a:
            assert rep.seconds["drift"] > 0
    assert errs[1.0] < 0.9 * errs[0.0]  # measured: 0.74x (sparsegpt), 0.77x (admm) on these windows


def test_block_0_sees_the_plain_target_and_later_blocks_the_corrected_one(monkeypatch):
    seen = {}
    real = pipeline._solve_block

    def spy(i, linears, groups, Hs, config, plan, data_free, group, kill, maps=None):
        seen[i] = {n: linears[n].weight.detach().clone() for n in linears}, maps
        return real(i, linears, groups, Hs, config, plan, data_free, group, kill, maps)

    monkeypatch.setattr(pipeline, "_solve_block", spy)
    compress_(tiny_model("llama"), CompressConfig(method="sparsegpt", pattern="2:4", drift_correction=1.0), calib(),
              batch_size=4, progress=False)
    for M in seen[0][1].values():  # block 0: both paths are the same, so W* = W
        torch.testing.assert_close(M, torch.eye(M.shape[0], dtype=M.dtype), rtol=0, atol=1e-9)
    assert any((M - torch.eye(M.shape[0], dtype=M.dtype)).abs().max() > 1e-3 for M in seen[1][1].values())


def test_drift_correction_flag_and_bad_values(capsys, tmp_path):
    a = build_parser().parse_args(["compress", "m", "--method", "sparsegpt", "--drift-correction", "0.5"])
    assert compress_request(a)[1].drift_correction == 0.5
    with pytest.raises(SLRError, match=r"--drift-correction 1.5 is outside \[0, 1\]"):
        CompressConfig(method="sparsegpt", drift_correction=1.5)
    with pytest.raises(SLRError, match="need calibration windows"):
        CompressConfig(method="sparsegpt", drift_correction=1.0, calib_samples=0)
    code, _, err = run(capsys, "compress", "some-model", "--method", "sparsegpt", "--drift-correction", "-1")
    assert code == 2 and "outside [0, 1]" in err and "Traceback" not in err
    with pytest.raises(SLRError, match="--drift-correction keeps the dense path's activations in memory"):
        compress_(tiny_model("llama"), CompressConfig(method="sparsegpt", drift_correction=1.0), calib(),
                  batch_size=4, progress=False, offload_activations=str(tmp_path / "act"))


def test_drift_correction_survives_resume(tmp_path):
    """A run resumed after block 0 corrects block 1 exactly as the uninterrupted run did (the dense path is carried
    through the resumed block)."""
    from slr.checkpoint import BlockCheckpoints

    dense = tiny_model("llama")
    cfg = CompressConfig(method="sparsegpt", pattern="2:4", drift_correction=1.0)
    full = copy.deepcopy(dense)
    ck = BlockCheckpoints(tmp_path / "ck", {"t": 1}, resume=False)
    compress_(full, cfg, calib(), batch_size=4, progress=False, checkpoints=ck)
    ck = BlockCheckpoints(tmp_path / "ck", {"t": 1}, resume=True)
    for f in ck._files(1):
        f.unlink()
    again = copy.deepcopy(dense)
    compress_(again, cfg, calib(), batch_size=4, progress=False, checkpoints=ck)
    a, b = full.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_block_forward_is_unchanged_by_the_collector():
    """The collector's hooks stop the forward early but leave no hook behind."""
    model = tiny_model("llama")
    ad = get_adapter(model)
    inputs = capture_inputs(model, ad, calib(), 4, "cpu")
    block = ad.blocks(model)[0]
    lin = ad.linears(block)
    before = block_forward(block, inputs, 0, inputs.hidden[0])
    cc = CrossCollector(lin, [g for g in ad.groups if all(n in lin for n in g)])
    cc.add(block, inputs, 0, inputs.hidden[0], inputs.hidden[0])
    cc.finish()
    assert torch.equal(block_forward(block, inputs, 0, inputs.hidden[0]), before)
