"""Typed boundary errors shared by every part of reweightood.

Use these wherever user-supplied input (a file, a CLI option, an RPC field, a bundle) is rejected:
the CLIs turn them into a one-line message and exit status 2, the server into a gRPC status.
Each carries the offending path or field so the message can name it.
"""
from __future__ import annotations

__all__ = ["ReweightOODError", "InputError", "BundleError", "DataError", "CheckpointError"]


class ReweightOODError(Exception):
    """Base class: an error the user can fix, with a message that says how."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.message = message              # without the path and field: for a row or a log
        where = ", ".join(x for x in (self.path, f"field '{field}'" if field else None) if x)
        super().__init__(f"{where}: {message}" if where else message)


class InputError(ReweightOODError):
    """A request, option or image that cannot be used (bad bytes, wrong shape, out of range)."""


class BundleError(ReweightOODError):
    """A bundle directory that is missing, incomplete, altered or of an unknown format."""


class DataError(ReweightOODError):
    """A dataset file or folder that is missing or not in the expected layout."""


class CheckpointError(ReweightOODError):
    """A run directory or checkpoint that is missing or unreadable."""
