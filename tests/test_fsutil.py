"""slr.fsutil: atomic writes with the user's normal modes; the artifact and its dense export get those modes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import slr
from slr import fsutil
from slr.errors import SLRError
from slr.models.tiny import tiny_model


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_current_umask(umask022):
    assert fsutil.current_umask() == 0o022
    assert fsutil.current_umask() == 0o022  # reading it left it unchanged
    assert (fsutil.file_mode(), fsutil.dir_mode()) == (0o644, 0o755)


def test_write_atomic_modes_and_content(tmp_path, umask022):
    fsutil.write_bytes_atomic(tmp_path / "a" / "b.bin", b"\x00\x01")
    fsutil.write_text_atomic(tmp_path / "t.txt", "h\u00e9\r\nx")
    fsutil.write_json_atomic(tmp_path / "j.json", {"p": tmp_path, "n": 1})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_bytes() == "h\u00e9\r\nx".encode()
    assert json.loads((tmp_path / "j.json").read_text()) == {"p": str(tmp_path), "n": 1}
    assert (tmp_path / "j.json").read_text().startswith('{\n  "p"')  # indent=2
    for f in ("a/b.bin", "t.txt", "j.json"):
        assert _mode(tmp_path / f) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "j.json", "t.txt"]  # no temp files left


def test_atomic_file_failure_keeps_old(tmp_path):
    f = tmp_path / "x"
    f.write_text("old")
    with pytest.raises(RuntimeError), fsutil.atomic_file(f) as tmp:
        tmp.write_text("partial")
        raise RuntimeError
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_atomic_dir(tmp_path, umask022):
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "f").write_text("1")
        os.chmod(tmp / "sub" / "f", 0o600)
    assert _mode(out) == 0o755 and _mode(out / "sub") == 0o755 and _mode(out / "sub" / "f") == 0o644
    with pytest.raises(SLRError, match="not empty"), fsutil.atomic_dir(out):
        pass
    with pytest.raises(RuntimeError), fsutil.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "g").write_text("2")
        raise RuntimeError
    assert (out / "sub" / "f").read_text() == "1"  # the old folder is intact
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert [p.name for p in out.iterdir()] == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folders left


def test_atomic_dir_restores_old_when_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    real = os.replace

    def replace(src, dst):
        if str(src).startswith(str(tmp_path / ".out.tmp-")):
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), fsutil.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("shards", [False, True], ids=["single", "sharded"])
def test_artifact_modes(tmp_path, umask022, shards):
    out = tmp_path / "art"
    slr.save(tiny_model("llama"), out, max_shard_bytes=100_000 if shards else 4 << 30)
    files = sorted(p.name for p in out.iterdir())
    assert ("model.safetensors" in files) != shards and "slr_config.json" in files
    assert _mode(out) == 0o777 & ~0o022
    for f in files:
        assert _mode(out / f) == 0o666 & ~0o022, f
    dense = slr.export_dense(out, tmp_path / "dense", dtype=torch.float32)
    assert _mode(dense) == 0o755
    assert {f.name: _mode(f) for f in dense.iterdir()} == {f.name: 0o644 for f in dense.iterdir()}
