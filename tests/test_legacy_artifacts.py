"""Artifacts written by the last release still load: same logits, and export_dense still works.

tests/data/legacy/ holds three tiny artifacts written once by the release's ``slr.save`` (see
tests/data/make_legacy_artifacts.py): N:M + own V with a tokenizer, unstructured bitmask + CSR with biases and tied
weights in two shards, and rank-only layers with shared V in bf16/fp16 storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import slr
import slr.formats
from slr.nn import SLRLinear
from slr.packed import PackedLinear

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

LEGACY = Path(__file__).parent / "data" / "legacy"
NAMES = ("llama_nm24_r4", "opt_u60_r4_csr", "qwen3_joint_r4")
FORMATS = {"llama_nm24_r4": {"nm"}, "opt_u60_r4_csr": {"bitmask", "csr"}, "qwen3_joint_r4": {"none"}}


@pytest.fixture(scope="module")
def reference():
    return load_file(str(LEGACY / "reference.safetensors"))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("name", NAMES)
def test_legacy_artifact_loads(name, reference, tmp_path):
    art = LEGACY / name
    man = json.loads((art / "slr_config.json").read_text())
    assert man["format_version"] == 1
    assert {r["format"] for r in man["layers"].values()} == FORMATS[name]

    model, tok = slr.load(art)  # packed where a layer has a C++ kernel (float16 2:4 here)
    assert sum(isinstance(m, (SLRLinear, PackedLinear)) for m in model.modules()) == len(man["layers"])
    x, want = reference[f"{name}.input_ids"], reference[f"{name}.logits"]
    got = _logits(model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if name == "llama_nm24_r4":
        assert tok is not None and tok("w1 w2").input_ids == [1, 2]
    if name == "qwen3_joint_r4":
        shared = {id(m.shared) for m in model.modules()
                  if isinstance(m, (SLRLinear, PackedLinear)) and m.shared is not None}
        assert 0 < len(shared) < len(man["layers"])

    dense = slr.export_dense(art, tmp_path / "dense")
    d = T.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    tol = 1e-5 if man["dtypes"]["dense"] == "float32" else 2e-2  # export keeps the artifact's dense dtype
    torch.testing.assert_close(_logits(d, x), want, atol=tol, rtol=tol)


def test_legacy_byte_report():
    rep = slr.formats.artifact_bytes(LEGACY / "opt_u60_r4_csr")
    assert rep["files_total"] == sum(f.stat().st_size for f in (LEGACY / "opt_u60_r4_csr").iterdir())
    assert {r["format"] for r in rep["layers"].values()} == {"bitmask", "csr"}
