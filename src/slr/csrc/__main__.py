"""``python -m slr.csrc --build``: compile slr's C++ kernel (scripts/install.sh runs it). Exits 0 even when it cannot
be built (slr then runs the torch path): an install never fails for want of a compiler. ``--check`` exits 1 unless
the kernel is built and loads."""

from __future__ import annotations

import argparse
import sys

from . import build, library_path, load, reason


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slr.csrc", description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="compile the kernel into its cache folder")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the kernel is built and loads on this CPU")
    a = ap.parse_args(argv)
    if a.build and build() is not None:
        print(f"slr: built the C++ int4 kernel: {library_path()}")
    if a.check or not a.build:
        ok = load() is not None
        print(f"slr: C++ int4 kernel: {'ready' if ok else reason()}")
        return 0 if ok or not a.check else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
