"""slr's compiled kernels (int4_gemv.cpp beside this file): build them once, load them lazily, call them.

The kernel is a plain C ABI shared library, compiled by the system C++ compiler (``$CXX``, else ``c++`` / ``g++``)
with OpenMP, and called through ctypes on torch tensors' data pointers: no torch headers, no ninja, about a second
to build. ``python -m slr.csrc --build`` (run by scripts/install.sh) compiles it into the cache folder
``$SLR_KERNEL_DIR``, by default ``build/`` beside this file, under a name that carries a hash of the source and the
flags, so a changed source is never served by a stale library. Nothing is compiled at run time: without the
library (no compiler at install, not rebuilt since the source changed), ``load()`` returns None, ``reason()`` says
why, and slr.kernels runs the torch path. ``import slr`` does not load it; the first kernel call does.

Its OpenMP runtime is torch's: torch loads its libgomp.so.1 first, and the library's libgomp.so.1 resolves to it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "int4_gemv.cpp"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp")
ABI = 7  # slr_int4_abi() of the source this module speaks to
ERRORS = {-1: "shapes it does not take", -2: "this CPU has no AVX2 + FMA + F16C"}

_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


def compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("SLR_KERNEL_DIR") or HERE / "build")


def library_path() -> Path:
    """Where the library built from today's source and flags lives (it may not exist)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"int4_gemv-{digest}.so"


def build(quiet: bool = False) -> Path | None:
    """Compile the library (a no-op when it is there); the path, or None after one line on stderr saying why not."""
    out = library_path()
    if out.exists():
        return out
    cxx = compiler()
    why = "no C++ compiler found (set CXX)" if cxx is None else ""
    if cxx is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent loader sees no library or a whole one
                for old in out.parent.glob("int4_gemv-*.so"):  # builds of older sources
                    if old != out:
                        old.unlink(missing_ok=True)
                return out
            os.unlink(tmp)
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = f"{cxx} failed: {lines[0] if lines else f'exit {proc.returncode}'}"
        except OSError as e:
            why = f"cannot write {out.parent}: {e}"
    if not quiet:
        print(f"slr: the C++ int4 kernel was not built ({why}); slr will use the torch path", file=sys.stderr)
    return None


