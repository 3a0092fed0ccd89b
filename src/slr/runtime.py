"""A plain-PyTorch decoder for artifacts of the Llama family and Gemma 3: ``slr generate``'s runtime.

Why: importing transformers' modeling code pulls in torch._dynamo, torch.distributed.tensor, sympy and scipy,
about 130 MiB of resident memory before a single weight is read, which is more than SmolLM2's whole packed artifact
(89 MiB). This module builds the same module tree as the HF model (the same parameter names, so ``io.load`` fills it
from the artifact and packs its layers, embedding and head exactly as for the HF model) but imports neither
transformers nor accelerate; the tokenizer comes from the ``tokenizers`` library.

The forward is the HF one in float32: RMSNorm, rotary embeddings of rope type "default", grouped-query attention by
``F.scaled_dot_product_attention``, a gated MLP, the (tied or untied) head; qwen2's q/k/v biases, qwen3's per-head
q/k norms, and Gemma 3's scaled embedding, (1 + w) norms around both sublayers, q/k norms, GELU, attention scale and
sliding-window layers with their own rope base. A KV cache is preallocated for the prompt plus the new tokens, so a
decode step appends in place. ``generate`` is greedy. Other families (Phi-3's fused projections, OPT), other rope
types and soft caps are refused by ``unsupported``; ``slr generate`` then runs transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer as _Tokenizer
from torch import nn

from . import io
from .errors import SLRError
from .formats import MANIFEST
from .heap import trim_heap

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# After a forward of more tokens than this, freed memory goes back to the OS (glibc's malloc_trim, ~1 ms): a
# 512-token prefill frees tens of MB of scratch that glibc would otherwise keep, and the process's resident size stays
# that much higher for the rest of the decode (measured on SmolLM2: +87 MiB after the benchmark's prefills).
TRIM_TOKENS = 4
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def layer_types(cfg: dict) -> list[str]:
    """Each layer's attention: "full_attention" or "sliding_attention" (Gemma 3's list; mistral's window on all)."""
    n = cfg.get("num_hidden_layers", 1)
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    return ["sliding_attention" if cfg["model_type"] == "mistral" and cfg.get("sliding_window") else
            "full_attention"] * n


def rope_params(cfg: dict) -> dict[str, dict]:
    """Layer type -> its rope parameters (transformers 5 nests them per layer type for Gemma 3)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    types = set(layer_types(cfg))
    if types <= set(rope) and all(isinstance(rope[t], dict) for t in types):
        return {t: rope[t] for t in types}
    flat = {"rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))}
    return {t: flat for t in types}


def unsupported(config: dict) -> str | None:
    """Why this runtime cannot run a model with HF ``config`` (a config.json dict), or None when it can."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        return f"model_type {kind!r} (this runtime runs {', '.join(FAMILIES)})"
    for rope in rope_params(config).values():
        if rope.get("rope_type", "default") != "default":
            return f"rope type {rope.get('rope_type')!r}"
    act = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        return f"activation {act!r}"
    if kind in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        return "sliding-window attention"
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"):
        if config.get(key):
            return f"{key} = {config[key]}"
    return None


