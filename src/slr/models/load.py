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
    try:  # transformers' own messages for these two are long and get cut
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SLRError(f"config.json in {folder} is not valid JSON ({str(e)[:80]})",
                       "re-copy config.json of the model") from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    mt = raw.get("model_type") if isinstance(raw, dict) else None
    if mt is not None and mt not in CONFIG_MAPPING_NAMES:
        raise SLRError(f"config.json in {folder} has model_type {mt!r}, which this transformers does not know",
                       "pass a supported causal LM (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, OPT)")
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except Exception as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SLRError(f"cannot read config.json in {folder}: {msg}", "pass an HF folder") from None
    archs = getattr(cfg, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise SLRError(f"{folder} holds a {archs[0]}, not a causal language model", "pass a *ForCausalLM model")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not archs and cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # e.g. a t5 config.json alone
        raise SLRError(f"{folder} holds a {cfg.model_type} model, not a causal language model",
                       "pass a *ForCausalLM model")
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
