"""A plain-PyTorch decoder for artifacts of the Llama family (llama, mistral, qwen2, qwen3): ``slr generate``'s runtime.

Why: importing transformers' modeling code pulls in torch._dynamo, torch.distributed.tensor, sympy and scipy,
about 130 MiB of resident memory before a single weight is read, which is more than SmolLM2's whole packed artifact
(89 MiB). This module builds the same module tree as the HF model (the same parameter names, so ``io.load`` fills it
from the artifact and packs its layers, embedding and head exactly as for the HF model) but imports neither
transformers nor accelerate; the tokenizer comes from the ``tokenizers`` library.

The forward is the HF one for these families in float32: RMSNorm, rotary embeddings of rope type "default",
grouped-query attention by ``F.scaled_dot_product_attention``, a SiLU-gated MLP, the (tied or untied) head; qwen2's
q/k/v biases and qwen3's per-head q/k norms. A KV cache is preallocated for the prompt plus the new tokens, so a
decode step appends in place. ``generate`` is greedy. Other families (Gemma 3's sliding windows and soft caps, Phi-3's
fused projections, OPT) and other rope types are refused by ``unsupported``; ``slr generate`` then runs HF.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SLRError
from .heap import trim_heap

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# After a forward of more tokens than this, freed memory goes back to the OS (glibc's malloc_trim, ~1 ms): a
# 512-token prefill frees tens of MB of scratch that glibc would otherwise keep, and the process's resident size stays
# that much higher for the rest of the decode (measured on SmolLM2: +87 MiB after the benchmark's prefills).
TRIM_TOKENS = 4


def unsupported(config: dict) -> str | None:
    """Why this runtime cannot run a model with HF ``config`` (a config.json dict), or None when it can."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        return f"model_type {kind!r} (this runtime runs {', '.join(FAMILIES)})"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope type {rope.get('rope_type', rope.get('type'))!r}"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    if kind in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        return "sliding-window attention"
    return None


def rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Keys and values of every layer, [B, kv_heads, capacity, head_dim] each, filled up to ``length``."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0
        self.capacity = capacity


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class Attention(nn.Module):
    def __init__(self, cfg: dict, i: int, device=None):
        super().__init__()
        d, hd = cfg["hidden_size"], head_dim(cfg)
        self.heads, self.kv_heads, self.hd, self.i = cfg["num_attention_heads"], kv_heads(cfg), hd, i
        qkv_bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
        o_bias = bool(cfg.get("attention_bias")) and cfg["model_type"] != "qwen2"
        self.q_proj = nn.Linear(d, self.heads * hd, bias=qkv_bias, device=device)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias, device=device)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias, device=device)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=o_bias, device=device)
        if cfg["model_type"] == "qwen3":
            eps = cfg["rms_norm_eps"]
            self.q_norm, self.k_norm = RMSNorm(hd, eps, device), RMSNorm(hd, eps, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.hd)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.kv_heads, self.hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        t0 = cache.length
        cache.k[self.i][:, :, t0:t0 + T] = k
        cache.v[self.i][:, :, t0:t0 + T] = v
        keys, values = cache.k[self.i][:, :, :t0 + T], cache.v[self.i][:, :, :t0 + T]
        if T == 1:  # decode: the one new query sees every cached position
            o = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
        elif t0 == 0:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        else:  # a chunk after cached tokens: query j sees positions <= t0 + j
            mask = torch.ones(T, t0 + T, dtype=torch.bool, device=x.device).tril(t0)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: dict, device=None):
        super().__init__()
        d, f, bias = cfg["hidden_size"], cfg["intermediate_size"], bool(cfg.get("mlp_bias"))
        self.gate_proj = nn.Linear(d, f, bias, device=device)
        self.up_proj = nn.Linear(d, f, bias, device=device)
        self.down_proj = nn.Linear(f, d, bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: dict, i: int, device=None):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg, i, device), MLP(cfg, device)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"], device)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"], device)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: dict, device=None):
        super().__init__()
        V, d = cfg["vocab_size"], cfg["hidden_size"]
        # given its weight, Embedding skips its random init (on meta that init would import torch._dynamo)
        self.embed_tokens = nn.Embedding(V, d, _weight=torch.empty(V, d, device=device))
        self.layers = nn.ModuleList(Block(cfg, i, device) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(d, cfg["rms_norm_eps"], device)


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def kv_heads(cfg: dict) -> int:
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


class CausalLM(nn.Module):
    """The decoder, named as the HF ``*ForCausalLM`` (``model.layers.0.self_attn.q_proj``, ``lm_head``, ...)."""

    def __init__(self, cfg: dict, device=None):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg, device)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False, device=device)
        hd = head_dim(cfg)
        self.register_buffer("inv_freq", 1.0 / (rope_theta(cfg) ** (torch.arange(0, hd, 2, dtype=torch.float) / hd)),
                             persistent=False)
        self.sliding_window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        cfg, ref = self.config, self.inv_freq
        if self.sliding_window and capacity > self.sliding_window:
            raise SLRError(f"{capacity} tokens exceed this mistral model's sliding window ({self.sliding_window})",
                           "shorten the prompt or --max-new-tokens, or run it with --runtime hf")
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        return KVCache(cfg["num_hidden_layers"], batch, kv_heads(cfg), capacity, head_dim(cfg), dtype, ref.device)

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """ids [B, T] after ``cache.length`` cached tokens -> logits [B, 1 or T, vocab] (the cache grows by T)."""
        B, T = ids.shape
        if cache.length + T > cache.capacity:
            raise SLRError(f"the KV cache holds {cache.capacity} tokens, {cache.length + T} were asked for",
                           "make the cache with a larger capacity")
        x = self.model.embed_tokens(ids)  # [B, T, d]
        pos = torch.arange(cache.length, cache.length + T, device=ids.device, dtype=torch.float)
        freqs = pos[:, None] * self.inv_freq  # [T, hd / 2]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # [T, hd], broadcast over [B, heads, T, hd]
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        cache.length += T
        x = self.lm_head(self.model.norm(x[:, -1:] if last_only else x))
        if T > TRIM_TOKENS:  # a prefill's scratch (attention scores, unpacked weights) back to the OS (see below)
            trim_heap(collect=False)
        return x

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None
                 ) -> torch.Tensor:
        """Greedy decoding: ids [B, T] -> [B, T + n], n <= ``max_new_tokens`` (fewer when every row has produced
        an end-of-sequence token; rows that ended are padded with it)."""
        B, T = ids.shape
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long)
        cache = self.new_cache(B, T + max_new_tokens)
        out, done = [ids], torch.zeros(B, dtype=torch.bool)
        step = ids
        for _ in range(max_new_tokens):
            nxt = self(step, cache)[:, -1].argmax(-1)  # [B]
            if eos.numel():
                nxt = torch.where(done, eos[0], nxt)
                done |= torch.isin(nxt, eos)
            step = nxt[:, None]
            out.append(step)
            if eos.numel() and bool(done.all()):
                break
        return torch.cat(out, 1)


