"""Progress of long loops: a tqdm bar on a terminal, a log line every `LOG_EVERY_S` seconds otherwise.

Use `Progress(iterable, desc=..., unit=...)` around any loop a user may wait on (reading an image
folder, embedding a set, a training epoch). Under a scheduler, in CI, or with stderr redirected to a
file there is no bar, and minutes without a line look like a hang: there the loop logs
"desc: 1,200/5,000 images (24%), 40.0 images/s, about 95 s left" at INFO every `LOG_EVERY_S`
seconds (and a closing line when it logged any). No torch; tqdm only.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress", "LOG_EVERY_S"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0       # seconds between progress lines when stderr is not a terminal

T = TypeVar("T")


class Progress:
    """Iterate `iterable`, showing progress; `set_postfix(**values)` adds values to the bar/line.

    total: items expected (default len(iterable) when it has one). enabled=False shows nothing
    (e.g. on DDP ranks other than 0). logger: where the lines go (default this module's).
    """

    def __init__(self, iterable: Iterable[T], *, desc: str, unit: str = "it",
                 total: int | None = None, enabled: bool = True,
                 logger: logging.Logger | None = None) -> None:
        self._items = iterable
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)   # type: ignore[arg-type]
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self._log = logger or log
        self._postfix: dict[str, Any] = {}
        self._bar = (tqdm(iterable, desc=desc, total=self.total, unit=unit, leave=False,
                          dynamic_ncols=True) if enabled and _on_terminal() else None)

    def __iter__(self) -> Iterator[T]:
        if self._bar is not None:
            yield from self._bar
            return
        if not self.enabled:
            yield from self._items
            return
        start = last = time.monotonic()
        n, logged = 0, False
        for item in self._items:
            yield item
            n += 1
            now = time.monotonic()
            if now - last >= LOG_EVERY_S:
                last, logged = now, True
                self._log.info("%s", self._line(n, now - start))
        if logged:
            self._log.info("%s: done, %d %s in %.0f s", self.desc, n, self.unit,
                           time.monotonic() - start)

    def _line(self, n: int, elapsed: float) -> str:
        rate = n / max(elapsed, 1e-9)
        if self.total:
            left = (self.total - n) / rate if rate > 0 else float("inf")
            text = (f"{self.desc}: {n:,}/{self.total:,} {self.unit} ({100.0 * n / self.total:.0f}%),"
                    f" {rate:.3g} {self.unit}/s, about {left:.0f} s left")
        else:
            text = f"{self.desc}: {n:,} {self.unit}, {rate:.3g} {self.unit}/s"
        extra = ", ".join(f"{k}={v}" for k, v in self._postfix.items())
        return f"{text}; {extra}" if extra else text

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)
        self._postfix = values

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed stderr
        return False
