"""Resolve MODEL (a default's name, a local HF folder, or a .gguf file) to a transformers model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SLRError
from .zoo import DEFAULTS, default_gguf, materialize_gguf


@dataclass
class ModelInfo:
    """Where a model came from (recorded in results and artifact manifests)."""

    name: str
    path: str
    sha256: str | None
    label: str  # human-readable, e.g. "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)"
    bos_per_window: bool  # Gemma: BOS on every eval window


def resolve(name_or_path: str) -> tuple[Path, ModelInfo]:
    """Find (and if needed materialize) the HF folder for MODEL."""
    if name_or_path in DEFAULTS:
        entry = DEFAULTS[name_or_path]
        folder = materialize_gguf(default_gguf(entry), entry.sha256)
        return folder, ModelInfo(entry.name, str(folder), entry.sha256, entry.hf_name, False)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SLRError(f"GGUF file not found: {p}", "check the path")
        folder = materialize_gguf(p)
        src = json.loads((folder / "source.json").read_text())
        return folder, ModelInfo(p.stem, str(folder), src["sha256"], f"{p.name} (dequantized GGUF)", False)
    if p.is_dir():
        if (p / "slr_config.json").exists():
            raise SLRError(f"{p} is an slr artifact, not a source model", "use slr.load() / `slr eval DIR` for it")
        if not (p / "config.json").exists():
            raise SLRError(f"{p} has no config.json, so it is not a Hugging Face model folder", "pass an HF folder")
        return p, ModelInfo(p.name, str(p), None, str(p), False)
    raise SLRError(
        f"unknown model {name_or_path!r}",
        f"pass one of {', '.join(DEFAULTS)}, a local HF folder, or a .gguf file (see `slr models`)",
    )


def load_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load MODEL. Returns (model, tokenizer, ModelInfo). Offline; nothing is fetched from a hub."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, info = resolve(name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except Exception as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SLRError(f"cannot read config.json in {folder}: {msg}", "pass an HF folder") from None
    archs = getattr(cfg, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise SLRError(f"{folder} holds a {archs[0]}, not a causal language model", "pass a *ForCausalLM model")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as e:
        raise SLRError(
            f"cannot load the model in {folder}: {type(e).__name__}: {str(e).splitlines()[0][:150]}",
            "check that the folder is a complete HF causal LM (weights may be corrupted or truncated)",
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SLRError(f"cannot load the tokenizer in {folder}: {msg}", "add tokenizer files") from None
    info.bos_per_window = needs_bos(model, tok)
    return model.to(device).eval(), tok, info


def needs_bos(model, tok) -> bool:
    """Gemma-family models need BOS at the start of every evaluation window."""
    mt = getattr(model.config, "model_type", "")
    return mt.startswith("gemma") and tok.bos_token_id is not None
