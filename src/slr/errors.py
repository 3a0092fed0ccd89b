"""User-facing errors: one line that names the problem and the fix."""


class SLRError(Exception):
    """An error caused by bad input or environment. The CLI prints it as one line, no traceback."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" -- fix: {fix}" if fix else ""))
