"""Architecture adapters: where the decoder blocks are, which linears to compress, which share an input.

Supported: LLaMA-style (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3) and OPT.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SLRError


@dataclass(frozen=True)
class ArchAdapter:
    """Names are relative to a decoder block. ``groups`` lists linears that read the same input."""

    family: str
    blocks_path: str  # dotted path from the CausalLM to the ModuleList of blocks
    groups: tuple[tuple[str, ...], ...]
    embed_paths: tuple[str, ...]  # modules run before block 0 (for documentation / onloading)

    @property
    def linear_names(self) -> list[str]:
        return [n for g in self.groups for n in g]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        out = {}
        for n in self.linear_names:
            try:
                out[n] = block.get_submodule(n)
            except AttributeError:
                raise SLRError(
                    f"block has no module {n!r} for family {self.family}", "report the architecture"
                ) from None
        return out

    def group_of(self, name: str) -> tuple[str, ...]:
        for g in self.groups:
            if name in g:
                return g
        raise KeyError(name)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA = dict(blocks_path="model.layers", groups=_LLAMA_GROUPS, embed_paths=("model.embed_tokens",))

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", **_LLAMA),
    "mistral": ArchAdapter("mistral", **_LLAMA),
    "qwen2": ArchAdapter("qwen2", **_LLAMA),
    "qwen3": ArchAdapter("qwen3", **_LLAMA),
    "gemma3_text": ArchAdapter("gemma3_text", **_LLAMA),
    "phi3": ArchAdapter(
        "phi3",
        blocks_path="model.layers",
        groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        embed_paths=("model.embed_tokens",),
    ),
    "opt": ArchAdapter(
        "opt",
        blocks_path="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        embed_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    ),
}
ADAPTERS["gemma3"] = ADAPTERS["gemma3_text"]


def get_adapter(model: nn.Module) -> ArchAdapter:
    """Adapter for a transformers CausalLM, by ``config.model_type``."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        raise SLRError(
            f"unsupported architecture {mt!r}",
            f"slr supports: {', '.join(sorted(ADAPTERS))}; add an ArchAdapter in slr/models/adapters.py",
        )
    return ADAPTERS[mt]


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