class Tokenizer:
    """An artifact's tokenizer.json through the ``tokenizers`` library: ``encode(text) -> ids [1, T]``, ``decode``."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tok.encode(text).ids], dtype=torch.long)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SLRError(f"cannot read {folder / 'config.json'} ({e})", "re-copy the artifact") from None


def eos_ids(folder: Path, cfg: dict) -> int | list[int] | None:
    """The end-of-sequence id(s): generation_config.json's, else config.json's."""
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                return eos
        except ValueError:
            pass
    return cfg.get("eos_token_id")


def skeleton(cfg: dict, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The decoder with its parameters on the meta device (``io.load`` assigns them); the rope buffer real."""
    why = unsupported(cfg)
    if why is not None:
        raise SLRError(f"slr's runtime does not run this model: {why}", "use --runtime hf")
    model = CausalLM(cfg, device="meta")
    return model.to(dtype) if dtype != torch.float32 else model


def _load_dense(p: Path) -> CausalLM:
    """A dense HF folder (config.json + *.safetensors) into the decoder, memory-mapped as transformers loads it."""
    from safetensors.torch import load_file

    model = skeleton(read_config(p))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise SLRError(f"{p} has no .safetensors weights", "point at an HF folder saved with safetensors")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    tied = model.config.get("tie_word_embeddings", True)
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state and tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SLRError(f"{p}'s weights do not match its config.json (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]})", "re-copy the model folder")
    return model.eval()


def load(path, *, verify: bool = True, packed: bool | None = None):
    """An slr artifact or a dense HF folder -> (CausalLM in float32 on the CPU, Tokenizer or None). An artifact is
    filled and packed as ``io.load`` does it (see slr.packed)."""
    from . import io
    from .formats import MANIFEST

    p = Path(path)
    if (p / MANIFEST).is_file():
        model = io.load(p, verify=verify, packed=packed, skeleton=lambda q, dtype: skeleton(read_config(q), dtype),
                        tokenizer=False)[0]
    else:
        model = _load_dense(p)
    model.eos_token_id = eos_ids(p, model.config)
    return model, (Tokenizer(p) if (p / "tokenizer.json").is_file() else None)
