"""The training monitor: :class:`WeibullMonitor`, the one object any training loop drives.

It ties the pipeline together at every due step: roles (``weibull_monitor.models``) -> entries and fits
(``weibull_monitor.snapshot``, ``weibull_monitor.distributed``) -> alerts -> store and sinks. ``optim`` reads the
optimizer; ``filters`` chooses the watched parameters; ``resume`` follows resumes and rollbacks (the monitor's state
at the checkpoint's step, a new branch of the run in the store, the sinks told).
"""

from weibull_monitor.monitor.monitor import WeibullMonitor
from weibull_monitor.snapshot import Snapshot

__all__ = ["Snapshot", "WeibullMonitor"]
