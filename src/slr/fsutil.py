"""Atomic writes of files and folders, with the user's normal permissions.

Everything slr writes goes to a temporary name beside its target and is renamed into place, so a reader (or an
interrupted run) never sees a partial file or folder. Temporary files from ``tempfile.mkstemp`` are 0600 and folders
from ``mkdtemp`` 0700; before the rename they get the mode an ordinary ``open``/``mkdir`` (and ``save_pretrained``)
would give them: 0o666 & ~umask for files, 0o777 & ~umask for folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SLRError, is_disk_full


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a newly created file: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a newly created folder: 0o777 & ~umask."""
    return 0o777 & ~current_umask()


def replace_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Give ``src`` the normal file mode, then rename it to ``dst`` (atomic within one file system)."""
    os.chmod(src, file_mode())
    os.replace(src, dst)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name (e.g. safetensors' save_file).

    When the block exits cleanly the file gets the normal mode and is renamed to ``path``; otherwise it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename: readers never see a partial file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8 (newlines written as given)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON (``str`` for anything JSON does not know), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


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


def check_output_dir(out: str | os.PathLike, overwrite: bool, what: str = "the output directory") -> None:
    """``out`` may be written: missing or empty (non-empty only with ``overwrite``), and its parent writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SLRError(f"output path {out} exists and is not a directory", "choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SLRError(f"output directory {out} is not empty", "pass overwrite=True (--overwrite) or another path")
    check_writable_parent(out, what)


def _final_name(e: BaseException, tmp: Path, out: Path) -> Path:
    """The file an error names, as it would have been called in ``out`` (not in the temp folder); else ``out``."""
    name = getattr(e, "filename", None)
    if not name:
        return out
    p = Path(name).absolute()
    return out / p.relative_to(tmp) if p.is_relative_to(tmp) else p


def normalize_modes(root: str | os.PathLike) -> None:
    """Give every file under ``root`` 0o666 & ~umask and every folder (``root`` too) 0o777 & ~umask.

    Writers such as safetensors (and so ``save_pretrained``) create their files 0600; symlinks are left alone.
    """
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for top, dirs, files in os.walk(root):
        for name, mode in [(d, dmode) for d in dirs] + [(f, fmode) for f in files]:
            p = os.path.join(top, name)
            if not os.path.islink(p):
                os.chmod(p, mode)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir``; when the block exits cleanly it replaces ``out_dir``.

    ``out_dir`` is checked (``check_output_dir``) before and after the block. A non-empty ``out_dir`` (only with
    ``overwrite``) is moved aside first and put back if the rename fails. Never leaves partial output; a full disk
    is reported as one SLRError. Everything in the folder, and the folder, gets the normal mode (``normalize_modes``).
    """
    out = Path(out_dir).absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        yield tmp
        normalize_modes(tmp)
        check_output_dir(out, overwrite)
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
            raise SLRError(f"no space left on device while writing {_final_name(e, tmp, out)}",
                           "free disk space or write to another disk") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
