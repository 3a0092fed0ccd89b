"""Text corpora: the default English Wikipedia sample (PROTOCOL §2) and user text files.

The Wikipedia sample is the test data shipped inside the ``gensim==4.4.0`` wheel. It is read from the
installed package at run time (the text is CC BY-SA; it is never copied into this repository), cleaned
exactly as PROTOCOL §2 says, and checked against the published sha256 fingerprints, so every number
computed on it is comparable across machines and commits.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path

from ..errors import SLRError
from ..fsutil import write_text_atomic
from ..models.zoo import cache_dir

SPLITS = ("calibration", "test")

# split -> (characters, sha256 of the UTF-8 text), from PROTOCOL §2.
FINGERPRINTS: dict[str, tuple[int, str]] = {
    "calibration": (2078404, "05090b17f484066bffa17728855022e0fe3b0adb91dfdfb3b1c308b6147be589"),
    "test": (568422, "df2436f7a7d9a2c652630e519aed25e0bffca9e57694a606c68b25a89f0edf9e"),
}
N_ARTICLES = 107  # articles after dropping redirects (86 calibration + 21 test)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_SKIP_PREFIXES = ("|", "{|", "!", "*", "#", ":", ";")  # table, list and definition markup left by filter_wiki


def wiki_path() -> Path:
    """Path of the gensim test file holding the Wikipedia sample (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SLRError("gensim is not installed, so the default Wikipedia sample is unavailable",
                       "pip install gensim==4.4.0, or pass your own text with --text FILE")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise SLRError(f"the Wikipedia sample {path} is missing from the installed gensim",
                       "pip install --force-reinstall gensim==4.4.0, or pass your own text with --text FILE")
    return path


def _clean_article(text: str) -> str:
    """PROTOCOL §2 step 2: wiki markup -> plain prose lines."""
    from gensim.corpora.wikicorpus import filter_wiki

    t = re.sub(r"'{2,}", "", filter_wiki(text))  # bold/italic quote runs
    t = _HEADING.sub(lambda m: "\n" + m.group(2) + "\n", t)  # "== History ==" -> "History" on its own line
    lines = (line.strip() for line in t.split("\n"))
    return "\n".join(
        line for line in lines if line and not line.startswith(_SKIP_PREFIXES) and len(line.split()) >= 3
    )


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """All 107 cleaned articles as ``(title, body)`` pairs, in file order (PROTOCOL §2 steps 1-2)."""
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.BZ2File(wiki_path()) as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lower().startswith("#redirect"):
                continue
            articles.append((title, _clean_article(text)))
    return tuple(articles)


def _extract(split: str) -> str:
    """PROTOCOL §2 steps 3-4: every 5th article (i % 5 == 4) is test, the rest calibration."""
    want_test = split == "test"
    return "\n\n".join(
        f" = {title} = \n\n{body}" for i, (title, body) in enumerate(wiki_articles()) if (i % 5 == 4) == want_test
    )


def _matches(split: str, text: str) -> bool:
    n_chars, sha = FINGERPRINTS[split]
    return len(text) == n_chars and hashlib.sha256(text.encode("utf-8")).hexdigest() == sha


def _cache_file(split: str) -> Path:
    # Keyed by the fingerprint: a changed protocol never reads a stale file.
    return cache_dir() / "corpus" / f"wiki-sample-{split}-{FINGERPRINTS[split][1][:16]}.txt"


def _read_cache(split: str) -> str | None:
    try:
        text = _cache_file(split).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if _matches(split, text) else None  # a corrupt or truncated file is re-extracted


def _write_cache(split: str, text: str) -> None:
    path = _cache_file(split)
    try:
        write_text_atomic(path, text)  # readers never see a half-written file
    except OSError:
        pass  # the cache is only a speed-up; a read-only home must not break a run


@functools.lru_cache(maxsize=len(SPLITS))
def wiki_text(split: str) -> str:
    """The ``split`` ("calibration" or "test") of the default Wikipedia sample, exactly as PROTOCOL §2 defines it.

    Extraction takes a few seconds, so the text is cached in memory and under ``$SLR_CACHE/corpus``.
    Raises SLRError for an unknown split or when the extracted text does not match its fingerprint.
    """
    if split not in FINGERPRINTS:
        raise SLRError(f"unknown Wikipedia split {split!r}", f"use one of {', '.join(SPLITS)}")
    text = _read_cache(split)
    if text is not None:
        return text
    text = _extract(split)
    if not _matches(split, text):
        n_chars, sha = FINGERPRINTS[split]
        got = hashlib.sha256(text.encode("utf-8")).hexdigest()
        raise SLRError(
            f"the extracted Wikipedia {split} split ({len(text)} chars, sha256 {got[:12]}...) does not match "
            f"PROTOCOL §2 ({n_chars} chars, sha256 {sha[:12]}...), so results would not be comparable",
            "pip install gensim==4.4.0 (the corpus is defined by that wheel's test data)",
        )
    _write_cache(split, text)
    return text


def read_text_file(path: str | os.PathLike, flag: str = "--text") -> str:
    """Read a user's UTF-8 text file (``--text FILE``); SLRError if missing, unreadable, not UTF-8 or empty."""
    p = Path(path).expanduser()
    fix = f"pass a UTF-8 text file with {flag} FILE, or leave {flag} out to use the Wikipedia sample"
    if not p.exists():
        raise SLRError(f"text file {str(p)!r} does not exist", fix)
    if not p.is_file():
        raise SLRError(f"text path {str(p)!r} is not a regular file", fix)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SLRError(f"cannot read text file {str(p)!r}: {e.strerror or e}", "check the file's permissions") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM written by some editors
    except UnicodeDecodeError as e:
        raise SLRError(
            f"text file {str(p)!r} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})",
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 in.txt > out.txt",
        ) from None
    if not text.strip():
        raise SLRError(f"text file {str(p)!r} is empty or whitespace only", fix)
    return text


def load_text(source: str | os.PathLike | None, split: str) -> tuple[str, str]:
    """Return ``(text, label)``: the Wikipedia ``split`` when ``source`` is None, else the file ``source``.

    The label names the data in results: ``"wiki-sample:test"`` or ``"file:<path>"``. A user file is used
    as-is for any split (the caller decides whether one file serves calibration and evaluation).
    """
    if split not in FINGERPRINTS:
        raise SLRError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if source is None:
        return wiki_text(split), f"wiki-sample:{split}"
    flag = "--calib-text" if split == "calibration" else "--text"  # name the option the user actually gave
    return read_text_file(source, flag), f"file:{source}"
