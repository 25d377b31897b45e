"""Error types raised by dynsim.

Every error a user can trigger with bad input derives from :class:`DynsimError`, so
callers (and the CLI) can catch one type and print its message. Messages name the bad
value and the fix.
"""

from __future__ import annotations


class DynsimError(ValueError):
    """Base class of every user-facing dynsim error."""


class ConfigError(DynsimError):
    """A setting (CLI flag, config value, function argument) is out of range or unknown."""


class DataError(DynsimError):
    """A data file is missing or corrupt, or a data array has the wrong shape or NaN/Inf."""


class DivergenceError(DynsimError):
    """The dynamics diverged (non-finite or unbounded state) and the caller asked to raise."""


class OutputError(DynsimError):
    """An output path is unusable (a directory, under a file, read-only), already holds a
    result, is being written by another process, or writing it failed (disk full, I/O error)."""
