"""Token windows: the calibration sampler (PROTOCOL §4) and the evaluation windows (PROTOCOL §3).

Both work on one 1-D LongTensor of token ids, the whole split tokenized once. When ``bos_id`` is given
(Gemma 3, which needs BOS at the start of every window) each window is ``[bos] + (seqlen - 1)`` text
tokens, and a BOS the tokenizer put at the very start of the text is dropped first, so the first window
does not start with two BOS tokens.
"""

from __future__ import annotations

import torch

from ..errors import SLRError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once: ``tokenizer(text).input_ids`` as a LongTensor [n_tokens].

    Special tokens are added as the tokenizer does by default (e.g. Gemma's BOS, none for SmolLM2).
    """
    try:
        # verbose=False: a whole split is far longer than model_max_length on purpose (we cut windows later),
        # so HF's "sequence length is longer than the specified maximum" warning would only mislead.
        ids = tokenizer(text, verbose=False).input_ids
    except TypeError:  # a tokenizer-like object without the ``verbose`` keyword
        ids = tokenizer(text).input_ids
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _as_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise SLRError(f"token ids must be 1-D, got shape {tuple(ids.shape)}", "tokenize the text with tokenize_text")
    return ids


def _text_ids(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    # With a per-window BOS, the tokenizer's own leading BOS is not text: drop it to avoid [bos, bos, ...].
    if bos_id is not None and ids.numel() > 0 and int(ids[0]) == bos_id:
        return ids[1:]
    return ids


def _check_seqlen(seqlen: int, bos_id: int | None) -> None:
    least = 2 if bos_id is not None else 1
    if seqlen < least:
        raise SLRError(f"sequence length {seqlen} is too small", f"pass --seqlen >= {least} (the protocol uses 512)")


def calibration_windows(
    ids: torch.Tensor, n_samples: int = 128, seqlen: int = 512, seed: int = 0, bos_id: int | None = None
) -> torch.Tensor:
    """Draw ``n_samples`` random calibration windows -> LongTensor [n_samples, seqlen] (PROTOCOL §4).

    Start positions are ``torch.randint(0, n_tokens - seqlen, (n_samples,),
    generator=torch.Generator().manual_seed(seed))`` and window i is ``ids[s_i : s_i + seqlen]``; with
    ``bos_id`` it is ``[bos] + ids[s_i : s_i + seqlen - 1]`` (n_tokens then counts text tokens only).
    Windows may overlap. ``n_samples == 0`` returns an empty [0, seqlen] tensor, even for a short text
    (methods such as magnitude pruning need no data).
    """
    ids = _text_ids(_as_ids(ids), bos_id)
    if n_samples < 0:
        raise SLRError(f"number of calibration samples {n_samples} is negative", "pass --calib-samples 0 or more")
    _check_seqlen(seqlen, bos_id)
    if n_samples == 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    n_tokens = ids.numel()
    if n_tokens <= seqlen:
        raise SLRError(
            f"calibration text has {n_tokens} tokens, but {seqlen}-token windows need more than {seqlen}",
            "pass a longer text with --calib-text (or seqlen= in the Python API)",
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen, (n_samples,), generator=gen)
    width = seqlen if bos_id is None else seqlen - 1
    # [n, 1] + [width] -> [n, width] gather indices; all < n_tokens because starts < n_tokens - seqlen.
    windows = ids[starts[:, None] + torch.arange(width)]
    if bos_id is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def eval_windows(
    ids: torch.Tensor, seqlen: int = 512, windows: int | None = None, bos_id: int | None = None
) -> torch.Tensor:
    """Cut non-overlapping evaluation windows -> LongTensor [w, seqlen] (PROTOCOL §3).

    Window j is ``ids[j*seqlen : (j+1)*seqlen]``; the partial last window is dropped. With ``bos_id`` window j
    is ``[bos] + text[j*(seqlen-1) : (j+1)*(seqlen-1)]``. ``windows=None`` takes all; otherwise the first
    ``windows`` (e.g. 64 for "quick"). Asking for more windows than the text holds is not an error: all
    available windows are returned, and the caller reports ``w = result.shape[0]``.
    """
    ids = _text_ids(_as_ids(ids), bos_id)
    _check_seqlen(seqlen, bos_id)
    if windows is not None and windows < 1:
        raise SLRError(f"--windows {windows} is invalid", "--windows must be ≥ 1 or 'all'")
    stride = seqlen if bos_id is None else seqlen - 1  # text tokens per window
    available = ids.numel() // stride
    if available == 0:
        raise SLRError(
            f"evaluation text has {ids.numel()} tokens, fewer than one {seqlen}-token window needs ({stride})",
            "pass a longer text with --text (or seqlen= in the Python API)",
        )
    w = available if windows is None else min(windows, available)
    out = ids[: w * stride].reshape(w, stride)
    if bos_id is not None:
        out = torch.cat([torch.full((w, 1), bos_id, dtype=torch.long), out], dim=1)
    return out
