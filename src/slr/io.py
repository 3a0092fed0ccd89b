"""The compressed artifact: save / load / export_dense, packed sparse formats and byte accounting.

An artifact folder holds config.json, [generation_config.json], [tokenizer files], slr_config.json (the
manifest) and model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json).
Tensors of a compressed linear at module path P (safetensors only, no pickle):

    P.slr.values    N:M [d_out, d_in*N/M] | unstructured [nnz]     (values dtype, row-major support order)
    P.slr.nm_index  uint8: ceil(log2 M) bits per kept value = its position inside its group of M, LSB first
    P.slr.bitmask   uint8: 1 bit per weight, row-major, LSB first    } unstructured: whichever of the
    P.slr.crow/col  int32|int64 row pointers / int16|int32 columns   } two is smaller
    P.slr.U [d_out, r], P.slr.V [r, d_in]                           (factor dtype; a shared V is stored
                                                                     once, by the first consumer)
Everything else (embeddings, norms, head, biases, uncompressed linears) keeps its HF name and is stored
once; tensors sharing storage (tied weights) are stored once and listed under "tied" in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import SLRError, is_disk_full
from .nn import SharedProjection, SLRLinear, nm_matches

FORMAT = "slr"
FORMAT_VERSION = 1
MANIFEST = "slr_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_RESERVED = {"format", "format_version", "layers", "files", "bytes", "dtypes", "tied"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


# ---------------------------------------------------------------------------------------------------
# bit packing and the sparse formats
# ---------------------------------------------------------------------------------------------------
def nm_index_bits(m: int) -> int:
    """Bits of metadata per kept value for an N:M pattern: ceil(log2 M) (at least 1)."""
    return max(1, (m - 1).bit_length())


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int [n] in [0, 2**bits) -> uint8 [ceil(n * bits / 8)], a little-endian bit stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)  # [n * bits] of 0/1
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream.view(-1, 8) << weights).sum(1, dtype=torch.int16).to(torch.uint8)  # [nbytes]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [nbytes] -> uint8 codes [n]."""
    if packed.numel() != math.ceil(n * bits / 8):
        raise SLRError(f"packed index has {packed.numel()} bytes, expected {math.ceil(n * bits / 8)}",
                       "the artifact is corrupted; re-run slr compress")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.to(torch.uint8)[:, None] >> shifts) & 1).reshape(-1)[: n * bits]  # [n * bits]
    weights = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.view(n, bits) << weights).sum(1, dtype=torch.int16).to(torch.uint8)


def pack_nm(values: torch.Tensor, col: torch.Tensor, d_out: int, d_in: int, n: int, m: int):
    """CSR (row-major, N per group) -> (values [d_out, d_in*n/m], nm_index uint8 [ceil(nnz*bits/8)])."""
    k = d_in // m * n
    if values.numel() != d_out * k:
        raise ValueError(f"{values.numel()} kept values do not form a {n}:{m} pattern of [{d_out}, {d_in}]")
    off = (col.long() % m).to(torch.uint8)  # [nnz] position inside the group
    return values.reshape(d_out, k), pack_bits(off, nm_index_bits(m))


def unpack_nm(values: torch.Tensor, index: torch.Tensor, d_out: int, d_in: int, n: int, m: int):
    """(values [d_out, d_in*n/m], nm_index) -> (values [nnz], crow int64 [d_out+1], col int64 [nnz])."""
    g = d_in // m
    k = g * n
    nnz = d_out * k
    if tuple(values.shape) != (d_out, k):
        raise SLRError(f"N:M values have shape {tuple(values.shape)}, expected {(d_out, k)}",
                       "the artifact is corrupted; re-run slr compress")
    off = unpack_bits(index, nm_index_bits(m), nnz).long()  # [nnz]
    o = off.view(-1, n)
    if bool((off >= m).any()) or (n > 1 and bool((o[:, 1:] <= o[:, :-1]).any())):
        raise SLRError("N:M index metadata is invalid", "the artifact is corrupted; re-run slr compress")
    grp = torch.arange(nnz, device=off.device) // n % g  # [nnz] group of each kept value
    col = grp * m + off
    crow = torch.arange(d_out + 1, device=off.device) * k
    return values.reshape(-1), crow, col


def csr_dtypes(d_in: int, nnz: int) -> tuple[torch.dtype, torch.dtype]:
    """(row-pointer dtype, column dtype) chosen by width."""
    return (torch.int32 if nnz < 2**31 else torch.int64), (torch.int16 if d_in <= 32768 else torch.int32)


