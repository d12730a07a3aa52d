"""GuardedSink: a sink that raises or hangs is reported once and never stops training.

Every call is handed to a worker thread through a bounded queue, so the training thread never waits on a
dashboard. Faults are reported per episode: the first failure is logged with its cause (traceback), further
failures are only counted, and the first success afterwards logs the recovery. A call that has not returned
after ``timeout`` seconds is reported as a hang; while it hangs new calls queue up to ``queue_size`` and are
dropped (and counted) beyond that. Sinks with ``run_in_thread = False`` are called inline: exceptions are
still contained, but a hang there cannot be bounded.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

from weibull_monitor.sinks.base import Sink

logger = logging.getLogger("weibull_monitor.sinks")

_STOP = object()


class GuardedSink(Sink):
    """Wraps one sink; same interface. ``timeout`` in seconds bounds how long a call may run before it is
    reported as hanging and how long :meth:`flush`/:meth:`close` wait."""

    def __init__(self, sink: Sink, *, timeout: float = 10.0, queue_size: int = 256) -> None:
        self.sink = sink
        self.timeout = float(timeout)
        self.calls = 0  # calls that returned normally
        self.failures = 0  # calls that raised
        self.dropped = 0  # calls dropped because the queue was full (a hanging or very slow sink)
        # method -> failures in the current episode (first failure reported, the rest counted); per method so
        # a sink whose log_alert fails while log_metrics works is not reported as flapping
        self._faulty: dict[str, int] = {}
        self._hang_reported = False
        self._drop_reported = False
        self._busy_since: float | None = None
        self._busy_method = ""
        self._pending = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(queue_size)))
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def name(self) -> str:
        try:
            return str(self.sink.name)
        except Exception:  # a sink whose name property raises still gets guarded
            return type(self.sink).__name__

    @property
    def healthy(self) -> bool:
        """False while the sink is failing or hanging."""
        return not self._faulty and not self._hang_reported

    # ------------------------------------------------------------------------------------------- interface

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit("log_metrics", (metrics, step))

    def log_alert(self, alert: Any) -> None:
        self._submit("log_alert", (alert,))

    def log_snapshot(self, snapshot: Any) -> None:
        self._submit("log_snapshot", (snapshot,))

    def rewind(self, step: int, superseded: Any = ()) -> None:
        # duck-typed sinks without rewind() take the resumed points as they come
        if callable(getattr(self.sink, "rewind", None)):
            self._submit("rewind", (step, superseded))  # in order with the sink's other calls

    def location(self) -> list[dict[str, Any]]:
        try:
            return list(getattr(self.sink, "location", list)() or ())
        except Exception:  # where a sink writes is informative only
            return []

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call has run (at most ``timeout`` s, default the guard's). True if drained."""
        self._check_hang()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Run the queued calls and the sink's ``close``; abandon a sink that does not finish in time."""
        if self._closed:
            return
        self._submit("flush", ())
        self._submit("close", ())
        self._closed = True
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=0.1)
        self._thread.join(self.timeout if timeout is None else timeout)
        if self._thread.is_alive():
            logger.warning(
                "sink %s did not finish closing within %.0f s (stuck in %s); abandoned",
                self.name,
                self.timeout if timeout is None else timeout,
                self._busy_method or "its queue",
            )

    # ------------------------------------------------------------------------------------------- machinery

    def _submit(self, method: str, args: tuple) -> None:
        if self._closed:
            return
        if not getattr(self.sink, "run_in_thread", True):
            self._call(method, args)
            return
        self._check_hang()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"weibull-sink-{self.name}", daemon=True)
            self._thread.start()
        with self._cond:
            self._pending += 1
        try:
            self._queue.put_nowait((method, args))
        except queue.Full:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
            self.dropped += 1
            if not self._drop_reported:
                self._drop_reported = True
                logger.warning(
                    "sink %s is not keeping up (queue of %d full); dropping its data until it catches up",
                    self.name,
                    self._queue.maxsize,
                )

    def _check_hang(self) -> None:
        since = self._busy_since
        if since is not None and not self._hang_reported and time.monotonic() - since > self.timeout:
            self._hang_reported = True
            logger.warning(
                "sink %s has not returned from %s for more than %.0f s; training continues without waiting",
                self.name,
                self._busy_method,
                self.timeout,
            )

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            method, args = item
            try:
                self._call(method, args)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _call(self, method: str, args: tuple) -> None:
        self._busy_method, self._busy_since = method, time.monotonic()
        try:
            getattr(self.sink, method)(*args)
        except Exception as exc:
            self.failures += 1
            if method not in self._faulty:
                self._faulty[method] = 0
                logger.warning(
                    "sink %s failed in %s: %s: %s (further failures are counted, not logged, until it recovers)",
                    self.name,
                    method,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
            self._faulty[method] += 1
            return
        finally:
            elapsed = time.monotonic() - (self._busy_since or time.monotonic())
            self._busy_since = None
        self.calls += 1
        if method in self._faulty:
            logger.warning(
                "sink %s recovered in %s after %d failed calls", self.name, method, self._faulty.pop(method)
            )
        if self._hang_reported:
            logger.warning("sink %s returned again (a call took %.1f s)", self.name, elapsed)
            self._hang_reported = False
        if self._drop_reported and self._queue.qsize() < self._queue.maxsize // 2:
            logger.warning("sink %s caught up; %d calls were dropped in total", self.name, self.dropped)
            self._drop_reported = False
