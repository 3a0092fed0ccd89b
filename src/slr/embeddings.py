"""How the artifact stores the embedding matrices (the input embedding and an untied output head): ``embed_bits``.

16: float16. 8: per-row symmetric int8 with one fp16 scale per row, round to nearest (s = max|row| / 127, codes in
[-127, 127]), the way GGUF's Q8_0 keeps token embeddings (there per 32 values). ``round_embeddings_`` puts the
in-memory model on the same grid, so that the perplexity measured before saving is the saved artifact's.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SLRError

EMBED_BITS = (16, 8)


def check_embed_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in EMBED_BITS:
        raise SLRError(f"--embed-bits {bits} is not one of 16, 8",
                       "pass --embed-bits 16 (float16) or 8 (int8, one fp16 scale per row)")


def embedding_names(model: nn.Module) -> list[str]:
    """State-dict names of the input embedding and output head weights (both names when they are tied)."""
    targets = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        mod = fn() if callable(fn) else None
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type != "meta":
            targets.append(w)
    return [n for n, p in model.named_parameters(remove_duplicate=False) if any(p is t for t in targets)]


def quantize_rows(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [rows, cols], scales float16 [rows]) of ``W`` on a per-row symmetric 8-bit grid."""
    W = W.detach().float()
    scale = (W.abs().amax(1) / 127).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row (or fp16 underflow): exact zeros
    codes = torch.round(W / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale.half()


def check_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``codes`` after checking that they are int8 [rows, cols] with one scale per row."""
    if codes.dtype != torch.int8 or scales.dim() != 1 or codes.dim() != 2 or scales.shape[0] != codes.shape[0]:
        raise SLRError(f"8-bit embedding tensors are {codes.dtype} {tuple(codes.shape)} / {tuple(scales.shape)}",
                       "the artifact is corrupted; re-run slr compress")
    return codes


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [rows, cols] = codes x the row's scale."""
    return check_rows(codes, scales).float() * scales.float()[:, None]


def stored(t: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """The artifact tensors of an embedding named "" (suffixes only): {"": fp16} or {".q8": codes, ".q8_scales": s}."""
    if bits == 16:
        return {"": t.detach().cpu().to(torch.float16)}
    codes, scales = quantize_rows(t.cpu())
    return {".q8": codes, ".q8_scales": scales}


def round_embeddings_(model: nn.Module, bits: int) -> None:
    """Round the embedding weights in place to what ``embed_bits`` stores (fp16, or int8 per row, dequantized)."""
    check_embed_bits(bits)
    done: set[int] = set()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for n in embedding_names(model):
            w = params[n]
            if id(w) in done:
                continue
            done.add(id(w))
            if bits == 16:
                w.copy_(w.to(torch.float16))
            else:
                w.copy_(dequantize_rows(*quantize_rows(w)).to(w.device))
