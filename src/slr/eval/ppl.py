"""Protocol perplexity (PROTOCOL.md section 3): non-overlapping 512-token windows, each scored alone."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calib import eval_windows, tokenize_text


@dataclass
class PPLResult:
    ppl: float
    nll: float  # summed token NLL (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    bos_per_window: bool
    seconds: float

    @property
    def protocol(self) -> str:
        which = "quick" if self.windows == 64 else f"{self.windows} windows"
        return f"seqlen {self.seqlen}, {which}, {'BOS per window' if self.bos_per_window else 'no BOS'}"

    def to_dict(self) -> dict:
        return asdict(self) | {"protocol": self.protocol}


@torch.inference_mode()
def perplexity_windows(
    model, windows: torch.Tensor, batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = True,
    desc: str = "ppl",
) -> tuple[float, int]:
    """Summed NLL and predicted-token count over pre-cut windows [w, seqlen]."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # [b, L, V]
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return nll, count


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seqlen: int = 512,
    windows: int | None = 64,
    batch_size: int = 4,
    bos_per_window: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    ids: torch.Tensor | None = None,
) -> PPLResult:
    """PPL = exp(sum NLL / sum predicted tokens) over the first ``windows`` windows (None = all).

    Pass ``ids`` to reuse a tokenization of ``text``.
    """
    t = time.perf_counter()
    if ids is None:
        ids = tokenize_text(tokenizer, text)
    bos = tokenizer.bos_token_id if bos_per_window else None
    win = eval_windows(ids, seqlen=seqlen, windows=windows, bos_id=bos)
    was_training = model.training
    model.eval()
    nll, count = perplexity_windows(model, win, batch_size, device, progress)
    model.train(was_training)
    return PPLResult(
        ppl=math.exp(nll / count), nll=nll, tokens=count, windows=len(win), seqlen=seqlen,
        bos_per_window=bos_per_window, seconds=time.perf_counter() - t,
    )