class RMSNorm(nn.Module):
    """x / rms(x) times ``weight`` (Llama) or ``1 + weight`` (Gemma: ``offset``), in float32."""

    def __init__(self, dim: int, eps: float, device=None, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, device=device) if offset else torch.ones(dim, device=device))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales before the cast back
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class KVCache:
    """Keys and values of every layer, [B, kv_heads, capacity, head_dim] each, filled up to ``length``."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _mask(t0: int, T: int, window: int | None, device) -> torch.Tensor | None:
    """Which cached positions [0, t0 + T) each of the T new queries sees (None: all of them, T = 1 and no window)."""
    q = torch.arange(t0, t0 + T, device=device)[:, None]
    k = torch.arange(t0 + T, device=device)[None, :]
    ok = k <= q
    return ok if window is None else ok & (k > q - window)


class Attention(nn.Module):
    def __init__(self, cfg: dict, i: int, device=None):
        super().__init__()
        d, hd, kind = cfg["hidden_size"], head_dim(cfg), cfg["model_type"]
        self.heads, self.kv_heads, self.hd, self.i = cfg["num_attention_heads"], kv_heads(cfg), hd, i
        self.window = cfg.get("sliding_window") if layer_types(cfg)[i] == "sliding_attention" else None
        self.scale = cfg["query_pre_attn_scalar"] ** -0.5 if kind == "gemma3_text" else None  # None: hd ** -0.5
        qkv_bias = kind == "qwen2" or bool(cfg.get("attention_bias"))
        o_bias = bool(cfg.get("attention_bias")) and kind != "qwen2"
        self.q_proj = nn.Linear(d, self.heads * hd, bias=qkv_bias, device=device)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias, device=device)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=qkv_bias, device=device)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=o_bias, device=device)
        if kind in ("qwen3", "gemma3_text"):
            eps, off = cfg["rms_norm_eps"], kind == "gemma3_text"
            self.q_norm, self.k_norm = RMSNorm(hd, eps, device, off), RMSNorm(hd, eps, device, off)

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
        lo = 0 if self.window is None or T > 1 else max(0, t0 + 1 - self.window)  # decode: only the window
        keys, values = cache.k[self.i][:, :, lo:t0 + T], cache.v[self.i][:, :, lo:t0 + T]
        kw = dict(scale=self.scale, enable_gqa=True)
        if T == 1:  # decode: the one new query sees every key left
            o = F.scaled_dot_product_attention(q, keys, values, **kw)
        elif t0 == 0 and (self.window is None or T <= self.window):
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, **kw)
        else:  # a chunk after cached tokens, or longer than the window
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=_mask(t0, T, self.window, x.device), **kw)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: dict, device=None):
        super().__init__()
        d, f, bias = cfg["hidden_size"], cfg["intermediate_size"], bool(cfg.get("mlp_bias"))
        self.act = ACTIVATIONS[cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")]
        self.gate_proj = nn.Linear(d, f, bias, device=device)
        self.up_proj = nn.Linear(d, f, bias, device=device)
        self.down_proj = nn.Linear(f, d, bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: dict, i: int, device=None):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.gemma = cfg["model_type"] == "gemma3_text"
        self.self_attn, self.mlp = Attention(cfg, i, device), MLP(cfg, device)
        self.input_layernorm = RMSNorm(d, eps, device, self.gemma)
        self.post_attention_layernorm = RMSNorm(d, eps, device, self.gemma)
        if self.gemma:  # norms on both sides of each sublayer
            self.pre_feedforward_layernorm = RMSNorm(d, eps, device, True)
            self.post_feedforward_layernorm = RMSNorm(d, eps, device, True)

    def forward(self, x, cos, sin, cache):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache)
        if not self.gemma:
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class ScaledEmbedding(nn.Embedding):
    """Gemma's input embedding: the rows times sqrt(hidden size) (a float32 scalar, as transformers rounds it)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class Body(nn.Module):
    def __init__(self, cfg: dict, device=None):
        super().__init__()
        V, d, gemma = cfg["vocab_size"], cfg["hidden_size"], cfg["model_type"] == "gemma3_text"
        # given its weight, Embedding skips its random init (on meta that init would import torch._dynamo)
        self.embed_tokens = (ScaledEmbedding if gemma else nn.Embedding)(V, d, _weight=torch.empty(V, d, device=device))
        if gemma:
            self.embed_tokens.register_buffer("embed_scale", torch.tensor(d ** 0.5), persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i, device) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(d, cfg["rms_norm_eps"], device, gemma)


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
        self.types = layer_types(cfg)
        self.inv_freq = {t: 1.0 / (float(r["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
                         for t, r in rope_params(cfg).items()}  # layer type -> [hd / 2] (never on meta)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        cfg = self.config
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        device = self.model.norm.weight.device
        return KVCache(cfg["num_hidden_layers"], batch, kv_heads(cfg), capacity, head_dim(cfg), dtype, device)

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """ids [B, T] after ``cache.length`` cached tokens -> logits [B, 1 or T, vocab] (the cache grows by T)."""
        B, T = ids.shape
        if cache.length + T > cache.capacity:
            raise SLRError(f"the KV cache holds {cache.capacity} tokens, {cache.length + T} were asked for",
                           "make the cache with a larger capacity")
        x = self.model.embed_tokens(ids)  # [B, T, d]
        pos = torch.arange(cache.length, cache.length + T, device=ids.device, dtype=torch.float)
        rot = {}
        for t, inv in self.inv_freq.items():
            freqs = pos[:, None] * inv.to(ids.device)  # [T, hd / 2]
            emb = torch.cat((freqs, freqs), -1)
            rot[t] = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # [T, hd], broadcast over [B, heads, T, hd]
        for block, t in zip(self.model.layers, self.types, strict=True):
            x = block(x, *rot[t], cache)
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
        self.tok = _Tokenizer.from_file(str(folder / "tokenizer.json"))

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
    """The decoder with its parameters on the meta device (``io.load`` assigns them); its rope tables are real."""
    why = unsupported(cfg)
    if why is not None:
        raise SLRError(f"slr's runtime does not run this model: {why}", "use --runtime hf")
    model = CausalLM(cfg, device="meta")
    return model.to(dtype) if dtype != torch.float32 else model


def _load_dense(p: Path) -> CausalLM:
    """A dense HF folder (config.json + *.safetensors, read with safetensors) into the decoder."""
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
    p = Path(path)
    if (p / MANIFEST).is_file():
        model = io.load(p, verify=verify, packed=packed, skeleton=lambda q, dtype: skeleton(read_config(q), dtype),
                        tokenizer=False)[0]
    else:
        model = _load_dense(p)
    model.eos_token_id = eos_ids(p, model.config)
    return model, (Tokenizer(p) if (p / "tokenizer.json").is_file() else None)
