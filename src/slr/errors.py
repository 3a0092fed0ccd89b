"""User-facing errors: one line that names the problem and the fix."""

import errno


class SLRError(Exception):
    """An error caused by bad input or environment. The CLI prints it as one line, no traceback."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" -- fix: {fix}" if fix else ""))


def is_disk_full(e: BaseException) -> bool:
    """True for 'no space left' / 'quota exceeded' as OSError, or as safetensors' SafetensorError text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    s = str(e)
    return "No space left on device" in s or "os error 28" in s or "Disk quota exceeded" in s


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 300 characters."""
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]
