"""A published bundle's stamp: what `--watch` decides with it, and reads that never mix two bundles.

Use `BundleWatch(interval_s, bundle_stamp(path))` in the loop that looks at the bundle every
interval (the single server's asyncio task, the supervisor of `--workers`): reload when
`due(stamp)`, then tell it `done(stamp, ok)`. A reload of a stamp that was refused is retried with
backoff (the interval, doubling up to `MAX_BACKOFF_S`) until it loads: a bundle copied in place
shows its new manifest.json before the files it names, so the first try can fail. A newer stamp
is tried at the next look.
`read_published(path, read)` runs `read` again when the bundle was replaced while it ran
(`load_bundle`, the server's Detector), so its result comes from one published bundle.
Test: tests/runtime/test_server_reload.py, tests/runtime/test_bank_edit.py (replacement while read).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import BundleError

__all__ = ["BundleWatch", "bundle_stamp", "read_published", "MAX_BACKOFF_S"]

MAX_BACKOFF_S = 60.0    # longest wait between two tries of a refused bundle


def bundle_stamp(bundle: Path) -> tuple[int, ...] | None:
    """What --watch compares: manifest.json's inode, size and mtime (None while it is missing)."""
    try:
        st = (bundle / "manifest.json").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class BundleWatch:
    """The reload decisions of --watch (see the module docstring); `served` is the stamp of the
    bundle being served."""

    def __init__(self, interval_s: float, served: tuple[int, ...] | None):
        self.interval_s, self.served = interval_s, served
        self._failed: tuple[int, ...] | None = None
        self._backoff, self._retry_at = interval_s, 0.0

    def due(self, stamp: tuple[int, ...] | None) -> bool:
        """Whether to reload the bundle whose manifest has `stamp` now."""
        if stamp is None or stamp == self.served:
            return False
        return stamp != self._failed or time.monotonic() >= self._retry_at

    def done(self, stamp: tuple[int, ...] | None, ok: bool) -> float | None:
        """Record a reload of `stamp`; the wait before it is tried again, None when it loaded."""
        if ok:
            self.served, self._failed = stamp, None
            return None
        self._backoff = (self.interval_s if stamp != self._failed
                         else min(2 * self._backoff, MAX_BACKOFF_S))
        self._failed, self._retry_at = stamp, time.monotonic() + self._backoff
        return self._backoff


_READ_ATTEMPTS = 3      # a bundle replaced while it is read is read again (rwood-bank --force)
T = TypeVar("T")


def read_published(root: str | os.PathLike, read: Callable[[], T]) -> T:
    """`read()` (anything that reads the bundle at `root`), done again when the bundle was
    replaced meanwhile (`bundle_stamp` changed), at most 3 times: the result comes
    from one published bundle, never from a mix of two. A BundleError raised while the bundle
    was being replaced is retried too; otherwise it propagates."""
    root = Path(root)
    for attempt in range(_READ_ATTEMPTS):
        stamp = bundle_stamp(root)
        try:
            result = read()
        except BundleError:
            if attempt + 1 < _READ_ATTEMPTS and bundle_stamp(root) != stamp:
                continue
            raise
        if bundle_stamp(root) == stamp:
            return result
    raise BundleError(f"replaced {_READ_ATTEMPTS} times while it was being read; try again",
                      path=root)
