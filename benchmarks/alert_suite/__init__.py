"""A labelled benchmark of healthy and failing small CPU training runs for weibull-monitor's alert rules.

Modules: ``models`` (architectures, the attention probe, weights-only per-head norms), ``runs`` (the run specs,
suites and the calibration / held-out split), ``train`` (one run: RunStore + ground-truth signals JSON),
``labels`` (ground-truth labels and onsets, defined in docs/alerts.md), ``replay`` (snapshots rebuilt from a
store, fed through any rule set), ``baselines`` (cheap detectors), ``rules`` (the rule set scored: the package's),
``score`` (recall, false alarms, lead time, sweeps, AUROC, bootstrap, the printed table).
"""
