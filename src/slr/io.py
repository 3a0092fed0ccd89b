"""The compressed artifact: save, load and export_dense (the packed formats are in ``slr.formats``).

``save`` writes config.json, [generation_config.json], [tokenizer files], slr_config.json (the manifest) and
model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json) into a staging folder that
replaces the output folder only when complete (``fsutil.atomic_dir``). ``load`` rebuilds the HF model from
config.json with every compressed linear as an SLRLinear; ``export_dense`` writes a plain HF folder (W = S + U V).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from . import packed as packing
from .embeddings import check_embed_bits, check_rows, dequantize_rows, embedding_names, stored
from .errors import SLRError, one_line
from .formats import FORMAT, FORMAT_VERSION, MANIFEST, _pack_layer, bpw, read_manifest
from .fsutil import atomic_dir, check_output_dir, check_writable_parent, replace_file, write_text_atomic
from .heap import trim_heap
from .layerload import build_layer
from .models.adapters import set_module
from .models.zoo import sha256_file
from .nn import SharedProjection, SLRLinear, _check_strategy

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_RESERVED = {"format", "format_version", "layers", "files", "bytes", "dtypes", "tied", "embed"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_FILE", "MANIFEST", "SINGLE_FILE", "check_writable_parent",
           "export_dense", "load", "read_manifest", "save"]


# ---------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return sha256_file(path)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dense_items(state: dict[str, torch.Tensor], slr_names: list[str], dense_dtype):
    """HF-named tensors of a state dict that are not part of an SLRLinear's compressed storage, deduplicated.

    -> (items {name: tensor}, tied {alias: source}). Biases of SLR layers are included under P.bias.
    """
    items: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict = {}
    for name, t in _outside_slr(state, slr_names).items():
        t = t.detach()
        key = _storage_key(t) if t.numel() else ("empty", name)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = t.cpu()
        if dense_dtype is not None and t.is_floating_point():
            t = t.to(dense_dtype)
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        items[name] = t
    return items, tied


def _is_slr_bias(name: str, slr_names: set[str]) -> bool:
    return name.endswith(".bias") and name[: -len(".bias")] in slr_names


def _outside_slr(state: dict[str, torch.Tensor], slr_names: list[str]) -> dict[str, torch.Tensor]:
    """The entries of a state dict that are not an SLRLinear's compressed storage (SLR biases stay, as P.bias)."""
    prefixes = tuple(f"{n}." for n in slr_names)
    slr_set = set(slr_names)
    return {k: t for k, t in state.items()
            if t is not None and not (k.startswith(prefixes) and not _is_slr_bias(k, slr_set))}


def _slr_layers(model: nn.Module, prefix: str = "") -> tuple[list[tuple[str, SLRLinear]], dict[int, str]]:
    """(SLR layers in module order, {id(shared projection): the name of the layer that stores its V})."""
    slr = [(prefix + n, m) for n, m in model.named_modules() if isinstance(m, SLRLinear)]
    owners: dict[int, str] = {}  # the consumer registered first (cid 0) stores the shared V
    for n, m in sorted(slr, key=lambda nm: nm[1]._cid if nm[1]._cid is not None else -1):
        if m.shared is not None and m.U is not None:
            owners.setdefault(id(m.shared), n)
    return slr, owners


def _pack_all(slr: list[tuple[str, SLRLinear]], owners: dict[int, str], writer: _ShardWriter, layers: dict,
              values_dtype, factor_dtype) -> None:
    """Pack SLR layers into ``writer``; their manifest records go to ``layers``."""
    for n, m in slr:
        tensors, rec = _pack_layer(n, m, owners.get(id(m.shared)) if m.shared is not None else None,
                                   values_dtype, factor_dtype)
        layers[n] = rec
        for k, v in tensors.items():
            writer.add(k, v)