def unstructured_index_bytes(d_out: int, d_in: int, nnz: int) -> dict[str, int]:
    """Index bytes of the two unstructured formats."""
    crow_dt, col_dt = csr_dtypes(d_in, nnz)
    return {"bitmask": math.ceil(d_out * d_in / 8),
            "csr": (d_out + 1) * crow_dt.itemsize + nnz * col_dt.itemsize}


def choose_unstructured(d_out: int, d_in: int, nnz: int) -> str:
    b = unstructured_index_bytes(d_out, d_in, nnz)
    return "bitmask" if b["bitmask"] <= b["csr"] else "csr"


def pack_bitmask(crow: torch.Tensor, col: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    rows = torch.repeat_interleave(torch.arange(d_out, device=crow.device), crow.long().diff())
    bits = torch.zeros(d_out * d_in, dtype=torch.uint8, device=crow.device)
    bits[rows * d_in + col.long()] = 1
    return pack_bits(bits, 1)


def unpack_bitmask(packed: torch.Tensor, d_out: int, d_in: int, nnz: int):
    """-> (crow int64 [d_out+1], col int64 [nnz])."""
    mask = unpack_bits(packed, 1, d_out * d_in).view(d_out, d_in).bool()
    counts = mask.sum(1)
    if int(counts.sum()) != nnz:
        raise SLRError(f"bitmask keeps {int(counts.sum())} values, expected {nnz}",
                       "the artifact is corrupted; re-run slr compress")
    crow = torch.zeros(d_out + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    return crow, mask.nonzero()[:, 1]


# ---------------------------------------------------------------------------------------------------
# byte accounting
# ---------------------------------------------------------------------------------------------------
def theoretical_bytes(d_out: int, d_in: int, nnz: int, rank: int, *, nm: tuple[int, int] | None = None,
                      values_dtype: torch.dtype = torch.float16, factor_dtype: torch.dtype = torch.float16,
                      count_v: bool = True) -> dict[str, int]:
    """Bytes a compressed matrix should take: values + index + factors.

    N:M: nnz * value bytes + ceil(nnz * ceil(log2 M) / 8); unstructured: min(bitmask, CSR) index;
    factors: r * (d_out + d_in) * factor bytes (r * d_out when a shared V is counted elsewhere).
    """
    vb = nnz * values_dtype.itemsize
    if nnz == 0:
        ib = 0
    elif nm is not None:
        ib = math.ceil(nnz * nm_index_bits(nm[1]) / 8)
    else:
        ib = min(unstructured_index_bytes(d_out, d_in, nnz).values())
    fb = rank * (d_out + (d_in if count_v else 0)) * factor_dtype.itemsize
    return {"values": vb, "index": ib, "factors": fb, "total": vb + ib + fb}


def _pack_layer(name: str, lin: SLRLinear, owner: str | None, values_dtype, factor_dtype):
    """-> (tensors {name: tensor}, manifest record) for one SLRLinear."""
    d_out, d_in = lin.out_features, lin.in_features
    t: dict[str, torch.Tensor] = {}
    rec: dict = {"shape": [d_out, d_in], "nm": None, "rank": lin.rank, "nnz": lin.nnz,
                 "bias": lin.bias is not None}
    nm = lin.nm
    if lin.values is None:
        rec["format"] = "none"
    else:
        vals = lin.values.detach().cpu().to(values_dtype)
        crow, col = lin.crow.cpu(), lin.col.cpu()
        if nm is not None and not nm_matches(lin.mask().cpu(), nm):
            nm = None  # support no longer N:M (should not happen: the support is fixed)
        if nm is not None:
            rec["format"], rec["nm"] = "nm", list(nm)
            t[f"{name}.slr.values"], t[f"{name}.slr.nm_index"] = pack_nm(vals, col, d_out, d_in, *nm)
        else:
            fmt = choose_unstructured(d_out, d_in, lin.nnz)
            rec["format"] = fmt
            t[f"{name}.slr.values"] = vals
            if fmt == "bitmask":
                t[f"{name}.slr.bitmask"] = pack_bitmask(crow, col, d_out, d_in)
            else:
                crow_dt, col_dt = csr_dtypes(d_in, lin.nnz)
                t[f"{name}.slr.crow"], t[f"{name}.slr.col"] = crow.to(crow_dt), col.to(col_dt)
    count_v = False
    if lin.U is not None:
        t[f"{name}.slr.U"] = lin.U.detach().cpu().to(factor_dtype)
        if lin.shared is None:
            rec["v"], count_v = "own", True
            t[f"{name}.slr.V"] = lin.V.detach().cpu().to(factor_dtype)
        else:
            rec["v"], rec["v_from"] = "shared", owner
            if owner == name:
                count_v = True
                t[f"{name}.slr.V"] = lin.shared.V.detach().cpu().to(factor_dtype)
    actual = sum(x.numel() * x.element_size() for x in t.values())
    theory = theoretical_bytes(d_out, d_in, lin.nnz, lin.rank, nm=nm, values_dtype=values_dtype,
                               factor_dtype=factor_dtype, count_v=count_v)
    rec["bytes"] = actual
    rec["theory_bytes"] = theory
    rec["dense_bytes"] = d_out * d_in * values_dtype.itemsize
    rec["bits_per_weight"] = round(8 * actual / (d_out * d_in), 4)
    rec["tensors"] = sorted(t)
    return t, rec


def layer_bytes(lin: SLRLinear, *, values_dtype: torch.dtype = torch.float16,
                factor_dtype: torch.dtype = torch.float16, count_v: bool = True) -> dict:
    """Packed size of one SLRLinear as it would be saved: {"actual", "theory", "dense", "format"}.

    ``count_v=False`` leaves a shared V out (it is stored once, by the group's first consumer).
    """
    owner = None
    if lin.shared is not None:
        owner = "this" if count_v else "other"
    _, rec = _pack_layer("this", lin, owner, values_dtype, factor_dtype)
    return {"actual": rec["bytes"], "theory": rec["theory_bytes"], "dense": rec["dense_bytes"],
            "format": rec["format"], "bits_per_weight": rec["bits_per_weight"]}


def artifact_bytes(path: str | os.PathLike) -> dict:
    """Byte report of a saved artifact: per compressed layer (actual vs theory) and files on disk."""
    p = Path(path)
    man = _read_manifest(p)
    layers = {n: {"actual": r["bytes"], "theory": r["theory_bytes"]["total"], "dense": r["dense_bytes"],
                  "format": r["format"], "rank": r["rank"], "nnz": r["nnz"]} for n, r in man["layers"].items()}
    files = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
    return {"layers": layers, "files": files, "files_total": sum(files.values()), **man["bytes"]}


# ---------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    from .models.zoo import sha256_file

    return sha256_file(path)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def check_writable_parent(path: str | os.PathLike, what: str = "output") -> None:
    """Fail up front (one line) when ``path`` could not be created: an ancestor is a file, or is not writable.

    Probes with a temp dir that is removed at once, since os.access says yes to root even where mkdir fails (/proc).
    """
    path = Path(path).absolute()
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    fix = f"choose a writable location for {what}"
    if not anc.is_dir():
        raise SLRError(f"cannot create {what} {path}: {anc} is a file, not a directory", fix)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slr-probe-", dir=anc))
    except OSError as e:
        raise SLRError(f"cannot create {what} {path}: {anc} is not writable ({e.strerror or e})", fix) from None


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SLRError(f"output path {out} exists and is not a directory", "choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SLRError(f"output directory {out} is not empty", "pass overwrite=True (--overwrite) or another path")
    check_writable_parent(out, "the output directory")


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool):
    """Yield a temp dir next to out_dir; on success it replaces out_dir. Never leaves partial output."""
    out = Path(out_dir).absolute()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        _check_target(out, overwrite)
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)
                raise
        else:
            os.replace(tmp, out)  # also replaces an empty directory
    except Exception as e:
        if is_disk_full(e):  # OSError ENOSPC, or safetensors' SafetensorError "... (os error 28)"
            raise SLRError(f"no space left on device while writing {out}",
                           "free disk space or write to another disk") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
         dense_dtype: torch.dtype | None = None, overwrite: bool = False,
         max_shard_bytes: int = 4 << 30, blocks=None) -> dict:
    """Write the compressed artifact atomically; returns the byte report (also stored in the manifest).

    ``manifest`` supplies "source", "config", "plan" (and any other non-reserved keys) for slr_config.json.
    ``dense_dtype`` converts the dense remainder (None keeps each tensor's dtype).
    ``blocks``: for an onloaded model whose blocks are still on the meta device, a ``pipeline.CompressedBlocks`` that
    rebuilds each compressed block in turn; it is packed and released before the next one is loaded. The files are
    the same as those of an in-memory save of the rebuilt model.
    """
    if getattr(model, "config", None) is None:
        raise SLRError("the model has no .config", "pass a transformers CausalLM")
    for dt in (values_dtype, factor_dtype) + ((dense_dtype,) if dense_dtype is not None else ()):
        if dt not in _DTYPES.values():
            raise SLRError(f"unsupported storage dtype {dt}", "use torch.float32, torch.float16 or torch.bfloat16")
    slr, owners = _slr_layers(model) if blocks is None else ([], {})

    with _atomic_dir(out_dir, overwrite) as tmp:
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
        dense_bytes = 0
        for k, v in dense.items():
            writer.add(k, v)
            dense_bytes += v.numel() * v.element_size()
        files = writer.finish()

        comp = sum(r["bytes"] for r in layers.values())
        on_disk = sum((tmp / f).stat().st_size for f in files)
        first_float = next((v.dtype for v in dense.values() if v.is_floating_point()), torch.float32)
        report = {
            "compressed_layers": comp,
            "compressed_layers_theory": sum(r["theory_bytes"]["total"] for r in layers.values()),
            "compressed_layers_dense": sum(r["dense_bytes"] for r in layers.values()),
            "dense_remainder": dense_bytes,
            "safetensors_overhead": on_disk - comp - dense_bytes,
            "total": on_disk,
        }
        man = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": {}, "config": {}, "plan": {}}
        man.update({k: v for k, v in (manifest or {}).items() if k not in _RESERVED})
        man.update({
            "dtypes": {"values": _dtype_name(values_dtype), "factors": _dtype_name(factor_dtype),
                       "dense": _dtype_name(first_float)},
            "layers": layers,
            "tied": tied,
            "files": {f: _sha256(tmp / f) for f in files},
            "bytes": report,
        })
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1, default=str))
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
        from safetensors.torch import save_file

        fname = f"part-{len(self.written):05d}.safetensors"
        # one metadata key only: safetensors writes the metadata map in hash order, so a second key would make
        # identical artifacts differ byte for byte between runs (the format version is in the manifest)
        save_file(self.cur, str(self.root / fname), metadata={"format": "pt"})
        self.written.append((fname, list(self.cur)))
        self.cur, self.cur_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.cur or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.root / self.written[0][0], self.root / SINGLE_FILE)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for i, (tmpname, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.root / tmpname, self.root / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        total = sum((self.root / f).stat().st_size for f in names)
        (self.root / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=1))
        return names