def load() -> ctypes.CDLL | None:
    """The library, loaded on first call (None when it is missing or unusable; see ``reason()``)."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    _tried = True
    path = library_path()
    if not path.exists():
        _reason = "not built (run `python -m slr.csrc --build`)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _reason = f"cannot load {path.name}: {e}"
        return None
    lib.slr_int4_abi.restype = lib.slr_int4_cpu_ok.restype = ctypes.c_int
    if lib.slr_int4_abi() != ABI:
        _reason = f"{path.name} speaks another ABI (rebuild: `python -m slr.csrc --build`)"
    elif not lib.slr_int4_cpu_ok():
        _reason = "this CPU has no AVX2 + FMA + F16C"
    else:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.slr_int4_mm.restype = lib.slr_int4_nm24_mm.restype = ctypes.c_int
        lib.slr_int4_mm.argtypes = [p, i64, i64, p, p, p, i64, i64, p, ctypes.c_int]
        lib.slr_int4_nm24_mm.argtypes = [p, i64, i64, p, p, p, p, i64, i64, p, ctypes.c_int]
        for f in (lib.slr_f16_nm24_mm, lib.slr_rows_mm, lib.slr_unpack, lib.slr_lowrank_add):
            f.restype = ctypes.c_int
        lib.slr_f16_nm24_mm.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
        lib.slr_rows_mm.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int, ctypes.c_int]
        lib.slr_unpack.argtypes = [i64, p, p, p, p, p, i64, i64, p, ctypes.c_int]
        lib.slr_lowrank_add.argtypes = [p, i64, i64, p, ctypes.c_int, p, p, ctypes.c_int, i64, i64, p, ctypes.c_int]
        lib.slr_rows_q8_mm.restype = ctypes.c_int
        lib.slr_rows_q8_mm.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
        lib.slr_layer_mm.restype = lib.slr_layer_unpack.restype = ctypes.c_int
        lib.slr_layer_mm.argtypes = [p, p, i64, p, p, ctypes.c_int]
        lib.slr_layer_unpack.argtypes = [p, p, ctypes.c_int]
        _lib = lib
    return _lib


def reason() -> str:
    """Why ``load()`` gave None ("" before the first ``load()`` or when it succeeded)."""
    return _reason


def _lib_or_raise() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"slr's C++ kernels are unavailable: {_reason}")
    return lib


def _check(name: str, x: torch.Tensor, *parts: tuple[torch.Tensor | None, torch.dtype]) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{name}: x must be a contiguous float32 [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    for t, dt in parts:
        if t is not None and (t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"{name}: an operand is {t.dtype} {tuple(t.shape)}, expected contiguous CPU {dt}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _run(name: str, *args) -> None:
    rc = getattr(_lib_or_raise(), f"slr_{name}")(*args)
    if rc:
        raise RuntimeError(f"slr's C++ kernel {name} refused the call: {ERRORS.get(rc, rc)}")


def _call(name: str, x: torch.Tensor, packed: list[torch.Tensor], scale: torch.Tensor, sz: torch.Tensor,
          group_size: int, N: int, threads: int | None) -> torch.Tensor:
    M, K = x.shape
    ok = x.dtype == torch.float32 and x.is_contiguous() and scale.shape == sz.shape == (N, K // group_size)
    ok = ok and all(t.dtype == torch.uint8 and t.is_contiguous() for t in packed)
    if not ok or not all(t.dtype == torch.float32 and t.is_contiguous() for t in (scale, sz)):
        raise ValueError(f"{name}: bad operands x {tuple(x.shape)} {x.dtype}, packed "
                         f"{[tuple(t.shape) for t in packed]}, scale {tuple(scale.shape)}, sz {tuple(sz.shape)}, "
                         f"group size {group_size}")
    y = torch.empty(M, N, dtype=torch.float32)
    _run(name, x.data_ptr(), M, K, *(t.data_ptr() for t in packed), scale.data_ptr(), sz.data_ptr(), group_size, N,
         y.data_ptr(), torch.get_num_threads() if threads is None else threads)
    return y


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, sz: torch.Tensor, group_size: int,
            threads: int | None = None) -> torch.Tensor:
    """x [M, K] float32 -> x W^T [M, N] float32 for a dense W in int4_gemv.cpp's layout (``weight`` uint8 [N, K/2],
    ``scale``, ``sz`` = scale * zero float32 [N, K/g], all contiguous CPU tensors). Threads: torch's by default.
    Checks its operands; raises RuntimeError when the library is not loaded or refuses the call."""
    if weight.shape[1] * 2 != x.shape[1]:
        raise ValueError(f"int4_mm: weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    return _call("int4_mm", x, [weight], scale, sz, group_size, weight.shape[0], threads)


def int4_nm24_mm(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, sz: torch.Tensor,
                 group_size: int, threads: int | None = None) -> torch.Tensor:
    """The same for a 2:4 sparse W (``values`` uint8 [N, K/4], ``index`` uint8 [N, K/8]; int4_gemv.cpp's 2:4
    section)."""
    if values.shape[1] * 4 != x.shape[1] or index.shape != (values.shape[0], x.shape[1] // 8):
        raise ValueError(f"int4_nm24_mm: values {tuple(values.shape)}, index {tuple(index.shape)} do not fit x "
                         f"{tuple(x.shape)}")
    return _call("int4_nm24_mm", x, [values, index], scale, sz, group_size, values.shape[0], threads)


def f16_nm24_mm(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x [M, K] float32 -> x W^T [M, N] float32 for a 2:4 W with float16 ``values`` [N, K/2] (kept weights in column
    order) and int4_gemv.cpp's 2-bit positions ``index`` uint8 [N, K/8] (slr.kernels.nm24_index)."""
    _check("f16_nm24_mm", x, (values, torch.float16), (index, torch.uint8))
    M, K = x.shape
    N = values.shape[0]
    if values.shape != (N, K // 2) or index.shape != (N, K // 8):
        raise ValueError(f"f16_nm24_mm: values {tuple(values.shape)}, index {tuple(index.shape)} do not fit x "
                         f"{tuple(x.shape)}")
    y = torch.empty(M, N)
    _run("f16_nm24_mm", x.data_ptr(), M, K, values.data_ptr(), index.data_ptr(), N, y.data_ptr(),
         torch.get_num_threads() if threads is None else threads)
    return y


ROWS_KINDS = {torch.float16: 0, torch.int8: 1, torch.float32: 2}  # int4_gemv.cpp's RowsKind


def rows_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
            threads: int | None = None, q8: bool = False) -> torch.Tensor:
    """x [M, K] float32 -> x W^T [M, N] float32 for W = ``weight`` float16 or float32 [N, K], or int8 [N, K] times the
    float32 row ``scale`` [N]: the output head read at the width the artifact stores it, the low-rank factors.
    ``q8`` (int8 rows, K a multiple of 64): each row of x is read as int8 activations (slr.packed.q8_activations)."""
    i8 = weight.dtype == torch.int8
    if q8 and (not i8 or x.shape[1] % 64):
        raise ValueError(f"rows_mm: q8 needs int8 rows and K a multiple of 64, got {weight.dtype} K={x.shape[1]}")
    if weight.dtype not in ROWS_KINDS:
        raise ValueError(f"rows_mm: weight dtype {weight.dtype} is not one of {list(ROWS_KINDS)}")
    _check("rows_mm", x, (weight, weight.dtype), (scale, torch.float32))
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape != (N, K) or (scale is None) == i8 or (i8 and scale.shape != (N,)):
        raise ValueError(f"rows_mm: weight {weight.dtype} {tuple(weight.shape)} with scale "
                         f"{None if scale is None else tuple(scale.shape)} does not fit x {tuple(x.shape)}")
    y = torch.empty(M, N)
    threads = torch.get_num_threads() if threads is None else threads
    if q8:
        _run("rows_q8_mm", x.data_ptr(), M, K, weight.data_ptr(), scale.data_ptr(), N, y.data_ptr(), threads)
    else:
        _run("rows_mm", x.data_ptr(), M, K, weight.data_ptr(), _ptr(scale), N, y.data_ptr(), threads,
             ROWS_KINDS[weight.dtype])
    return y


