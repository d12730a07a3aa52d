"""Resume and rewind: the monitor follows the timeline the weights actually took.

A training run that restarts from a checkpoint of step s (a crash, or a rollback after a loss spike, perhaps with a
lower learning rate or other data) continues from the weights of step s. :meth:`ResumeMixin.resume` puts the monitor
in the state it had at s and starts a new branch of the run in the store at s: the snapshots, aggregates and alerts
the abandoned timeline wrote after s are kept but marked superseded, never mixed into the run's series, and the
dashboards are told (TensorBoard hides the abandoned points, the others stop before sending a step twice).

Where the state at s comes from, best first:

1. the state saved in the checkpoint (``load_state_dict``, the HF and Lightning callbacks): exact;
2. the state the store (or, without a store, the monitor's memory of its last snapshots) kept with the last
   snapshot r <= s: exact for λ_first and the alert counters; T/τ adds the s - r updates between at the current
   learning rate (exact when a snapshot was taken at s, which is the case when checkpoints fall on due steps);
3. nothing (s is older than the first snapshot, or a fresh start at step 0): a fresh state.

``observe(t)`` with t below the last step seen (and ``observe(0)`` again after a restore) is a rollback nobody
announced: the monitor rewinds to the step before t (to the step the weights were restored at, when the optimizer
hook counted the updates since) and warns.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from weibull_monitor.monitor.optim import group_rates

logger = logging.getLogger("weibull_monitor")

__all__ = ["ResumeMixin", "state_step", "writer_identity"]

#: Monitor states kept in memory for rewinds without a store (one per snapshot, newest last).
RECENT_STATES = 64


def writer_identity() -> dict[str, Any]:
    """Who writes a branch: a unique writer id, the process id and the host name."""
    return {"writer": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname()}


def state_step(state: Mapping[str, Any]) -> int:
    """The optimizer step a saved monitor state describes (-1: before step 0)."""
    for key in ("last_seen_step", "last_snapshot_step"):
        value = state.get(key)
        if value is not None:
            return int(value)
    return -1


def _steps(first: Any, last: Any) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _alive(entry: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
    """True when the writer of a branch is another process on this host that still runs."""
    pid, host = entry.get("pid"), entry.get("host")
    if pid is None or host != me.get("host") or int(pid) == int(me.get("pid", -1)):
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


class ResumeMixin:
    """The resume/rewind part of :class:`~weibull_monitor.monitor.monitor.WeibullMonitor` (uses its builder,
    engine, store writer and sinks)."""

    # provided by WeibullMonitor
    run_name: str
    optimizer: Any
    builder: Any
    engine: Any
    stop_requested: bool
    _store_writer: Any
    _sinks: list[Any]
    _last_seen_step: int | None
    _last_snapshot_step: int | None
    _hook: Any
    _run_id: int | None

    def _init_resume(self) -> None:
        self.identity = writer_identity()
        self._recent_states: deque[tuple[int, dict[str, Any]]] = deque(maxlen=RECENT_STATES)
        self._since_observe: list[Any] = []  # per-group rates of the updates the hook saw since the last observe
        self._observed = False  # this monitor has observed a step itself (not only restored one)
        self._told_sinks: set[int] = set()  # fork steps the sinks already heard of
        self._takeover_reported: set[int] = set()
        self.rewinds: list[dict[str, Any]] = []  # every resume/rewind this monitor made: step, reason, superseded

    # ------------------------------------------------------------------------------------------ public

    def resume(self, step: int, state: Mapping[str, Any] | None = None, *, reason: str = "resume") -> None:
        """Training continues from optimizer step ``step``: the weights of that step were restored.

        ``state``: the monitor state saved with those weights (:meth:`state_dict` in the checkpoint), restored
        exactly. Without it the state comes from the last snapshot at or before ``step`` (store or memory), or
        starts fresh. The store starts a new branch of the run at ``step``; later snapshots of the abandoned
        timeline are kept, marked superseded, outside the run's series. ``step`` -1: a fresh start before step 0.
        """
        step = int(step)
        self._flush_store()
        message = None
        if state is not None:
            self._apply_state(state)
            self._last_seen_step = step if step >= 0 else None
            last = state.get("last_snapshot_step")
            self._last_snapshot_step = None if last is None or int(last) > step else int(last)
            source = "the checkpoint's monitor state"
        else:
            source, message = self._restore_state_at(step)
        self._since_observe = []
        while self._recent_states and self._recent_states[-1][0] > step:
            self._recent_states.pop()
        self._fork(step, reason, source, message)

    def other_runs(self) -> list[str]:
        """Names of the other runs in this monitor's store ([] without a store, or when it cannot be read)."""
        if self._store_writer is None:
            return []
        try:
            store = self._open_store()  # type: ignore[attr-defined]
            return [r["name"] for r in store.runs() if r["name"] != self.run_name]
        except Exception:
            return []

    # ------------------------------------------------------------------------------------------ observe hooks

    def _went_back(self, step: int) -> bool:
        """True when ``observe(step)`` is a rollback nobody announced (it then rewinds the monitor)."""
        previous = self._last_seen_step
        if previous is None:
            return False
        restarted = step == previous == 0 and not self._observed
        if step >= previous and not restarted:
            return False
        updates = list(self._since_observe)
        restored_at = step - len(updates) if self._hook is not None and updates else step - 1
        logger.warning(
            "weibull-monitor: step went back from %d to %d with no resume() or load_state_dict(): treating it "
            "as a rollback to step %d of run %r (pass the monitor's state_dict() in your checkpoints for an "
            "exact resume)",
            previous,
            step,
            restored_at,
            self.run_name,
        )
        self.resume(restored_at, reason="restart" if restored_at < 0 else "step went back")
        for rates in updates:  # the updates since the restored weights, as the optimizer made them
            self.builder.budget.record(rates)
        return True

    def _record_update(self, rates: Sequence[tuple[Any, Any]]) -> None:
        self._since_observe.append(rates)

    def _remember(self, step: int, state: dict[str, Any]) -> None:
        self._recent_states.append((int(step), state))

    # ------------------------------------------------------------------------------------------ state

    def _restore_state_at(self, step: int) -> tuple[str, str | None]:
        """Restore the state of the last snapshot at or before ``step``; (where it came from, a note or None)."""
        found = None
        for snap_step, state in reversed(self._recent_states):
            if snap_step <= step:
                found = (snap_step, state, "memory")
                break
        if found is None:
            stored = self._stored_state_at(step)
            if stored is not None:
                found = (stored["step"], stored["state"], "store")
        if found is None and self._store_writer is None and len(self._recent_states) == RECENT_STATES:
            # older than the snapshots kept in memory, and no store: roll back what can be rolled back
            self.engine.rewind(step)
            self._last_seen_step, self._last_snapshot_step = step, None
            return "the current state, partly rolled back", (
                f"step {step} is older than the last {RECENT_STATES} snapshots kept in memory and there is no "
                "store: alert firings after it are undone and streaks restart, but λ_first and T/τ cannot be "
                "rolled back (T/τ overcounts); pass the monitor's state_dict() in your checkpoints"
            )
        if found is None:
            first = self._first_stored_step()
            self._fresh_state()
            self._last_seen_step = step if step >= 0 else None
            if step < 0:
                return "a fresh state (a restart at step 0)", None
            note = (
                f"step {step} is older than the run's first snapshot (step {first}): no monitor state exists "
                f"there, so scale growth is measured from the next snapshot and T/τ counts from step {step}"
                if first is not None
                else f"no monitor state for step {step}: scale growth is measured from the next snapshot and "
                f"T/τ counts from step {step}"
            )
            return "a fresh state", note
        snap_step, state, where = found
        self._apply_state(state)
        self._last_snapshot_step = snap_step
        self._last_seen_step = step
        note = None
        if step > snap_step and self.optimizer is not None:
            # the updates between the snapshot and the restored weights: at the learning rate in use now
            self.builder.budget.record(group_rates(self.optimizer), step - snap_step)
            note = (
                f"T/τ for steps {snap_step + 1}-{step} estimated at the current learning rate (no state was "
                f"saved at step {step})"
            )
        return f"the state saved with the snapshot of step {snap_step} ({where})", note

    def _stored_state_at(self, step: int) -> dict[str, Any] | None:
        if self._store_writer is None:
            return None
        try:
            store, run_id = self._store_writer.target()
            return store.state_at(run_id, step)
        except Exception as error:
            logger.warning("weibull-monitor: cannot read the store for the state at step %d: %r", step, error)
            return None

    def _first_stored_step(self) -> int | None:
        if self._store_writer is None:
            return None
        try:
            store, run_id = self._store_writer.target()
            steps = store.steps(run_id)
        except Exception:
            return None
        return steps[0] if steps else None

    def _fresh_state(self) -> None:
        fresh_builder = type(self.builder)()
        self.builder.load_state_dict(fresh_builder.state_dict())
        self.engine.load_state_dict({"version": 1, "keys": {}})
        self.stop_requested = False
        self._last_snapshot_step = None

    # ------------------------------------------------------------------------------------------ store + sinks

    def _flush_store(self) -> None:
        if self._store_writer is not None and self._store_writer.pending:
            self._store_writer.retry()

    def _fork(self, step: int, reason: str, source: str, message: str | None) -> None:
        record = {"step": step, "reason": reason, "source": source, "time": time.time(), "superseded": []}
        self.rewinds.append(record)
        if message:
            logger.warning("weibull-monitor: run %r resumed at step %d: %s", self.run_name, step, message)
        if self._store_writer is None:
            self._tell_sinks(step, [])
            return
        self._told_sinks.discard(step)
        state = self.state_dict()  # type: ignore[attr-defined]
        result = self._store_writer.fork(step, reason=reason, state=state, message=message)
        if result is None:  # the store is busy: the fork waits in order; the dashboards hear of it now
            try:
                store, run_id = self._store_writer.target()
                preview = store.superseded_by_rewind(run_id, step)
            except Exception:
                preview = []
            self._told_sinks.add(step)
            self._tell_sinks(step, preview)
            record["superseded"] = preview
            logger.warning(
                "weibull-monitor: run %r resumed at step %d from %s; the store is busy, its new branch is written "
                "with the next snapshot",
                self.run_name,
                step,
                source,
            )
        else:
            record["branch"] = result["branch"]
            record["superseded"] = result["superseded"]
            self._report_fork(result, source)

    def _on_fork(self, result: dict[str, Any]) -> None:
        """Called by the store writer when a fork is written (now, or later after a busy store)."""
        step = int(result["fork_step"])
        quiet = result.get("implicit") and not any(s.get("n_snapshots") for s in result["superseded"])
        if step not in self._told_sinks and not quiet:  # a writer's first branch that replaced nothing: no news
            self._tell_sinks(step, result["superseded"])
        self._told_sinks.discard(step)
        if result.get("implicit"):
            self._report_fork(result, None)

    def _report_fork(self, result: dict[str, Any], source: str | None) -> None:
        step, branch = int(result["fork_step"]), result["branch"]
        previous = result.get("previous") or {}
        gone = [s for s in result["superseded"] if s.get("n_snapshots")]
        if gone:
            first = min(s["first_step"] for s in gone)
            last = max(s["last_step"] for s in gone)
            logger.warning(
                "weibull-monitor: run %r %s at step %d%s: %s of the abandoned timeline (%d snapshots, branch%s %s) "
                "are kept as superseded rows, outside the run's series; the live timeline continues as branch %s",
                self.run_name,
                "restarted" if step < 0 else "rewound",
                step,
                f" from {source}" if source else "",
                _steps(first, last),
                sum(s["n_snapshots"] for s in gone),
                "es" if len(gone) > 1 else "",
                ", ".join(str(s["branch"]) for s in gone),
                branch,
            )
        elif not result.get("claimed") and previous:
            logger.info(
                "weibull-monitor: run %r continues at step %d as branch %s%s",
                self.run_name,
                step,
                branch,
                f" from {source}" if source else "",
            )
        if previous and _alive(previous, self.identity):
            logger.warning(
                "weibull-monitor: run %r was last written by another process that still runs (pid %s on %s); "
                "this process now owns the run's live timeline and that one's later snapshots go to its own "
                "superseded branch %s. Give each process its own run_name to keep both as runs.",
                self.run_name,
                previous.get("pid"),
                previous.get("host"),
                previous.get("branch"),
            )

    def _on_superseded(self, store: Any, run_id: int, step: int) -> None:
        """A snapshot of ours went to the superseded tables: another writer took the run over. Said once."""
        mine = self._store_writer.branch
        if mine in self._takeover_reported:
            return
        self._takeover_reported.add(mine)
        live = next((b for b in store.branches(run_id) if b.get("live")), {})
        logger.warning(
            "weibull-monitor: run %r was taken over by another writer (pid %s on %s, branch %s, forked at step %s); "
            "this process's snapshots from step %d on are kept in its own branch %s, superseded: outside the live "
            "timeline (read them with branch=%s). Give each process its own run_name to keep both as runs.",
            self.run_name,
            live.get("pid"),
            live.get("host"),
            live.get("branch"),
            live.get("fork_step"),
            step,
            mine,
            mine,
        )

    def _tell_sinks(self, step: int, superseded: Sequence[Mapping[str, Any]]) -> None:
        """Every sink hears of the rewind (in order with its other calls) and gets time to act on it."""
        entries = []
        for entry in superseded:
            entry = dict(entry)
            me = self.identity
            entry["this_process"] = entry.get("pid") == me["pid"] and entry.get("host") == me["host"]
            entries.append(entry)
        for sink in self._sinks:
            sink.rewind(step, entries)
        for sink in self._sinks:
            sink.flush()

    def _dashboards(self) -> list[dict[str, Any]]:
        """Where the sinks write (recorded with the branch, so a later rewind can find the abandoned points)."""
        out = []
        for sink in self._sinks:
            try:
                out.extend(dict(loc) for loc in sink.location() or ())
            except Exception:
                continue
        return out
