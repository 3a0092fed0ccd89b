"""Resume after a crash: a run SIGKILLed in the middle of a block continues with --resume from its checkpoints and
writes a bit-identical artifact; a leftover checkpoint without --resume, and --resume with a changed config, are
refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_cli import assert_one_line_error, run

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

# prune+lr with transformer matching: the checkpoints must restore both the solver results and the TM-trained state
ARGS = ["--method", "prune+lr", "--sparsity", "0.6", "--rank", "4", "--refine", "tm", "--tm-epochs", "3",
        "--calib-samples", "4", "--windows", "2", "--device", "cpu", "--batch-size", "2"]


@pytest.fixture
def setup(tiny_folder):
    return tiny_folder


def _compress(src, text, out, *extra, env=None):
    argv = [sys.executable, "-m", "slr.cli", "compress", str(src), *ARGS, "--text", str(text), "--calib-text",
            str(text), "--out", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def _files(out):
    return json.loads((out / "slr_config.json").read_text())["files"]


def test_sigkill_mid_block_then_resume_is_bit_identical(setup, tmp_path, capsys):
    src, text = setup
    ref = tmp_path / "ref"
    p = _compress(src, text, ref)
    assert p.returncode == 0, p.stderr

    out = tmp_path / "art"
    partial = tmp_path / ".slr-partial-art"
    # 7 linears per block: SIGKILL after the 10th solved matrix, i.e. in the middle of block 1
    p = _compress(src, text, out, env={"SLR_FAULT_KILL_AFTER": "10"})
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert not out.exists()
    ck = sorted(f.name for f in (partial / "checkpoints").iterdir())
    assert ck == ["block_0000.json", "block_0000.safetensors", "meta.json"], ck

    # without --resume: refused before any work, checkpoints kept
    code, _, err = run(capsys, "compress", src, *ARGS, "--text", text, "--calib-text", text, "--out", out)
    assert_one_line_error(code, err, "interrupted run left checkpoints", "--resume")
    assert (partial / "checkpoints" / "block_0000.json").exists()
    # --resume with a different config: refused, checkpoints kept
    changed = [a if a != "4" else "2" for a in ARGS]  # rank 4 -> 2
    code, _, err = run(capsys, "compress", src, *changed, "--text", text, "--calib-text", text, "--out", out,
                       "--resume")
    assert_one_line_error(code, err, "--resume with a changed run", "config.rank")
    assert not out.exists() and (partial / "checkpoints" / "block_0000.json").exists()

    p = _compress(src, text, out, "--resume")
    assert p.returncode == 0, p.stderr
    assert _files(out) == _files(ref)  # sha256 of every tensor file
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert not partial.exists()
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert a["ppl"]["ppl"] == b["ppl"]["ppl"]
    assert [m["rel_error"] for m in a["matrices"]] == [m["rel_error"] for m in b["matrices"]]
    assert "resumed_blocks" not in a and b["resumed_blocks"] == 1  # block 0 came from the checkpoint


def test_overwrite_discards_checkpoints(setup, tmp_path):
    src, text = setup
    out = tmp_path / "art"
    p = _compress(src, text, out, env={"SLR_FAULT_KILL_AFTER": "3"})
    assert p.returncode == -9
    assert (tmp_path / ".slr-partial-art" / "checkpoints" / "meta.json").exists()
    p = _compress(src, text, out, "--overwrite")
    assert p.returncode == 0, p.stderr
    assert out.is_dir() and not (tmp_path / ".slr-partial-art").exists()
