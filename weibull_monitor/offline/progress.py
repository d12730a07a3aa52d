"""The scan's progress bar: tqdm (rate and time left) on stderr, only when stderr is a terminal or when asked.

Labels are tensor names from the file, so they are escaped (:func:`~weibull_monitor.offline.text.printable`)
before they reach the terminal: a name holding escape sequences cannot clear the screen or forge a line.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from weibull_monitor.offline.text import printable

__all__ = ["Progress"]

_LABEL = 40  # characters of the current tensor's name shown (its end: the distinctive part)


class Progress:
    """A tqdm bar on ``stream`` (stderr), drawn only when the stream is a terminal unless ``enabled`` says."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        try:
            terminal = self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or exotic stream
            terminal = False
        self.enabled = terminal if enabled is None else bool(enabled)
        self.total = max(total, 1)
        self.done = 0
        self._bar: Any = None
        if self.enabled:
            self._bar = _tqdm(self.total, self.stream)

    def advance(self, label: str) -> None:
        self.done += 1
        if self._bar is None:
            return
        text = printable(label)
        self._bar.set_postfix_str(text[-_LABEL:] if len(text) > _LABEL else text, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tqdm(total: int, stream: TextIO) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still scans, just without a bar
        return None
    return tqdm(
        total=total,
        file=stream,
        desc="scan",
        unit="matrix",
        dynamic_ncols=True,
        leave=True,
    )
