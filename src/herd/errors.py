"""The errors a user can fix: each message is the one line they see, with exit code 2 and no traceback."""

from __future__ import annotations


class HerdError(ValueError):
    """An error the user can fix; its message is the one line they see (no traceback)."""


class ConfigError(HerdError):
    """A config that composes but cannot run."""


class DataError(HerdError):
    """Data that cannot be used as configured (bad rows under bad_rows=error, an empty split, ...)."""


class InputError(HerdError):
    """A file or directory the user named is missing, of the wrong kind, or unreadable."""
