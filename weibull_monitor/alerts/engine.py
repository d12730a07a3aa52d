"""Alert rules: turn a snapshot's fits and dynamics into leveled, de-duplicated alerts.

A :class:`Rule` only says *what* breaches in one snapshot (:meth:`Rule.evaluate` -> list of :class:`Breach`).
*When* a breach becomes an :class:`Alert` is the :class:`AlertEngine`'s job, identical for every rule:

- ``warmup``: the rule is not evaluated before this optimizer step;
- ``patience``: a key must breach in this many consecutive snapshots (a snapshot without the breach resets it);
- ``cooldown``: after firing, the same (rule, key) stays quiet for this many optimizer steps;
- ``once``: the (rule, key) fires at most once per run.

The engine's counters are plain data (:meth:`AlertEngine.state_dict`) so a resumed run neither re-fires an
alert nor loses a streak. A rule that raises is reported once and skipped; it never stops training.

Adding a rule takes one small class::

    class LowR2(Rule):
        name, level = "low_r2", "warning"

        def evaluate(self, snapshot):
            return [Breach(key, (key,), {"r2": fit.r2}, f"{key}: R2 {fit.r2:.3f}")
                    for key, fit in snapshot.fits.items() if fit.ok and fit.r2 < 0.9]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("weibull_monitor.alerts")

LEVELS = ("info", "warning", "critical")
#: Python logging level used for each alert level.
LOGGING_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}
_STATE_VERSION = 1
_KEY_SEPARATOR = "\x1f"  # rule names and keys are user text: join them with a byte nobody types


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"alert level must be one of {LEVELS}, got {level!r}")
    return level


@dataclass(frozen=True)
class Alert:
    """One fired alert: what, where, how bad, the measured figures and a one-line message for humans."""

    step: int
    rule: str
    level: str
    key: str
    matrices: tuple[str, ...]
    values: dict[str, float]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rule": self.rule,
            "level": self.level,
            "key": self.key,
            "matrices": list(self.matrices),
            "values": dict(self.values),
            "message": self.message,
        }

    def __str__(self) -> str:
        return f"[{self.level}] {self.rule} at step {self.step}: {self.message}"


@dataclass(frozen=True)
class Breach:
    """What a rule found in one snapshot. ``key`` identifies the condition across snapshots (for patience,
    cooldown, once); ``level`` overrides the rule's level for this breach only."""

    key: str
    matrices: tuple[str, ...]
    values: dict[str, float]
    message: str
    level: str | None = None


class Rule:
    """Base class of alert rules. Subclasses set ``name``/``level`` and implement :meth:`evaluate`.

    The class attributes are the defaults; the constructor's keywords override them per instance.
    ``warmup`` and ``cooldown`` are in optimizer steps, ``patience`` in snapshots.
    """

    name: str = ""
    level: str = "warning"
    warmup: int = 0
    patience: int = 1
    cooldown: int = 0
    once: bool = False

    def __init__(
        self,
        *,
        name: str | None = None,
        level: str | None = None,
        warmup: int | None = None,
        patience: int | None = None,
        cooldown: int | None = None,
        once: bool | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        if level is not None:
            self.level = check_level(level)
        if warmup is not None:
            self.warmup = int(warmup)
        if patience is not None:
            if patience < 1:
                raise ValueError(f"patience must be >= 1 snapshot, got {patience}")
            self.patience = int(patience)
        if cooldown is not None:
            if cooldown < 0:
                raise ValueError(f"cooldown must be >= 0 steps, got {cooldown}")
            self.cooldown = int(cooldown)
        if once is not None:
            self.once = bool(once)

    @property
    def rule_name(self) -> str:
        return self.name or type(self).__name__

    def evaluate(self, snapshot: Any) -> list[Breach]:
        """The breaches in one snapshot (empty list: all fine)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.rule_name!r}, level={self.level!r}, warmup={self.warmup}, "
            f"patience={self.patience}, cooldown={self.cooldown}, once={self.once})"
        )


@dataclass
class _KeyState:
    streak: int = 0
    last_fired: int | None = None
    fired: bool = False


@dataclass
class AlertEngine:
    """Applies warmup, patience, cooldown and once to every rule's breaches; resumable via ``state_dict``."""

    rules: Sequence[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rules = list(self.rules)
        names = [rule.rule_name for rule in self.rules]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"alert rule names must be unique, duplicated: {sorted(duplicates)}")
        for rule in self.rules:
            check_level(rule.level)
        self._state: dict[str, _KeyState] = {}
        self._broken_rules: set[str] = set()

    def __call__(self, snapshot: Any) -> list[Alert]:
        step = int(snapshot.step)
        alerts: list[Alert] = []
        for rule in self.rules:
            name = rule.rule_name
            if step < rule.warmup:
                continue
            try:
                breaches = list(rule.evaluate(snapshot))
            except Exception:  # a broken rule is reported once and never stops training
                if name not in self._broken_rules:
                    self._broken_rules.add(name)
                    logger.exception("alert rule %s raised; it is skipped until it evaluates again", name)
                continue
            if name in self._broken_rules:
                self._broken_rules.discard(name)
                logger.warning("alert rule %s evaluates again", name)
            breached = {b.key: b for b in breaches}
            prefix = name + _KEY_SEPARATOR
            for state_key, state in self._state.items():  # keys that stopped breaching lose their streak
                if state_key.startswith(prefix) and state_key[len(prefix) :] not in breached:
                    state.streak = 0
            for key, breach in breached.items():
                state = self._state.setdefault(prefix + key, _KeyState())
                state.streak += 1
                if state.streak < rule.patience:
                    continue
                if state.last_fired is not None and step < state.last_fired:
                    # fired "later" than now: a timeline that was rolled back. That firing never happened on this
                    # timeline, so it neither starts a cooldown nor spends a once-only alert.
                    state.last_fired = None
                    state.fired = False
                if rule.once and state.fired:
                    continue
                if state.last_fired is not None and step - state.last_fired < rule.cooldown:
                    continue
                state.fired = True
                state.last_fired = step
                alerts.append(
                    Alert(
                        step=step,
                        rule=name,
                        level=check_level(breach.level or rule.level),
                        key=key,
                        matrices=tuple(breach.matrices),
                        values={k: float(v) for k, v in breach.values.items()},
                        message=breach.message,
                    )
                )
        return alerts

    def rewind(self, step: int) -> None:
        """Forget what happened after ``step`` when no saved state of that step exists (a rollback the monitor was
        not given the state of): firings after ``step`` are undone (no cooldown, a once-only rule may fire
        again), and every streak restarts, since how long it was at ``step`` is unknown. Prefer
        :meth:`load_state_dict` with the state saved at ``step``, which is exact."""
        for state in self._state.values():
            state.streak = 0
            if state.last_fired is not None and state.last_fired > step:
                state.last_fired = None
                state.fired = False

    def state_dict(self) -> dict[str, Any]:
        """Counters as JSON-friendly plain data."""
        return {
            "version": _STATE_VERSION,
            "keys": {
                key: {"streak": s.streak, "last_fired": s.last_fired, "fired": s.fired}
                for key, s in self._state.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not an AlertEngine state of version {_STATE_VERSION}: {state!r:.200}")
        self._state = {
            key: _KeyState(
                int(v["streak"]), None if v["last_fired"] is None else int(v["last_fired"]), bool(v["fired"])
            )
            for key, v in state["keys"].items()
        }
