"""Logit distillation after compression (slr.distill), on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from test_cli import run
from test_refine_heldout import N, calib, one_thread  # noqa: F401  (one_thread: the module-wide 1-thread fixture)

from slr.cli import build_parser, compress_request
from slr.config import CompressConfig, DistillConfig
from slr.distill import _heldout_kl, distill_
from slr.errors import SLRError
from slr.models.adapters import get_adapter
from slr.models.tiny import tiny_model
from slr.nn import SLRLinear
from slr.pipeline import compress_
from slr.refine import split_windows


def compressed(family: str = "llama", materialize: str = "slr", **cfg):
    """(dense copy, model compressed in place by wanda at 70 % + the given config)."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    compress_(model, CompressConfig(method="wanda", sparsity=0.7, **cfg), calib(), batch_size=4, progress=False,
              materialize=materialize)
    return dense, model


def zeros(model) -> dict[str, torch.Tensor]:
    ad = get_adapter(model)
    out = {}
    for i, b in enumerate(ad.blocks(model)):
        for n, m in ad.linears(b).items():
            w = m.to_dense() if isinstance(m, SLRLinear) else m.weight
            out[f"{i}.{n}"] = (w.detach() == 0)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_distill_lowers_heldout_kl_and_keeps_the_support(family):
    dense, model = compressed(family)
    support = zeros(model)
    c = calib()
    cfg = DistillConfig(lr=3e-3, epochs=3, batch_size=4, heldout=4)
    blocks = get_adapter(model).blocks(model)
    before = _heldout_kl(model, dense, [c[i:i + 1] for i in range(N - 4, N)])
    stats = distill_(model, dense, c, blocks, cfg, progress=False)
    assert stats["kl_before"] == pytest.approx(before, rel=1e-5)
    assert not stats["restored"] and stats["kept_epoch"] >= 1
    assert stats["kl_after"] < 0.8 * stats["kl_before"]  # the update does the work: removing it fails here
    assert stats["steps"] == 3 * 3 and stats["windows"] == 12 and stats["heldout_windows"] == 4
    after = _heldout_kl(model, dense, [c[i:i + 1] for i in range(N - 4, N)])
    assert after == pytest.approx(stats["kl_after"], rel=1e-5)  # the kept parameters are the judged ones
    for k, z in zeros(model).items():
        assert not bool((support[k] & ~z).any()), k  # every pruned weight is still zero


def test_distill_keeps_zeros_of_in_place_pruned_linears():
    dense, model = compressed(materialize="dense")
    support = zeros(model)
    distill_(model, dense, calib(), get_adapter(model).blocks(model), DistillConfig(lr=3e-3, epochs=2, heldout=4),
             progress=False)
    for k, z in zeros(model).items():
        assert not bool((support[k] & ~z).any()), k  # every pruned weight is still zero


def test_distill_restores_the_original_when_it_does_not_help():
    dense, model = compressed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = distill_(model, dense, calib(), get_adapter(model).blocks(model),
                     DistillConfig(lr=10.0, final_lr_frac=1.0, epochs=2, heldout=4), progress=False)
    assert stats["restored"] and stats["kept_epoch"] == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compress_runs_distill_and_reports_it():
    model = tiny_model("llama")
    report = compress_(model, CompressConfig(method="wanda", sparsity=0.7,
                                             distill=DistillConfig(lr=3e-3, epochs=1, heldout=2)),
                       calib(), batch_size=4, progress=False)
    assert report.distill["steps"] == 4 and report.distill["heldout_windows"] == 2
    assert "distill" in report.seconds


def test_split_windows():
    assert split_windows(128, DistillConfig()) == (112, 16)
    assert split_windows(128, DistillConfig(max_samples=32, heldout=8)) == (32, 8)
    assert split_windows(4, DistillConfig(heldout=0)) == (4, 0)


def test_flags_and_errors(tmp_path, capsys):
    p = build_parser()
    _, cfg, _ = compress_request(p.parse_args(["compress", "tiny-llama", "--method", "wanda", "--distill",
                                               "--kd-epochs", "3", "--kd-lr", "1e-4", "--kd-heldout", "2"]))
    assert cfg.distill == DistillConfig(lr=1e-4, epochs=3, heldout=2)
    assert CompressConfig.from_dict(cfg.to_dict()).distill == cfg.distill
    _, cfg, _ = compress_request(p.parse_args(["compress", "tiny-llama", "--method", "wanda", "--distill"]))
    assert cfg.distill == DistillConfig()
    with pytest.raises(SLRError, match="add --distill"):
        compress_request(p.parse_args(["compress", "tiny-llama", "--kd-epochs", "3"]))
    with pytest.raises(SLRError, match="calibration windows"):
        CompressConfig(method="wanda", calib_samples=4, distill=DistillConfig(heldout=4))
    with pytest.raises(SLRError, match="kd-lr"):
        DistillConfig(lr=0.0)
    code, _, err = run(capsys, "compress", "smollm2-135m", "--kd-lr", "1e-4", "--out", tmp_path / "o")
    assert code == 2 and "add --distill" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_distill_trains_scales_of_quantized_parts_and_keeps_codes(tmp_path):
    from slr import io

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    compress_(model, CompressConfig(method="gptq", bits=2, group_size=32), calib(), batch_size=4, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = distill_(model, dense, calib(), get_adapter(model).blocks(model),
                     DistillConfig(lr=1e-3, epochs=4, heldout=4, train_norms=False), progress=False)
    assert not stats["restored"] and stats["kl_after"] < 0.92 * stats["kl_before"]
    after = model.state_dict()
    assert after.keys() == before.keys()  # the trained scales went back into their buffers
    codes = [k for k in before if k.endswith("_codes")]
    scales = [k for k in before if k.endswith("S_scale")]
    assert codes and all(torch.equal(before[k], after[k]) for k in codes)
    assert any(not torch.equal(before[k], after[k]) for k in scales)
    assert all(torch.equal(before[k], after[k]) for k in before if "norm" in k)  # train_norms=False
    c = calib(4, seed=5)
    with torch.no_grad():
        ref = model(c).logits
    io.save(model, tmp_path / "a")
    loaded, _ = io.load(tmp_path / "a", packed=False)
    with torch.no_grad():
        assert torch.allclose(loaded(c).logits, ref, atol=1e-4, rtol=1e-4)


def test_distill_refuses_onloading():
    with pytest.raises(SLRError, match="whole model in one process"):
        compress_(tiny_model("llama"), CompressConfig(method="wanda", distill=DistillConfig()), calib(),
                  onload=object(), checkpoints=object(), progress=False)