def _streamed_state(model: nn.Module, blocks, writer: _ShardWriter, layers: dict, values_dtype, factor_dtype):
    """Pack the SLR layers of every streamed block into ``writer`` (one block in memory at a time); returns the
    model's state dict in the order an in-memory save sees it (the blocks' small dense tensors, e.g. norms, are
    kept) and the SLR layer names."""
    names: list[str] = []
    block_state: dict[str, torch.Tensor] = {}
    for i in range(len(blocks)):
        block = blocks.load(i)
        p = f"{blocks.prefix}.{i}."
        slr, owners = _slr_layers(block, p)
        _pack_all(slr, owners, writer, layers, values_dtype, factor_dtype)
        mine = [n for n, _ in slr]
        names += mine
        kept = _outside_slr({p + k: t for k, t in block.state_dict(keep_vars=True).items()}, mine)
        block_state.update({k: t.detach().clone() for k, t in kept.items()})  # the block goes back to meta below
        blocks.release(block)
    state: dict[str, torch.Tensor] = {}
    bp = blocks.prefix + "."
    for k, t in model.state_dict(keep_vars=True).items():
        if not k.startswith(bp):
            state[k] = t
        elif block_state:  # the first block key: every block's tensors go here, in block order
            state.update(block_state)
            block_state = {}
    return state, names


