"""WeibullMonitor: the one object that ties fits, roles, dynamics, alerts, store and sinks together for any
training loop (plain PyTorch, HF Trainer and Lightning callbacks drive it the same way).

Usage::

    monitor = WeibullMonitor(model, optimizer, every=100, store="runs/weibull.sqlite", sinks=[LoggingSink()])
    for step in range(1, n_steps + 1):
        ...; optimizer.step(); scheduler.step()
        monitor.observe(step)          # step = optimizer updates done so far
        if monitor.stop_requested: break
    monitor.close()

Step semantics: ``observe(step)`` takes the number of optimizer updates applied so far. It snapshots when
``step % every == 0``, including step 0 (call ``observe(0)`` before training to record the initial weights, the
reference of scale growth). A step seen before is ignored, so calling it per micro-batch is harmless.

Resume and rewind (``resume``, ``load_state_dict``; module ``resume``): training that continues from a checkpoint
of step s puts the monitor back in its state at s and starts a new branch of the run in the store at s; what the
abandoned timeline wrote after s is kept, marked superseded, outside the run's series. A step lower than the last
one seen, with no resume announced, is taken for a rollback (with a warning).

T/τ: when the optimizer is a ``torch.optim.Optimizer`` (wrappers such as accelerate's or Lightning's are
unwrapped), a step pre-hook adds η·λ_wd of every parameter group at each real update: exact whatever the order of
``scheduler.step()`` and ``observe``, and updates skipped by a gradient scaler do not count. Otherwise ``observe``
counts the updates since its previous call (``step - previous_step``) at the learning rate it reads then; steps
skipped between calls are counted at that current rate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from weibull_monitor._version import __version__
from weibull_monitor.alerts import Alert, AlertEngine, Rule, default_rules
from weibull_monitor.distributed import agree
from weibull_monitor.estimator.protocol import check_method
from weibull_monitor.models import attention_kind, model_roles
from weibull_monitor.models.expectations import selection_expectation
from weibull_monitor.monitor.filters import NameFilter, name_filter
from weibull_monitor.monitor.floods import log_alerts
from weibull_monitor.monitor.optim import group_of_params, group_rates, unwrap_optimizer
from weibull_monitor.monitor.resume import ResumeMixin, state_step
from weibull_monitor.monitor.steps import checked_step
from weibull_monitor.sinks.base import Sink
from weibull_monitor.sinks.frozen import frozen_alert
from weibull_monitor.sinks.guard import GuardedSink
from weibull_monitor.snapshot import Snapshot, SnapshotBuilder, adapters, collect_entries
from weibull_monitor.snapshot.budget import TimescaleBudget
from weibull_monitor.snapshot.logit_bound import attention_logit_bounds
from weibull_monitor.store import RunStore, StoreError, StoreWriter

__all__ = ["WeibullMonitor"]

logger = logging.getLogger("weibull_monitor")

_STATE_VERSION = 1


def check_every(every: object) -> None:
    """ValueError unless ``every`` is a positive whole number of optimizer steps."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive number of optimizer steps, got {every!r}")


