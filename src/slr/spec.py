"""What one matrix may keep: a LayerSpec (sparsity or N:M, rank), and the one rounding rule for kept values."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SLRError
from .quant import QuantSpec

FACTOR_BITS = (16, 8, 4)


@dataclass(frozen=True)
class LayerSpec:
    """What one matrix may keep.

    sparsity: fraction of entries of S that are zero (unstructured). Ignored when ``nm`` is set.
    nm:       (N, M) -- keep N of every M consecutive weights along the input dimension.
    rank:     rank of the low-rank part L = U @ V (0 = pure pruning).
    bits:     bit width of S's values on a group-wise grid (``quant.QuantSpec``: ``group_size`` inputs a group,
              symmetric or not, fp16 scales); None stores them as floats. ``sparsity=0`` with bits is a dense
              quantized S.
    factor_bits: bit width of U and V (16 = fp16 floats; 8 or 4 = a symmetric grid in groups along each row).
    Rank-only methods use ``sparsity=1`` (no sparse part).
    """

    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    rank: int = 0
    bits: int | None = None
    group_size: int = 64
    sym: bool = True
    factor_bits: int = 16

    @property
    def quant(self) -> QuantSpec | None:
        """The grid of S's values, or None."""
        return None if self.bits is None else QuantSpec(self.bits, self.group_size, self.sym)

    def factor_quant(self, length: int) -> QuantSpec | None:
        """The grid of a factor whose rows have ``length`` entries (groups of group_size, or the whole row)."""
        if self.factor_bits == 16:
            return None
        return QuantSpec(self.factor_bits, self.group_size if length % self.group_size == 0 else length, sym=True)

    def validate(self, d_out: int | None = None, d_in: int | None = None) -> None:
        if self.nm is not None:
            n, m = self.nm
            if not (0 <= n < m):
                raise SLRError(f"N:M pattern {n}:{m} is invalid (need 0 <= N < M)", "use e.g. --pattern 2:4")
            if d_in is not None and d_in % m != 0:
                raise SLRError(
                    f"N:M pattern {n}:{m} does not divide the input width {d_in}",
                    f"choose M that divides {d_in}",
                )
        elif not (0.0 <= self.sparsity <= 1.0):
            raise SLRError(f"sparsity {self.sparsity} is outside [0, 1]", "pass a fraction such as --sparsity 0.5")
        if self.rank < 0:
            raise SLRError(f"rank {self.rank} is negative", "pass --rank 0 or a positive integer")
        if self.bits is not None:
            self.quant.validate(d_in)
        if self.factor_bits not in FACTOR_BITS:
            raise SLRError(f"factor bit width {self.factor_bits} is not one of {', '.join(map(str, FACTOR_BITS))}",
                           "pass --factor-bits 16, 8 or 4")
        if d_out is not None and d_in is not None and self.rank > min(d_out, d_in):
            raise SLRError(
                f"rank {self.rank} exceeds min(d_out, d_in) = {min(d_out, d_in)}",
                f"pass --rank <= {min(d_out, d_in)}",
            )

    def kept(self, d_out: int, d_in: int) -> int:
        """Number of sparse values kept for a [d_out, d_in] matrix (row-wise rounding)."""
        if self.nm is not None:
            n, m = self.nm
            return d_out * (d_in // m) * n
        return d_out * keep_per_row(d_in, self.sparsity)

    @property
    def label(self) -> str:
        s = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"u{round(self.sparsity * 100)}"
        if self.bits is not None:
            s += f"-q{self.bits}g{self.group_size}{'' if self.sym else 'a'}"
        s += f"+r{self.rank}" if self.rank else ""
        return s + (f"-f{self.factor_bits}" if self.rank and self.factor_bits != 16 else "")


def keep_per_row(d_in: int, sparsity: float) -> int:
    """Entries kept per row for unstructured sparsity (the single rounding rule used everywhere)."""
    return int(round(d_in * (1.0 - sparsity)))


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """Parse '2:4' into (2, 4)."""
    if text is None:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise SLRError(f"cannot parse N:M pattern {text!r}", "write it as N:M, e.g. --pattern 2:4") from None
    LayerSpec(nm=(n, m)).validate()
    return n, m
