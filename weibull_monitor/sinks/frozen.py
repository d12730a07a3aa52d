"""Read-only views of what sinks receive: a sink cannot change the snapshot that the store (possibly writing it
later, from its backlog) and every other sink see.

A sink that edited its snapshot (``snapshot.step = 1001``, ``del snapshot.fits[...]``) used to corrupt the store's
deferred write and the other sinks' data. Now every sink gets a :class:`SnapshotView`: the same fields, dicts that
refuse changes (:class:`ReadOnlyDict`), alerts as a tuple of alerts whose ``values`` refuse changes too. Fits,
roles and per-matrix stats are frozen dataclasses already. A sink that wants to edit makes its own copy
(``dict(snapshot.aggregates)``, ``copy.deepcopy(snapshot)`` gives plain dicts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

from weibull_monitor.snapshot import Snapshot

__all__ = ["ReadOnlyDict", "SnapshotView", "frozen_alert", "frozen_snapshot"]


def _refuse(*_: Any, **__: Any) -> NoReturn:
    raise TypeError("data handed to a sink is read-only; copy it to change it (dict(...), copy.deepcopy(...))")


class ReadOnlyDict(dict):
    """A dict whose contents cannot change (a copy of the one it is made from). Copies of it are plain dicts."""

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def copy(self) -> dict:
        return dict(self)

    def __copy__(self) -> dict:
        return dict(self)

    def __deepcopy__(self, memo: dict) -> dict:
        import copy

        return {copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def frozen_alert(alert: Any) -> Any:
    """``alert`` with its ``values`` read-only (an Alert is a frozen dataclass; its dict was not)."""
    values = getattr(alert, "values", None)
    if dataclasses.is_dataclass(alert) and isinstance(values, dict) and not isinstance(values, ReadOnlyDict):
        return dataclasses.replace(alert, values=ReadOnlyDict(values))
    return alert


class SnapshotView(Snapshot):
    """A :class:`Snapshot` that refuses every change: attributes cannot be set or deleted, its dicts are
    :class:`ReadOnlyDict` and ``alerts`` a tuple. ``copy.deepcopy`` gives an ordinary, editable Snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:  # not the dataclass __init__: every field set once, here
        for field in dataclasses.fields(Snapshot):
            value = getattr(snapshot, field.name)
            if isinstance(value, dict):
                value = ReadOnlyDict(value)
            elif field.name == "alerts":
                value = tuple(frozen_alert(a) for a in value)
            object.__setattr__(self, field.name, value)

    __setattr__ = __delattr__ = _refuse

    def __deepcopy__(self, memo: dict) -> Snapshot:
        import copy

        fields = {f.name: copy.deepcopy(getattr(self, f.name), memo) for f in dataclasses.fields(Snapshot)}
        fields["alerts"] = list(fields["alerts"])
        return Snapshot(**fields)

    def __reduce__(self) -> Any:
        return (SnapshotView, (self.__deepcopy__({}),))


def frozen_snapshot(snapshot: Any) -> Any:
    """A :class:`SnapshotView` of a Snapshot (itself if it is one already); anything else unchanged."""
    if isinstance(snapshot, SnapshotView) or not isinstance(snapshot, Snapshot):
        return snapshot
    return SnapshotView(snapshot)