def unpack(N: int, K: int, *, values: torch.Tensor, index: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, sz: torch.Tensor | None = None, group_size: int = 0,
           threads: int | None = None) -> torch.Tensor:
    """The dense float32 W [N, K] of a pack: 4-bit ``values`` (uint8, dense or with a 2:4 ``index``) with ``scale``
    and ``sz``, or float16 2:4 ``values`` with their ``index``."""
    half = values.dtype == torch.float16
    _check("unpack", torch.empty(0, 0), (values, torch.float16 if half else torch.uint8), (index, torch.uint8),
           (scale, torch.float32), (sz, torch.float32))
    if half and index is None or (not half and (scale is None or sz is None)):
        raise ValueError("unpack: float16 values need an index; 4-bit ones a scale and sz")
    out = torch.empty(N, K)
    _run("unpack", K, None if half else values.data_ptr(), values.data_ptr() if half else None, _ptr(index),
         _ptr(scale), _ptr(sz), group_size, N, out.data_ptr(), torch.get_num_threads() if threads is None else threads)
    return out


def lowrank_add_(y: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """y [M, N] += (x V^T) U^T in place, or y += z U^T with a given z [M, r] (V None); U [N, r] and V [r, K] float16
    or float32 rows, x [M, K], y and z float32 contiguous."""
    _check("lowrank_add_", x, (U, U.dtype), (V, None if V is None else V.dtype), (z, torch.float32),
           (y, torch.float32))
    M, K = x.shape
    N, r = U.shape
    if U.dtype not in (torch.float16, torch.float32) or (V is None) == (z is None) or y.shape != (M, N) or (
            V is not None and (V.shape != (r, K) or V.dtype not in (torch.float16, torch.float32))) or (
            z is not None and z.shape != (M, r)):
        raise ValueError(f"lowrank_add_: y {tuple(y.shape)}, x {tuple(x.shape)}, U {U.dtype} {tuple(U.shape)}, "
                         f"V {None if V is None else tuple(V.shape)}, z {None if z is None else tuple(z.shape)}")
    _run("lowrank_add", x.data_ptr(), M, K, _ptr(V), ROWS_KINDS[V.dtype] if V is not None else 0, _ptr(z),
         U.data_ptr(), ROWS_KINDS[U.dtype], r, N, y.data_ptr(), torch.get_num_threads() if threads is None else threads)
    return y


S_KINDS = {"nibble": 0, "nibble-2:4": 1, "float16-2:4": 2, "lanes2": 3, "lanes3": 4, "lanes8": 5,
           "none": 6}  # int4_gemv.cpp SKind
F_U8, F_GIVEN, F_I8 = 3, 4, 5  # int4_gemv.cpp FKind (with ROWS_KINDS' float16 and float32)


class Layer(ctypes.Structure):
    """int4_gemv.cpp's ``struct Layer``: one layer's S, low-rank part and bias, as kinds, sizes and data pointers."""

    _fields_ = [(n, ctypes.c_int64) for n in ("K", "N", "skind", "gs")] + [
        (n, ctypes.c_void_p) for n in ("s", "idx", "scale", "sz")] + [
        (n, ctypes.c_int64) for n in ("r", "vkind")] + [(n, ctypes.c_void_p) for n in ("v", "vscale", "vsz")] + [
        (n, ctypes.c_int64) for n in ("vgs", "ukind")] + [(n, ctypes.c_void_p) for n in ("u", "uscale", "usz")] + [
        ("ugs", ctypes.c_int64), ("bias", ctypes.c_void_p), ("zc", ctypes.c_float), ("act8", ctypes.c_int32)]


def layer_mm(layer: Layer, x: torch.Tensor, z: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous -> x (S + U V)^T + bias [M, N] for a ``Layer`` (whose tensors the caller keeps
    alive); ``z`` [M, r] float32 = x V^T when V is given by the caller (kind F_GIVEN)."""
    _check("layer_mm", x, (z, torch.float32))
    if x.shape[1] != layer.K or (z is not None and z.shape != (x.shape[0], layer.r)):
        raise ValueError(f"layer_mm: x {tuple(x.shape)}, z {None if z is None else tuple(z.shape)} do not fit a "
                         f"layer of K={layer.K}, r={layer.r}")
    y = torch.empty(x.shape[0], layer.N)
    _run("layer_mm", ctypes.addressof(layer), x.data_ptr(), x.shape[0], _ptr(z), y.data_ptr(),
         torch.get_num_threads() if threads is None else threads)
    return y


def layer_unpack(layer: Layer, threads: int | None = None) -> torch.Tensor:
    """The dense float32 S [N, K] of a ``Layer``."""
    out = torch.empty(layer.N, layer.K)
    _run("layer_unpack", ctypes.addressof(layer), out.data_ptr(),
         torch.get_num_threads() if threads is None else threads)
    return out