class WeibullMonitor(ResumeMixin):
    """Periodic Weibull snapshots of every weight matrix of ``model``, with dynamics, alerts, store and sinks.

    Args:
        model: the module whose weights are watched (unwrapped: not the DDP/FSDP wrapper's names).
        optimizer: its optimizer (for η, λ_wd and T/τ); None leaves those figures missing.
        every: snapshot every this many optimizer steps (>= 1).
        store: SQLite path, an open :class:`RunStore`, or None / False for no store.
        sinks: where metrics and alerts go; each is wrapped in a :class:`GuardedSink`.
        rules: alert rules (None: the built-in :func:`weibull_monitor.alerts.default_rules`; [] for none).
        include / exclude: parameter names to watch / skip (glob patterns, a regex or a callable).
        method: ``"histogram"`` (fast, default) or ``"exact"`` (full sort).
        logit_bounds: compute the weights-only attention-logit bounds (rule ``attention_logit_bound``; on a CPU
            about 3 read passes of W_q and W_k per layer at hidden 4096, docs/alerts.md §6); False skips them.
        run_name: the run in the store; reusing a name resumes that run (its state is restored from the store);
            a restart from step 0 under a used name supersedes the old timeline, with a warning.
        on_alert: called with every fired :class:`Alert` (exceptions are reported once, never raised).
        stop_on_critical: set :attr:`stop_requested` when a critical alert fires (agreed across ranks).
        overrides: role-map overrides (regex -> component).
        writer: False computes (and joins collectives) but writes nothing: no store, sinks, logs or callback.
        sink_timeout: seconds a sink call may run before it is reported as hanging.
        adapter_factors_every: fit PEFT's LoRA factors (reported apart, ``weibull/lora/...``) at every n-th
            snapshot (0: never); adapted matrices themselves are fitted on their effective weight every snapshot.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any = None,
        *,
        every: int = 100,
        store: str | os.PathLike[str] | RunStore | bool | None = "weibull.sqlite",
        sinks: Sequence[Sink] = (),
        rules: Sequence[Rule] | None = None,
        include: NameFilter = None,
        exclude: NameFilter = None,
        method: str = "histogram",
        run_name: str | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        stop_on_critical: bool = False,
        overrides: Any = None,
        writer: bool = True,
        sink_timeout: float = 10.0,
        adapter_factors_every: int = 5,
        logit_bounds: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_every(every)
        check_method(method)
        if on_alert is not None and not callable(on_alert):
            raise TypeError("on_alert must be callable")
        if store is True:
            store = "weibull.sqlite"
        if store is False:  # the callbacks' spelling of "no store"
            store = None
        if store is not None and not isinstance(store, (str, os.PathLike, RunStore)):
            raise TypeError(
                f"store must be a path, a RunStore, or None/False for no store; got {type(store).__name__}"
            )
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        if self.optimizer is not None and not hasattr(self.optimizer, "param_groups"):
            raise TypeError(f"optimizer has no param_groups: {type(optimizer).__name__}")
        self.every = every
        self.method = method
        self.logit_bounds = bool(logit_bounds)
        self.include = name_filter(include, "include")
        self.exclude = name_filter(exclude, "exclude")
        self.overrides = overrides
        self.writer = bool(writer)
        self.on_alert = on_alert
        self.stop_on_critical = bool(stop_on_critical)
        self.stop_requested = False
        self.sink_timeout = float(sink_timeout)
        self.adapter_factors_every = int(adapter_factors_every)
        self.engine = AlertEngine(default_rules() if rules is None else list(rules))
        self.builder = SnapshotBuilder()
        self.last_snapshot: Snapshot | None = None
        self.run_name = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._explicit_run_name = run_name is not None
        self._last_seen_step: int | None = None
        self._last_snapshot_step: int | None = None
        self._roles: dict[str, Any] | None = None
        self._adapters: adapters.Adapters | None = None  # LoRA/DoRA layers and frozen fits (found on first use)
        self._attention_kind: str | None = None
        self._expectation: str | None = None
        self._sinks: list[GuardedSink] = []
        self._reported: set[str] = set()
        self._closed = False
        self._hook = None
        self._init_resume()
        if self.optimizer is not None and hasattr(self.optimizer, "register_step_pre_hook"):
            try:
                self._hook = self.optimizer.register_step_pre_hook(self._on_optimizer_step)
            except Exception:  # an optimizer-like object without working hooks: count in observe instead
                self._hook = None
        for sink in sinks:
            self.add_sink(sink)
        self._store: RunStore | None = None
        self._store_path = None
        self._run_id: int | None = None
        self._store_writer: StoreWriter | None = None
        if self.writer and store is not None:
            if isinstance(store, RunStore):
                self._store = store
            else:
                self._store_path = store
            self._store_writer = StoreWriter(
                self._store_target,
                identity=self.identity,
                dashboards=self._dashboards,
                on_fork=self._on_fork,
                on_superseded=self._on_superseded,
            )
            self._restore_from_store()

    # ------------------------------------------------------------------------------------------ stepping

    @property
    def budget(self) -> TimescaleBudget:
        """T/τ per optimizer group, accumulated since the run began."""
        return self.builder.budget

    @property
    def scale_first(self) -> dict[str, float]:
        """λ at each matrix's first ok fit: the reference of scale growth."""
        return self.builder.scale_first

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        rates = group_rates(optimizer)
        self.budget.record(rates)
        self._record_update(rates)

    def observe(self, step: int) -> Snapshot | None:
        """Call once per optimizer step with the number of updates done so far. Returns the snapshot when
        ``step % every == 0`` (and it was not taken yet), else None. Never raises: a failing snapshot is logged
        once and training goes on; a step that is no whole number 0 <= step < 2**63 (None, NaN, Inf, a string, a
        bool, 10.9, -1) is ignored with one warning per kind (``monitor/steps.py``); 10.0 counts as step 10."""
        step, refused = checked_step(step)
        if step is None:
            self._report_once(
                f"step:{refused.split(' is ')[-1]}", f"weibull-monitor: observe() ignored {refused}"
            )
            return None
        if self._went_back(step):  # a rollback nobody announced: the monitor rewinds first (and warns)
            self._since_observe = []
        previous = self._last_seen_step
        self._observed = True
        if previous is not None and step == previous:
            return None
        self._since_observe = []
        if self._hook is None and self.optimizer is not None:
            updates = step if previous is None else step - previous
            if updates > 0:
                self.budget.record(group_rates(self.optimizer), updates)
        self._last_seen_step = step
        if step % self.every != 0 or step == self._last_snapshot_step:
            return None
        try:
            return self.snapshot(step)
        except Exception as error:
            self._report_once(
                "snapshot", f"weibull-monitor: snapshot at step {step} failed: {error!r}", exc=error
            )
            return None

    @property
    def roles(self) -> dict[str, Any]:
        """Roles of the watched parameters (after include/exclude), computed on first use."""
        if self._roles is None:
            self._adapters = adapters.Adapters(self.model, self.adapter_factors_every)
            roles = self._adapters.without_factors(model_roles(self.model, overrides=self.overrides))
            self._roles = {
                name: role
                for name, role in roles.items()
                if (self.include is None or self.include(name))
                and (self.exclude is None or not self.exclude(name))
            }
            try:
                self._attention_kind = attention_kind(self.model)
            except Exception:
                self._attention_kind = None
            self._expectation = selection_expectation(self._attention_kind)
        return self._roles

    def snapshot(self, step: int) -> Snapshot:
        """Take a snapshot now (whatever ``every`` says): fits, dynamics, alerts; then store and sinks."""
        started = time.perf_counter()
        step = int(step)
        roles = self.roles
        skipped: dict[str, str] = {}
        config = getattr(self.model, "config", None)
        entries = collect_entries(self.model, roles, config, skipped=skipped)
        # a collective under torch.distributed: every rank calls it at every due snapshot; adapted matrices are
        # fitted on their effective weight, frozen ones once (snapshot/adapters.py)
        fitted = self._adapters.fit(entries, self.method)
        fits = fitted.fits
        bounds = None
        try:  # weights only, local tensors only (a sharded Q/K is skipped with its reason, never gathered)
            bounds = attention_logit_bounds(self.model, entries, config) if self.logit_bounds else None
        except Exception as error:  # a bound that cannot be computed never stops training
            message = f"weibull-monitor: attention-logit bound failed: {error!r}"
            self._report_once("logit-bound", message, error)
        for key, fit in fits.items():
            if not fit.ok and key not in skipped and fit.reason:
                skipped[key] = fit.reason
        snapshot = self.builder.build(
            step,
            entries,
            fits,
            skipped=skipped,
            group_of_param=self._adapters.groups(
                group_of_params(self.optimizer, dict(self.model.named_parameters(remove_duplicate=False)))
            ),
            rates=group_rates(self.optimizer) if self.optimizer is not None else (),
            attention_kind=self._attention_kind,
            expectation=self._expectation,
            logit_bounds=bounds,
        )
        adapters.report(snapshot, fitted)
        snapshot.alerts = self.engine(snapshot)
        critical = any(alert.level == "critical" for alert in snapshot.alerts)
        # every rank calls agree() at every snapshot (not only when critical), or the collective would hang
        if self.stop_on_critical and agree(critical):
            self.stop_requested = True
        self._last_snapshot_step = step
        self.last_snapshot = snapshot
        state = self.state_dict()
        self._remember(step, state)
        snapshot.duration_s = time.perf_counter() - started
        if self.writer:
            self._emit(snapshot, state)
        return snapshot

    # ------------------------------------------------------------------------------------------ outputs

    def _report_once(self, topic: str, message: str, exc: BaseException | None = None) -> None:
        if topic in self._reported:
            return
        self._reported.add(topic)
        logger.warning("%s (reported once)", message, exc_info=exc)

    def _emit(self, snapshot: Snapshot, state: dict[str, Any] | None = None) -> None:
        if self._store_writer is not None:
            self._store_writer.write(snapshot, self.state_dict() if state is None else state)
        log_alerts(logger, snapshot.alerts, snapshot.step)  # a flood is summarised, never lost
        for sink in self._sinks:
            sink.log_metrics(dict(snapshot.aggregates), snapshot.step)  # a copy each: sinks may edit theirs
            for alert in snapshot.alerts:
                sink.log_alert(alert)
            sink.log_snapshot(snapshot)
        if self.on_alert is not None:
            for alert in snapshot.alerts:
                try:
                    self.on_alert(frozen_alert(alert))  # read-only, as sinks get it
                except Exception as error:
                    self._report_once(
                        "on_alert", f"weibull-monitor: on_alert callback raised {error!r}", exc=error
                    )

    def add_sink(self, sink: Sink) -> None:
        """Send every later snapshot and alert to ``sink`` too (guarded: it can never stop training)."""
        self._sinks.append(
            sink if isinstance(sink, GuardedSink) else GuardedSink(sink, timeout=self.sink_timeout)
        )

    @property
    def sinks(self) -> list[GuardedSink]:
        return list(self._sinks)

    @property
    def store(self) -> RunStore | None:
        """The open run store (None when disabled or not opened yet)."""
        return self._store

    @property
    def run_id(self) -> int | None:
        return self._run_id

    def _open_store(self) -> RunStore:
        if self._store is None:
            self._store = RunStore(self._store_path)
        return self._store

    def _store_target(self) -> tuple[RunStore, int]:
        store = self._open_store()
        if self._run_id is None:
            self._run_id = store.open_run(self.run_name, self._run_meta())
        return store, self._run_id

    def _restore_from_store(self) -> None:
        """A run name that already has state in the store resumes it (λ_first, T/τ, alert counters)."""
        if not self._explicit_run_name:
            return
        try:
            store = self._open_store()
            run_id = store.run_id(self.run_name)
            state = store.load_state(run_id) if run_id is not None else None
        except StoreError:  # a store this version cannot use (a newer schema): the user must act
            raise
        except Exception as error:  # an unreadable store must not stop training: writes retry later
            self._report_once(
                "store-open", f"weibull-monitor: cannot read the store yet: {error!r}", exc=error
            )
            return
        if state:
            self._apply_state(state)
            logger.info(
                "weibull-monitor: resumed run %r from the store (last snapshot %s)",
                self.run_name,
                state.get("last_snapshot_step"),
            )

    def _run_meta(self) -> dict[str, Any]:
        config = getattr(self.model, "config", None)
        try:
            config_dict = config.to_dict() if hasattr(config, "to_dict") else None
        except Exception:
            config_dict = None
        optimizer = None
        if self.optimizer is not None:
            optimizer = {
                "class": type(self.optimizer).__name__,
                "groups": [
                    {**{k: v for k, v in group.items() if k != "params"}, "n_params": len(group["params"])}
                    for group in self.optimizer.param_groups
                ],
            }
        _ = self.roles  # attention kind and expectation
        return {
            "package_version": __version__,
            "model_summary": {
                "class": type(self.model).__name__,
                "n_parameters": sum(p.numel() for p in self.model.parameters()),
                "n_matrices": len(self.roles),
                "config": config_dict,
            },
            "optimizer": optimizer,
            "attention_kind": self._attention_kind,
            "expectation": self._expectation,
            "every": self.every,
            "method": self.method,
        }

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the sinks to drain and retry a pending store write. True if everything went out."""
        done = self._store_writer.retry() if self._store_writer is not None else True
        for sink in self._sinks:
            done = sink.flush(timeout) and done
        return done

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (JSON-friendly): run name, T/τ sums, λ_first, alert counters."""
        return {
            "version": _STATE_VERSION,
            "run_name": self.run_name,
            "every": self.every,
            "last_seen_step": self._last_seen_step,
            "last_snapshot_step": self._last_snapshot_step,
            **self.builder.state_dict(),
            "alerts": self.engine.state_dict(),
            "stop_requested": self.stop_requested,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` output saved in a checkpoint: the run continues under its name from the
        state's step; the store starts a new branch there, superseding what an abandoned timeline wrote after it
        (see :meth:`resume`)."""
        self._check_state(state)
        self.resume(state_step(state), state)

    @staticmethod
    def _check_state(state: Any) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a WeibullMonitor state of version {_STATE_VERSION}")

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        """Put the monitor in ``state`` (no branch, no store write)."""
        self._check_state(state)
        if state["run_name"] != self.run_name:
            if self._store_writer is not None:  # what is pending belongs to the old run
                self._store_writer.retry()
                self._store_writer.branch = None
            self.run_name = str(state["run_name"])
            self._run_id = None
        self._last_seen_step = state.get("last_seen_step")
        self._last_snapshot_step = state.get("last_snapshot_step")
        self.builder.load_state_dict(state)
        self.engine.load_state_dict(state["alerts"])
        self.stop_requested = bool(state.get("stop_requested", False))

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Flush and close every sink, write what the store still owes, close it, remove the optimizer hook."""
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for sink in self._sinks:
            sink.close()
        if self._store_writer is not None:
            self._store_writer.retry()
            if self._store_writer.pending:
                logger.warning(
                    "weibull-monitor: %d snapshot(s) could not be written to the store",
                    len(self._store_writer.pending),
                )
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()

    def __enter__(self) -> WeibullMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
