"""The real default model (SmolLM2-135M, dequantized Q4_1 GGUF) through the Python API. Slow: ~2-4 min on CPU.

Uses the real default cache ($SLR_CACHE or ~/.cache/slr) and the session fixture ``smol`` from conftest.py.
"""

from __future__ import annotations

import copy
import math

import pytest

import slr
from slr.data.calib import calibration_windows, tokenize_text
from slr.data.corpora import wiki_text
from slr.models.adapters import get_adapter
from slr.nn import SLRLinear

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]

DENSE_QUICK_PPL = 23.1995  # PROTOCOL quick: wiki-sample test, first 64 windows of 512 tokens, no BOS


def test_smollm2_identity(smol):
    model, tok, info = smol
    assert info.name == "smollm2-135m" and info.bos_per_window is False
    assert model.config.model_type == "llama"
    ad = get_adapter(model)
    assert len(ad.blocks(model)) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_smollm2_dense_quick_ppl(smol):
    model, tok, _ = smol
    r = slr.perplexity(model, tok, wiki_text("test"), windows=64, batch_size=4, progress=False)
    assert r.windows == 64 and r.tokens == 64 * 511 and r.seqlen == 512
    assert r.ppl == pytest.approx(DENSE_QUICK_PPL, rel=1e-3)


def test_smollm2_wanda_2of4(smol):
    dense_model, tok, info = smol
    model = copy.deepcopy(dense_model)  # the session model stays dense
    calib = calibration_windows(tokenize_text(tok, wiki_text("calibration")), n_samples=8, seqlen=512, seed=0)
    assert tuple(calib.shape) == (8, 512)
    rep = slr.compress_(model, slr.CompressConfig(method="wanda", pattern="2:4", sparsity=None), calib,
                        batch_size=4, progress=False)
    assert rep.retained_fraction == 0.5
    ad = get_adapter(model)
    lins = [lin for b in ad.blocks(model) for lin in ad.linears(b).values()]
    assert len(lins) == len(rep.records) == 30 * 7
    assert all(isinstance(lin, SLRLinear) and lin.nm == (2, 4) for lin in lins)
    assert all(0.0 < r.rel_error < 1.0 for r in rep.records)
    text = wiki_text("test")
    dense = slr.perplexity(dense_model, tok, text, windows=4, batch_size=4, progress=False)
    comp = slr.perplexity(model, tok, text, windows=4, batch_size=4, progress=False)
    assert math.isfinite(comp.ppl)
    assert dense.ppl < comp.ppl < 1000, (dense.ppl, comp.ppl)