def save(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, manifest: dict | None = None,
         values_dtype: torch.dtype = torch.float16, factor_dtype: torch.dtype = torch.float16,
         dense_dtype: torch.dtype | None = None, embed_bits: int | None = None, overwrite: bool = False,
         max_shard_bytes: int = 4 << 30, blocks=None) -> dict:
    """Write the compressed artifact atomically; returns the byte report (also stored in the manifest).

    ``manifest`` supplies "source", "config", "plan" (and any other non-reserved keys) for slr_config.json.
    ``dense_dtype`` converts the dense remainder (None keeps each tensor's dtype). ``embed_bits`` stores the input
    embedding and an untied output head at 16 (float16) or 8 bits (int8 per row, slr.embeddings); None leaves them
    to ``dense_dtype``. The byte report's ``bpw`` is the compressed linears' bytes x 8 / their weights (PROTOCOL §5).
    ``blocks``: for an onloaded model whose blocks are still on the meta device, a ``pipeline.CompressedBlocks`` that
    rebuilds each compressed block in turn; it is packed and released before the next one is loaded. The files are
    the same as those of an in-memory save of the rebuilt model.
    """
    if getattr(model, "config", None) is None:
        raise SLRError("the model has no .config", "pass a transformers CausalLM")
    for dt in (values_dtype, factor_dtype) + ((dense_dtype,) if dense_dtype is not None else ()):
        if dt not in _DTYPES.values():
            raise SLRError(f"unsupported storage dtype {dt}", "use torch.float32, torch.float16 or torch.bfloat16")
    if embed_bits is not None:
        check_embed_bits(embed_bits)
    if any(isinstance(m, packing.PACKED_TYPES) for m in model.modules()):
        raise SLRError("this model was loaded packed, for inference only",
                       "load the artifact with slr.load(DIR, packed=False) to re-save it")
    slr, owners = _slr_layers(model) if blocks is None else ([], {})

    with atomic_dir(out_dir, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with contextlib.suppress(Exception):
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        layers: dict[str, dict] = {}
        writer = _ShardWriter(tmp, max_shard_bytes)
        _pack_all(slr, owners, writer, layers, values_dtype, factor_dtype)
        if blocks is None:
            state, names = model.state_dict(keep_vars=True), [n for n, _ in slr]
        else:
            state, names = _streamed_state(model, blocks, writer, layers, values_dtype, factor_dtype)
        dense, tied = _dense_items(state, names, dense_dtype)
        plain = [v for v in dense.values() if v.is_floating_point()]  # before the embeddings change dtype
        embeds = [n for n in embedding_names(model) if n in dense] if embed_bits is not None else []
        dense = {n + sfx: t for n, v in dense.items()
                 for sfx, t in (stored(v, embed_bits) if n in embeds else {"": v}).items()}
        dense_bytes = 0
        for k, v in dense.items():
            writer.add(k, v)
            dense_bytes += v.numel() * v.element_size()
        files = writer.finish()

        comp = sum(r["bytes"] for r in layers.values())
        on_disk = sum((tmp / f).stat().st_size for f in files)
        first_float = next((v.dtype for v in plain), torch.float32)
        params = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
        report = {
            "compressed_layers": comp,
            "compressed_layers_theory": sum(r["theory_bytes"]["total"] for r in layers.values()),
            "compressed_layers_dense": sum(r["dense_bytes"] for r in layers.values()),
            "dense_remainder": dense_bytes,
            "safetensors_overhead": on_disk - comp - dense_bytes,
            "total": on_disk,
            "compressed_params": params,
            "bpw": bpw(comp, params),
            "embed_bits": embed_bits,
        }
        quantized = embed_bits == 8 or any("quant" in r or r["format"] == "dense" for r in layers.values())
        man = {"format": FORMAT, "format_version": FORMAT_VERSION if quantized else 1, "source": {}, "config": {},
               "plan": {}}
        man.update({k: v for k, v in (manifest or {}).items() if k not in _RESERVED})
        man.update({
            "dtypes": {"values": _dtype_name(values_dtype), "factors": _dtype_name(factor_dtype),
                       "dense": _dtype_name(first_float),
                       **({"embed": {16: "float16", 8: "int8"}[embed_bits]} if embeds else {})},
            "layers": layers,
            "tied": tied,
            "embed": {"bits": embed_bits, "tensors": embeds},
            "files": {f: _sha256(tmp / f) for f in files},
            "bytes": report,
        })
        write_text_atomic(tmp / MANIFEST, json.dumps(man, indent=1, default=str))
    return {**report, "layers": {n: {"actual": r["bytes"], "theory": r["theory_bytes"]["total"],
                                     "dense": r["dense_bytes"]} for n, r in layers.items()}}


class _ShardWriter:
    """Greedy sharding into safetensors files of at most ``max_bytes`` (a single bigger tensor gets its own)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.cur: dict[str, torch.Tensor] = {}
        self.cur_bytes = 0
        self.written: list[tuple[str, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        nb = t.numel() * t.element_size()
        if self.cur and self.cur_bytes + nb > self.max_bytes:
            self._flush()
        self.cur[name] = t.contiguous()
        self.cur_bytes += nb

    def _flush(self) -> None:
        fname = f"part-{len(self.written):05d}.safetensors"
        # one metadata key only: safetensors writes the metadata map in hash order, so a second key would make
        # identical artifacts differ byte for byte between runs (the format version is in the manifest)
        safetensors.torch.save_file(self.cur, str(self.root / fname), metadata={"format": "pt"})
        self.written.append((fname, list(self.cur)))
        self.cur, self.cur_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.cur or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            replace_file(self.root / self.written[0][0], self.root / SINGLE_FILE)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for i, (tmpname, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            replace_file(self.root / tmpname, self.root / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        total = sum((self.root / f).stat().st_size for f in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(self.root / INDEX_FILE, json.dumps(index, indent=1))
        return names


# ---------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------
def _verify_files(p: Path, man: dict) -> None:
    for fname, digest in man["files"].items():
        f = p / fname
        if not f.is_file():
            raise SLRError(f"artifact file {fname} is missing from {p}", "re-copy the complete artifact folder")
        if _sha256(f) != digest:
            raise SLRError(f"checksum mismatch in {fname}: the file is corrupted",
                           "re-run slr compress or re-copy the artifact")


class _Tensors:
    """Lazy reader over the artifact's safetensors files."""

    def __init__(self, p: Path, files: list[str]):
        self.where: dict[str, object] = {}
        self.handles = []
        for fname in files:
            try:
                h = safe_open(str(p / fname), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as e:  # noqa: BLE001 -- safetensors raises several types
                raise SLRError(f"cannot read {fname} ({one_line(e)})",
                               "re-run slr compress or re-copy the artifact") from None
            self.handles.append(h)
            for k in keys:
                self.where[k] = (h, fname)
        self.used: set[str] = set()

    def __contains__(self, k: str) -> bool:
        return k in self.where

    def get(self, k: str) -> torch.Tensor:
        if k not in self.where:
            raise SLRError(f"artifact tensor {k} is missing", "re-run slr compress or re-copy the artifact")
        h, fname = self.where[k]
        try:
            t = h.get_tensor(k)
        except Exception as e:  # noqa: BLE001
            raise SLRError(f"cannot read tensor {k} from {fname} ({one_line(e)})",
                           "re-run slr compress or re-copy the artifact") from None
        self.used.add(k)
        return t


def _skeleton(p: Path, dtype: torch.dtype):
    """HF model from config.json with parameters on the meta device (buffers real)."""
    import transformers as T
    from accelerate import init_empty_weights

    try:
        config = T.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise SLRError(f"cannot read config.json of {p} ({one_line(e)})",
                       "re-copy the artifact or upgrade transformers") from None
    with init_empty_weights(include_buffers=False):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _holders(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Every persistent param/buffer name (duplicates included) -> (module, attribute, is_param)."""
    out = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for leaf, t in mod._parameters.items():
            if t is not None:
                out[pre + leaf] = (mod, leaf, True)
        for leaf, t in mod._buffers.items():
            if t is not None and leaf not in mod._non_persistent_buffers_set:
                out[pre + leaf] = (mod, leaf, False)
    return out


def load(path: str | os.PathLike, *, strategy: str = "auto", device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, verify: bool = True, packed: bool | None = None, skeleton=None,
         tokenizer: bool = True):
    """Load an artifact -> (model with SLRLinear layers, tokenizer or None). Never touches the network.

    ``packed`` (default: when slr's C++ kernels are built and allowed, on the CPU in float32; see slr.packed) keeps
    the packed bytes in memory for inference: the layers whose S has a kernel become PackedLinear, and an int8 or
    float16 embedding and output head stay at that width. Pass ``packed=False`` for a model to fine-tune or re-save.
    ``skeleton(folder, dtype)`` builds the empty model to fill (default: the HF model of config.json, with its
    generation config; slr.runtime passes its own decoder); ``tokenizer=False`` returns None for the tokenizer.
    """
    _check_strategy(strategy)
    p = Path(path)
    man = read_manifest(p)
    if verify:
        _verify_files(p, man)
    ts = _Tensors(p, list(man["files"]))
    model = (skeleton or _skeleton)(p, dtype)
    if packed is None:
        packed = packing.enabled(device, dtype) and strategy == "auto"

    shared: dict[str, SharedProjection] = {}
    # owners of a shared V first, so that they register as consumer 0 again (num_params counts V there)
    order = sorted(man["layers"].items(), key=lambda kv: kv[1].get("v") == "shared" and kv[1]["v_from"] != kv[0])
    for name, rec in order:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SLRError(f"artifact layer {name} does not exist in the model built from config.json",
                           "re-copy config.json from the same artifact") from None
        if not isinstance(old, nn.Linear) or [old.out_features, old.in_features] != list(rec["shape"]):
            raise SLRError(f"artifact layer {name} {rec['shape']} does not match the model built from config.json",
                           "re-copy config.json from the same artifact")
        lin = build_layer(name, rec, ts.get, shared, dtype, strategy)
        set_module(model, name, (packing.pack_layer(lin, man["dtypes"]) if packed else None) or lin)

    holders = _holders(model)
    slr_prefixes = tuple(f"{n}." for n in man["layers"])
    assigned: dict[str, torch.Tensor] = {}
    rows = {}  # packed: embedding name -> (int8 rows, scales) or (float16 rows, None), kept at that width
    embeds = packing.embedding_weights(model, holders) if packed else set()
    for k in _embed_names(man):  # 8-bit embeddings: dequantized here unless packed
        if k not in holders:
            raise SLRError(f"artifact embedding {k} does not exist in the model built from config.json",
                           "re-copy config.json from the same artifact")
        codes, scales = ts.get(f"{k}.q8"), ts.get(f"{k}.q8_scales")
        if k in embeds:
            rows[k] = (check_rows(codes, scales), scales)
        else:
            assigned[k] = _assign(holders[k], dequantize_rows(codes, scales), dtype)
    for k in ts.where:
        if k in ts.used or k.startswith(slr_prefixes):
            continue
        if k not in holders:
            raise SLRError(f"artifact tensor {k} does not exist in the model built from config.json",
                           "re-copy config.json from the same artifact")
        t = ts.get(k)
        if k in embeds and t.dtype == torch.float16 and tuple(t.shape) == tuple(getattr(*holders[k][:2]).shape):
            rows[k] = (t, None)
        else:
            assigned[k] = _assign(holders[k], t, dtype)
    packing.pack_rows_(model, holders, rows, man["tied"])
    for alias, src in man["tied"].items():
        if alias in holders and src in assigned:
            mod, leaf, is_param = holders[alias]
            (mod._parameters if is_param else mod._buffers)[leaf] = assigned[src]
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise SLRError(f"artifact has no tensor for {n}", "re-run slr compress or re-copy the artifact")

    model = model.to(device).eval()
    del ts
    trim_heap()  # each layer's unpacked form (and, packed, its CSR index) is freed: hand it back
    gen_file = p / "generation_config.json"
    if gen_file.is_file() and skeleton is None:
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(str(p), local_files_only=True)
    return model, (_load_tokenizer(p) if tokenizer else None)


def _embed_names(man: dict) -> list[str]:
    """The 8-bit embeddings listed by the manifest ("embed": {"bits": 8, "tensors": [...]}; absent before it)."""
    e = man.get("embed") or {}
    if not isinstance(e, dict) or not isinstance(e.get("tensors", []), list):
        raise SLRError(f"{MANIFEST} has an invalid 'embed' entry", "re-run slr compress or re-copy the artifact")
    return list(e.get("tensors", [])) if e.get("bits") == 8 else []


def _assign(holder, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mod, leaf, is_param = holder
    if t.is_floating_point():
        t = t.to(dtype)
    old = (mod._parameters if is_param else mod._buffers)[leaf]
    if tuple(old.shape) != tuple(t.shape):
        raise SLRError(f"artifact tensor {leaf} has shape {tuple(t.shape)}, the model expects {tuple(old.shape)}",
                       "re-copy config.json from the same artifact")
    if is_param:
        new = nn.Parameter(t, requires_grad=old.requires_grad)
        mod._parameters[leaf] = new
        return new
    mod._buffers[leaf] = t
    return t


def _load_tokenizer(p: Path):
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise SLRError(f"cannot load the tokenizer saved in {p} ({one_line(e)})",
                       "re-copy the tokenizer files of the artifact") from None


# ---------------------------------------------------------------------------------------------------
# dense export
# ---------------------------------------------------------------------------------------------------
def export_dense(path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write a plain dense HF folder (W = S + U V) that AutoModelForCausalLM.from_pretrained loads."""
    man = read_manifest(Path(path))
    check_output_dir(Path(out_dir).absolute(), overwrite)
    if dtype is None:
        dtype = _DTYPES.get(man["dtypes"].get("dense"), torch.float32)
    model, tok = load(path, dtype=torch.float32, strategy="dense-onthefly", packed=False)
    with torch.no_grad():
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, SLRLinear)]:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.to_dense().detach().clone())
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().clone())
            set_module(model, name, lin)
    model = model.to(dtype)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(out_dir)
