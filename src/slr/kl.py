"""Next-token logits of a causal LM and the KL divergence to a reference distribution (distillation, CAP's loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, T-1, vocab] float32 at the positions that predict a next token of ``ids`` [b, T]."""
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0])[:, :-1].float()


def kl(student: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student); logits [b, T, V], teacher as log-probabilities."""
    logq = F.log_softmax(student, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean()