# ---------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def _read_manifest(p: Path) -> dict:
    if not p.is_dir():
        raise SLRError(f"artifact {p} does not exist or is not a directory", "pass the folder written by slr compress")
    mp = p / MANIFEST
    if not mp.is_file():
        raise SLRError(f"{p} is not an slr artifact (no {MANIFEST})", "pass the folder written by slr compress")
    try:
        man = json.loads(mp.read_text())
    except (ValueError, OSError) as e:
        raise SLRError(f"{MANIFEST} is unreadable ({_one_line(e)})",
                       "re-run slr compress or re-copy the artifact") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise SLRError(f"{MANIFEST} does not describe an slr artifact", "re-run slr compress")
    ver = man.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise SLRError(f"artifact format version {ver!r} is invalid", "re-run slr compress or re-copy the artifact")
    if ver > FORMAT_VERSION:
        raise SLRError(f"artifact format version {ver} is newer than this slr supports ({FORMAT_VERSION})",
                       "upgrade slr")
    for key in ("layers", "files", "tied", "dtypes"):
        if not isinstance(man.get(key), dict):
            raise SLRError(f"{MANIFEST} has no valid {key!r} entry", "re-run slr compress or re-copy the artifact")
    return man


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
        from safetensors import safe_open

        self.where: dict[str, object] = {}
        self.handles = []
        for fname in files:
            try:
                h = safe_open(str(p / fname), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as e:  # noqa: BLE001 -- safetensors raises several types
                raise SLRError(f"cannot read {fname} ({_one_line(e)})",
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
            raise SLRError(f"cannot read tensor {k} from {fname} ({_one_line(e)})",
                           "re-run slr compress or re-copy the artifact") from None
        self.used.add(k)
        return t


def _build_layer(name: str, rec: dict, ts: _Tensors, shared: dict[str, SharedProjection], dtype, strategy):
    d_out, d_in = rec["shape"]
    fmt = rec["format"]
    values = crow = col = None
    nm = tuple(rec["nm"]) if rec.get("nm") else None
    nnz = int(rec["nnz"])
    if fmt == "nm":
        values, crow, col = unpack_nm(ts.get(f"{name}.slr.values"), ts.get(f"{name}.slr.nm_index"), d_out, d_in, *nm)
    elif fmt == "bitmask":
        values = ts.get(f"{name}.slr.values")
        crow, col = unpack_bitmask(ts.get(f"{name}.slr.bitmask"), d_out, d_in, nnz)
    elif fmt == "csr":
        values, crow, col = ts.get(f"{name}.slr.values"), ts.get(f"{name}.slr.crow"), ts.get(f"{name}.slr.col")
        if crow.shape != (d_out + 1,) or col.numel() != nnz or (nnz and int(col.max()) >= d_in):
            raise SLRError(f"CSR index of {name} is invalid", "the artifact is corrupted; re-run slr compress")
    elif fmt != "none":
        raise SLRError(f"unknown sparse format {fmt!r} for {name}", "upgrade slr")
    if values is not None and values.numel() != nnz:
        raise SLRError(f"{name} has {values.numel()} values, expected {nnz}", "re-run slr compress")
    U = V = sp = None
    if rec.get("rank", 0):
        U = ts.get(f"{name}.slr.U").to(dtype)
        if rec.get("v") == "shared":
            owner = rec["v_from"]
            if owner not in shared:
                shared[owner] = SharedProjection(ts.get(f"{owner}.slr.V").to(dtype))
            sp = shared[owner]
        else:
            V = ts.get(f"{name}.slr.V").to(dtype)
    bias = ts.get(f"{name}.bias").to(dtype) if rec.get("bias") else None
    try:
        return SLRLinear(d_in, d_out, values=None if values is None else values.reshape(-1).to(dtype),
                         crow=crow, col=col, U=U, V=V, shared=sp, bias=bias, nm=nm, strategy=strategy)
    except ValueError as e:
        raise SLRError(f"layer {name} is inconsistent ({_one_line(e)})", "re-run slr compress") from None


def _skeleton(p: Path, dtype: torch.dtype):
    """HF model from config.json with parameters on the meta device (buffers real)."""
    import transformers as T
    from accelerate import init_empty_weights

    try:
        config = T.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise SLRError(f"cannot read config.json of {p} ({_one_line(e)})",
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
         dtype: torch.dtype = torch.float32, verify: bool = True):
    """Load an artifact -> (model with SLRLinear layers, tokenizer or None). Never touches the network."""
    from .models.adapters import set_module
    from .nn import _check_strategy

    _check_strategy(strategy)
    p = Path(path)
    man = _read_manifest(p)
    if verify:
        _verify_files(p, man)
    ts = _Tensors(p, list(man["files"]))
    model = _skeleton(p, dtype)

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
        set_module(model, name, _build_layer(name, rec, ts, shared, dtype, strategy))

    holders = _holders(model)
    slr_prefixes = tuple(f"{n}." for n in man["layers"])
    assigned: dict[str, torch.Tensor] = {}
    for k in ts.where:
        if k in ts.used or k.startswith(slr_prefixes):
            continue
        if k not in holders:
            raise SLRError(f"artifact tensor {k} does not exist in the model built from config.json",
                           "re-copy config.json from the same artifact")
        assigned[k] = _assign(holders[k], ts.get(k), dtype)
    for alias, src in man["tied"].items():
        if alias in holders and src in assigned:
            mod, leaf, is_param = holders[alias]
            (mod._parameters if is_param else mod._buffers)[leaf] = assigned[src]
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise SLRError(f"artifact has no tensor for {n}", "re-run slr compress or re-copy the artifact")

    model = model.to(device).eval()
    gen_file = p / "generation_config.json"
    if gen_file.is_file():
        from transformers import GenerationConfig

        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(str(p), local_files_only=True)
    return model, _load_tokenizer(p)


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
        raise SLRError(f"cannot load the tokenizer saved in {p} ({_one_line(e)})",
                       "re-copy the tokenizer files of the artifact") from None


# ---------------------------------------------------------------------------------------------------
# dense export
# ---------------------------------------------------------------------------------------------------
def export_dense(path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """Write a plain dense HF folder (W = S + U V) that AutoModelForCausalLM.from_pretrained loads."""
    from .models.adapters import set_module

    man = _read_manifest(Path(path))
    _check_target(Path(out_dir).absolute(), overwrite)
    if dtype is None:
        dtype = _DTYPES.get(man["dtypes"].get("dense"), torch.float32)
    model, tok = load(path, dtype=torch.float32, strategy="dense-onthefly")
    with torch.no_grad():
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, SLRLinear)]:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.to_dense().detach().clone())
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().clone())
            set_module(model, name, lin)
    model = model.to(dtype)
    with _atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(out_dir)
