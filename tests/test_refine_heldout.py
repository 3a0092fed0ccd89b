"""Transformer matching judged on held-out windows, pure pruning's support under TM, and the paper preset (tiny
random models only)."""

from __future__ import annotations

import json
from dataclasses import replace
from unittest import mock

import pytest
import torch
from test_cli import run

from slr import pipeline
from slr.calibration import block_forward, capture_inputs
from slr.cli import build_parser, compress_request
from slr.config import TM_PRESETS, CompressConfig, RefineConfig
from slr.errors import SLRError
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.nn import SLRLinear
from slr.pipeline import compress_
from slr.refine import make_refiner, split_windows, transformer_match_

N, BATCH, SEQLEN = 16, 4, 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calib(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def pruned_block(n: int = N):
    """Block 0 of a tiny llama, its calibration inputs (batches of BATCH windows) and its dense outputs; then every
    linear of the block is magnitude-pruned in place to half its weights (a plain nn.Linear with zeros)."""
    model = tiny_model("llama")
    ad = get_adapter(model)
    inputs = capture_inputs(model, ad, calib(n), BATCH, "cpu")
    block = ad.blocks(model)[0]
    with torch.no_grad():
        dense = [block_forward(block, inputs, 0, h) for h in inputs.hidden]
        for lin in ad.linears(block).values():
            w = lin.weight
            w.mul_(w.abs() >= w.abs().median(dim=1, keepdim=True).values)
    return block, inputs, dense


def state(block) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in block.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def noise_targets(dense: list[torch.Tensor], held_batches: int) -> list[torch.Tensor]:
    """Training batches get random targets unrelated to the block; the last ``held_batches`` keep the true ones."""
    g = torch.Generator().manual_seed(3)
    k = len(dense) - held_batches
    return [torch.randn(y.shape, generator=g) * y.std() for y in dense[:k]] + dense[k:]


OVERFIT = RefineConfig(lr=1e-2, final_lr_frac=1.0, epochs=6, batch_size=BATCH)


# ---- (a) pure pruning keeps its support -----------------------------------------------------------------------

@pytest.mark.parametrize("materialize", ["slr", "dense"])
def test_tm_pure_pruning_keeps_zeros_exactly(materialize):
    """Magnitude pruning + TM (held-out judging on): every pruned weight is exactly zero after TM, no kept weight is
    lost or gained, and TM did change (and keep) the kept weights."""
    refiner = make_refiner(RefineConfig(lr=1e-3, epochs=4, batch_size=4), progress=False)
    seen = []

    def weights(block):
        out = {}
        for name, mod in block.named_modules():
            if isinstance(mod, SLRLinear):
                assert mod.rank == 0
                out[name] = (mod.mask().clone(), mod.to_dense().detach().clone())
            elif isinstance(mod, torch.nn.Linear):
                out[name] = (mod.weight != 0, mod.weight.detach().clone())
        return out

    def refine(block, index, inputs, targets):
        before = weights(block)
        with torch.no_grad():
            stats = refiner(block, index, inputs, targets)
        seen.append((before, weights(block), stats))

    refine.stats = refiner.stats
    conf = CompressConfig(method="magnitude", sparsity=0.6, refine=refiner.cfg)
    with mock.patch.object(pipeline, "make_refiner", lambda *a, **k: refine):
        compress_(tiny_model("llama"), conf, calib(), materialize=materialize, batch_size=8)
    assert len(seen) == 2
    for before, after, stats in seen:
        assert stats["heldout_windows"] == 2 and not stats["restored"]
        assert stats["heldout_loss_after"] < stats["heldout_loss_before"]
        assert before.keys() == after.keys() and len(before) == 7
        changed = 0
        for name, (keep, w0) in before.items():
            keep1, w1 = after[name]
            assert torch.equal(keep, keep1), name  # the support (kept count included) is unchanged
            assert int(keep.sum()) == int(keep1.sum()) < keep.numel()
            assert torch.count_nonzero(w1[~keep]) == 0, f"{name}: a pruned weight came back"
            assert torch.count_nonzero(w1) == int(keep.sum()), name  # and no kept weight became zero
            changed += not torch.equal(w0, w1)
        assert changed == len(before), "TM trains every pruned linear's kept weights"


# ---- (b) held-out judging -------------------------------------------------------------------------------------

def test_heldout_catches_overfitting_and_restores_bit_identically():
    """Training windows with random targets: TM lowers their loss but moves the block away from the held-out
    windows' true outputs, so the original parameters come back bit for bit."""
    block, inputs, dense = pruned_block()
    targets = noise_targets(dense, held_batches=1)
    s0 = state(block)
    st = transformer_match_(block, 0, inputs, targets, replace(OVERFIT, heldout=BATCH),
                            progress=False)
    assert st["windows"] == N - BATCH and st["heldout_windows"] == BATCH and st["steps"] > 0
    assert min(st["epoch_losses"][1:]) < st["epoch_losses"][0], "the training loss falls"
    h = st["heldout_losses"]
    assert len(h) == OVERFIT.epochs and min(h[1:]) > h[0], "the held-out loss rises"
    assert st["restored"] and st["kept_epoch"] == 0
    assert st["heldout_loss_before"] == st["heldout_loss_after"] == h[0] > 0
    assert st["loss_after"] == st["loss_before"]
    assert same(s0, block.state_dict()), "a restored block is bit-identical"


def test_heldout_improves_and_best_parameters_are_kept():
    block, inputs, dense = pruned_block()
    s0 = state(block)
    st = transformer_match_(block, 0, inputs, dense, RefineConfig(lr=1e-3, epochs=5, batch_size=BATCH),
                            progress=False)
    assert st["heldout_windows"] == 2 and st["windows"] == N - 2  # the default: max(1, 16 // 8)
    h = st["heldout_losses"]
    assert not st["restored"] and st["heldout_loss_after"] < st["heldout_loss_before"] == h[0]
    assert st["heldout_loss_after"] == min(h[1:]) and h[st["kept_epoch"] - 1] == min(h[1:])
    assert st["loss_after"] < st["loss_before"]
    assert not same(s0, block.state_dict())
    # the kept parameters are the ones the stats describe: re-measure the held-out windows
    with torch.no_grad():
        out = block_forward(block, inputs, 0, inputs.hidden[-1])[2:]
    assert float(((out - dense[-1][2:]) ** 2).mean()) == pytest.approx(st["heldout_loss_after"], rel=1e-5)


def test_heldout_keeps_the_best_epoch_not_the_last():
    """Training targets = true outputs + noise: the held-out loss falls after epoch 1, then TM fits the noise and it
    ends above the original's. The epoch-1 parameters are kept (not the last ones, not the original)."""
    block, inputs, dense = pruned_block()
    g = torch.Generator().manual_seed(3)
    targets = [y + torch.randn(y.shape, generator=g) * y.std() * 0.3 for y in dense[:3]] + dense[3:]
    st = transformer_match_(block, 0, inputs, targets, RefineConfig(lr=1e-3, final_lr_frac=1.0, epochs=8,
                                                                    batch_size=BATCH, heldout=4), progress=False)
    h = st["heldout_losses"]
    assert h[-1] > h[0] > h[1] == min(h), "falls, then rises above the start"
    assert not st["restored"] and st["kept_epoch"] == 2 and st["heldout_loss_after"] == h[1]
    with torch.no_grad():  # the block holds the kept parameters
        out = block_forward(block, inputs, 0, inputs.hidden[-1])
    assert float(((out - dense[-1]) ** 2).mean()) == pytest.approx(h[1], rel=1e-5)


def test_heldout_windows_are_the_last_ones_and_never_trained_on():
    """16 windows, max_samples 8, heldout 4: TM trains on windows 0-7 and judges on 12-15. Windows 8-11 have NaN
    targets (unused: every loss stays finite); held-out NaN targets do not reach training but fail the judge."""
    block, inputs, dense = pruned_block()
    targets = [*dense[:2], torch.full_like(dense[2], float("nan")), dense[3]]
    st = transformer_match_(block, 0, inputs, targets, RefineConfig(lr=1e-3, epochs=3, batch_size=BATCH,
                                                                    max_samples=8, heldout=4), progress=False)
    assert st["windows"] == 8 and st["heldout_windows"] == 4 and st["steps"] == 2 * 2
    assert all(x == x for x in st["epoch_losses"] + st["heldout_losses"]) and not st["restored"]

    block, inputs, dense = pruned_block()
    s0 = state(block)
    targets = [*dense[:3], torch.full_like(dense[3], float("nan"))]
    st = transformer_match_(block, 0, inputs, targets, RefineConfig(lr=1e-3, epochs=3, batch_size=BATCH,
                                                                    heldout=4), progress=False)
    assert st["windows"] == 12 and all(x == x for x in st["epoch_losses"])
    assert st["restored"] and same(s0, block.state_dict())


def test_split_rule():
    """(training, held-out) windows of n: the default holds out max(1, n // 8) (none of one window), taken from the
    end; max_samples then limits the rest."""
    cases = {(16, None, None): (14, 2), (2, None, None): (1, 1), (1, None, None): (1, 0), (0, None, None): (0, 0),
             (128, None, None): (112, 16), (128, 16, None): (16, 16), (128, 128, None): (112, 16),
             (16, None, 0): (16, 0), (16, 4, 0): (4, 0), (16, 14, 4): (12, 4), (16, None, 16): (0, 16)}
    for (n, ms, h), want in cases.items():
        assert split_windows(n, RefineConfig(max_samples=ms, heldout=h)) == want, (n, ms, h)


# ---- (c) heldout = 0 is the judging on the training windows -----------------------------------------------------

def test_heldout_zero_judges_on_the_training_windows():
    """The overfitting case with heldout=0: every window trains, the training loss judges, so TM is kept."""
    block, inputs, dense = pruned_block()
    targets = noise_targets(dense, held_batches=1)
    s0 = state(block)
    st = transformer_match_(block, 0, inputs, targets, replace(OVERFIT, heldout=0),
                            progress=False)
    assert st["windows"] == N and st["heldout_windows"] == 0 and st["steps"] == (OVERFIT.epochs - 1) * N // BATCH
    assert st["heldout_loss_before"] is None and st["heldout_loss_after"] is None and st["heldout_losses"] == []
    assert not st["restored"] and st["loss_after"] < st["loss_before"]
    assert not same(s0, block.state_dict())
    # divergence is still caught on the training windows
    block, inputs, dense = pruned_block()
    s0 = state(block)
    st = transformer_match_(block, 0, inputs, dense, RefineConfig(lr=5.0, epochs=3, heldout=0), progress=False)
    assert st["restored"] and st["loss_after"] == st["loss_before"] and same(s0, block.state_dict())


# ---- (d) errors -------------------------------------------------------------------------------------------------

def test_heldout_errors():
    with pytest.raises(SLRError, match=r"--tm-heldout -1 is negative -- fix: pass --tm-heldout N with N >= 0"):
        RefineConfig(heldout=-1)
    with pytest.raises(SLRError, match="--tm-heldout 8 leaves none of the 8 calibration windows"):
        CompressConfig(method="wanda", calib_samples=8, refine=RefineConfig(heldout=8))
    assert CompressConfig(method="wanda", calib_samples=8, refine=RefineConfig(heldout=7)).refine.heldout == 7
    with pytest.raises(SLRError, match="unknown transformer-matching preset 'papr' -- fix: use one of: paper"):
        RefineConfig.preset("papr")
    with pytest.raises(SLRError, match="wrong type"):
        CompressConfig.from_dict({"method": "wanda", "refine": {"heldout": "2"}})
    block, inputs, dense = pruned_block()
    s0 = state(block)
    with pytest.raises(SLRError, match="--tm-heldout 16 leaves no window for transformer matching to train on "
                                       "\\(block 0 has 16 calibration windows\\)"):
        transformer_match_(block, 0, inputs, dense, RefineConfig(heldout=16), progress=False)
    assert same(s0, block.state_dict())


def test_heldout_cli_errors_are_one_line(capsys):
    code, _, err = run(capsys, "compress", "some-model", "--method", "wanda", "--refine", "tm", "--tm-heldout", -2)
    assert code == 2 and err.strip().splitlines() == [
        "slr: error: --tm-heldout -2 is negative -- fix: pass --tm-heldout N with N >= 0 (0 = judge on the training "
        "windows)"]
    code, _, err = run(capsys, "compress", "some-model", "--method", "wanda", "--tm-heldout", 2)
    assert code == 2 and "add --refine tm" in err and len(err.strip().splitlines()) == 1


# ---- (e) the paper preset; CLI and TOML map to the same config ----------------------------------------------------

def test_paper_preset_values_and_overrides():
    p = RefineConfig.paper()
    assert (p.method, p.epochs, p.max_samples, p.lr, p.final_lr_frac, p.batch_size) == ("tm", 20, 128, 2e-5, 0.2, 8)
    assert p.heldout is None  # judging is ours, not the paper's: the default held-out rule
    assert RefineConfig.preset("paper") == p == RefineConfig.from_dict({"preset": "paper"})
    q = RefineConfig.paper(epochs=5, heldout=3)
    assert (q.epochs, q.heldout, q.max_samples, q.lr) == (5, 3, 128, 2e-5)
    assert TM_PRESETS["paper"]["max_samples"] == 128


def compress_config(*argv) -> CompressConfig:
    return compress_request(build_parser().parse_args(["compress", *map(str, argv)]))[1]


def test_cli_and_toml_map_to_the_same_refine_config(tmp_path):
    want = RefineConfig.paper(epochs=5, heldout=3)
    cli = compress_config("m", "--method", "wanda", "--refine", "tm", "--tm-preset", "paper", "--tm-epochs", 5,
                          "--tm-heldout", 3)
    assert cli.refine == want
    toml = tmp_path / "run.toml"
    toml.write_text('method = "wanda"\n[refine]\npreset = "paper"\nepochs = 5\nheldout = 3\n')
    assert compress_config("m", "--config", toml).refine == want
    toml.write_text('method = "wanda"\n[refine]\npreset = "paper"\nepochs = 9\n')
    assert compress_config("m", "--config", toml, "--tm-epochs", 5, "--tm-heldout", 3).refine == want  # flags win
    toml.write_text('method = "wanda"\n[refine]\nepochs = 5\nheldout = 3\n')
    assert compress_config("m", "--config", toml, "--tm-preset", "paper").refine == want  # explicit keys win
    assert compress_config("m", "--method", "wanda", "--refine", "tm", "--tm-heldout", 0).refine == RefineConfig(
        heldout=0)
    assert compress_config("m", "--method", "wanda", "--refine", "tm", "--tm-lr", 1e-4, "--tm-batch", 4).refine == (
        RefineConfig(lr=1e-4, batch_size=4))
    d = cli.to_dict()
    assert d["refine"]["heldout"] == 3 and "preset" not in d["refine"]  # the concrete values are recorded
    assert CompressConfig.from_dict(d) == cli


# ---- dense-path targets ------------------------------------------------------------------------------------------

class _Spy:
    """A refiner that records the targets compress_ hands it (and trains nothing)."""

    def __init__(self):
        self.stats, self.seen = [], {}

    def __call__(self, block, index, inputs, targets):
        self.seen[index] = ([t.clone() for t in targets], [h.clone() for h in inputs.hidden])


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_dense_targets_mix_in_the_dense_paths_outputs(tmp_path, a):
    import copy

    from slr.checkpoint import BlockCheckpoints

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ad = get_adapter(dense)
    x = calib()
    inputs = capture_inputs(dense, ad, x, BATCH, "cpu")
    path, h = [], inputs.hidden  # the dense model's own block outputs
    with torch.no_grad():
        for i, b in enumerate(ad.blocks(dense)):
            h = [block_forward(b, inputs, i, t) for t in h]
            path.append(h)
    cfg = CompressConfig(method="wanda", sparsity=0.5, refine=RefineConfig(epochs=1, dense_targets=a))
    for resume in (False, True):  # then again with block 0 taken from the first run's checkpoint
        ck = BlockCheckpoints(tmp_path / "ck", {"t": 1}, resume=resume)
        if resume:
            for f in ck._files(1):
                f.unlink()
        spy = _Spy()
        m = copy.deepcopy(dense)
        with mock.patch.object(pipeline, "make_refiner", lambda *args, s=spy, **kw: s):
            compress_(m, cfg, x, batch_size=BATCH, progress=False, checkpoints=ck)
        assert sorted(spy.seen) == ([1] if resume else [0, 1])
        for i, (targets, hidden) in spy.seen.items():
            with torch.no_grad():  # the pristine dense block on the compressed path's inputs
                own = [block_forward(ad.blocks(dense)[i], inputs, i, t) for t in hidden]
            for t, o, p in zip(targets, own, path[i]):
                torch.testing.assert_close(t, (1 - a) * o + a * p, rtol=1e-5, atol=1e-5)
        if a == 1.0:  # block 1's compressed-path inputs differ, so the two kinds of target do
            assert not torch.allclose(spy.seen[1][0][0], own[0], atol=1e-3)


def test_dense_targets_outside_0_1_is_one_line_error(capsys):
    with pytest.raises(SLRError, match=r"--tm-dense-targets 1.5 is outside \[0, 1\]"):
        RefineConfig(dense_targets=1.5)
    code, _, err = run(capsys, "compress", "some-model", "--method", "wanda", "--tm-dense-targets", 0.5)
    assert code == 2 and "add --refine tm" in err and "Traceback" not in err


def test_resume_of_a_run_saved_before_dense_targets_existed(tmp_path):
    from slr.checkpoint import BlockCheckpoints

    cfg = CompressConfig(method="admm", pattern="2:4", rank=32, refine=RefineConfig.paper())
    old = cfg.to_dict()
    del old["refine"]["dense_targets"]  # as an slr before the option wrote it
    BlockCheckpoints(tmp_path / "ck", {"config": old}, resume=False)
    BlockCheckpoints(tmp_path / "ck", {"config": cfg.to_dict()}, resume=True)  # its default reproduces that run
    with pytest.raises(SLRError, match=r"--resume with a changed run: config.refine.dense_targets differ"):
        BlockCheckpoints(tmp_path / "ck", {"config": replace(cfg, refine=RefineConfig.paper(dense_targets=0.5))
                                           .to_dict()}, resume=True)


def test_resume_keeps_the_tm_stats_of_the_finished_blocks(tmp_path):
    from slr.checkpoint import BlockCheckpoints

    x = calib()
    cfg = CompressConfig(method="wanda", sparsity=0.5, refine=RefineConfig(epochs=2, lr=1e-3))
    first = compress_(tiny_model("llama"), cfg, x, batch_size=BATCH, progress=False,
                      checkpoints=BlockCheckpoints(tmp_path / "ck", {"t": 1}, resume=False))
    ck = BlockCheckpoints(tmp_path / "ck", {"t": 1}, resume=True)
    for f in ck._files(1):
        f.unlink()
    again = compress_(tiny_model("llama"), cfg, x, batch_size=BATCH, progress=False, checkpoints=ck)
    assert [s["block"] for s in again.refine] == [0, 1]
    assert again.refine[0] == json.loads(json.dumps(first.refine[0]))  # block 0's, read back from its checkpoint
    assert again.refine[0]["heldout_loss_after"] < again.refine[0]["heldout_loss_before"]
