"""Peers: the same ~125M LLaMA-shaped model through the tools users run today, against one snapshot, in one run.

- **WeightWatcher** (``pip install weightwatcher``): ``WeightWatcher(model=model).analyze()`` with its defaults (an
  SVD per layer). Target: our snapshot >= 100x faster.
- **wandb.watch(log="parameters")** in offline mode: ``log_freq=1`` makes the forward hook copy and histogram every
  parameter on each forward pass; one logging pass = median(forward + ``wandb.log`` with the hook) - median(the same
  without it), on a one-token-batch forward so the hook dominates. Target: our snapshot no slower.
- **The paper library's estimator**, reimplemented here from its description: numpy histogram of log10|w| into
  1024 bins over [-12, 2], binned Hazen positions (each bin at the mean Hazen position of the ranks it holds),
  count-weighted least squares over the bins whose position lies in [0.1, 0.9]. Target: our fit engine >= 30x
  faster over the same matrices, and |k_ours - k_paper| <= 0.002 on every matrix.

Ours is timed as ``WeibullMonitor.snapshot(step)`` without a store (full snapshot) and as ``fit_many`` over the same
matrices (the fit engine alone), medians over repeats interleaved with the peers.

    python benchmarks/peers.py [--params 125e6] [--dtype fp32] [--repeats 5] [--ww-repeats 1] [--skip ww,wandb,paper]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
from snapshot_floor import DTYPES, build_model  # sibling script (benchmarks/ is on sys.path when run)

PAPER_BINS = 1024
PAPER_RANGE = (-12.0, 2.0)  # log10 |w|


def paper_fit(w: torch.Tensor) -> tuple[float, float]:
    """(k, λ) of one matrix by the paper library's binned estimator (numpy, CPU), reimplemented."""
    a = np.abs(w.detach().to(torch.float32).cpu().numpy().ravel())
    a = a[np.isfinite(a) & (a > 0)]
    counts, edges = np.histogram(np.log10(a), bins=PAPER_BINS, range=PAPER_RANGE)
    n = counts.sum()
    before = np.cumsum(counts) - counts
    # ranks before+1 .. before+c have Hazen positions (i - 0.5)/n; their mean is (before + c/2)/n
    position = (before + counts / 2.0) / n
    keep = (counts > 0) & (position >= 0.1) & (position <= 0.9)
    x = math.log(10.0) * 0.5 * (edges[:-1] + edges[1:])[keep]
    y = np.log(-np.log1p(-position[keep]))
    weight = counts[keep].astype(np.float64)
    x_mean = np.average(x, weights=weight)
    y_mean = np.average(y, weights=weight)
    k = float(np.sum(weight * (x - x_mean) * (y - y_mean)) / np.sum(weight * (x - x_mean) ** 2))
    intercept = y_mean - k * x_mean
    return k, math.exp(-intercept / k)


def _s(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=125e6)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ww-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", default="", help="comma-separated peers to leave out: ww, wandb, paper")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    torch.set_num_threads(args.threads)

    from weibull_monitor.estimator import fit_many
    from weibull_monitor.monitor import WeibullMonitor
    from weibull_monitor.snapshot import collect_entries

    model = build_model(args.params, DTYPES[args.dtype])
    monitor = WeibullMonitor(model, None, every=10**9, store=None, rules=[])
    entries = collect_entries(model, monitor.roles, model.config)
    named = [(e.key, e.matrix.tensor.detach()) for e in entries]
    elements = sum(t.numel() for _, t in named)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.dtype} model, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(named)} monitored matrices "
        f"({elements / 1e6:.1f}M elements)"
    )
    step = 0
    snapshot_s: list[float] = []
    fit_s: list[float] = []

    def ours() -> None:
        nonlocal step
        step += 1
        snapshot_s.append(_s(lambda: monitor.snapshot(step)))
        fit_s.append(_s(lambda: fit_many(named)))

    ours()  # warm-up
    snapshot_s.clear()
    fit_s.clear()
    for _ in range(args.repeats):
        ours()

    if "paper" not in skip:
        paper_s = []
        for _ in range(args.repeats):
            paper_s.append(_s(lambda: [paper_fit(t) for _, t in named]))
            ours()
        fits = fit_many(named)
        dk = [abs(fits[key].k - paper_fit(t)[0]) for key, t in named]
        dlam = [abs(fits[key].scale / paper_fit(t)[1] - 1) for key, t in named]
        fit_med = statistics.median(fit_s)
        print(
            f"paper estimator (numpy, 1024 log bins): {statistics.median(paper_s) * 1e3:.0f} ms vs fit_many "
            f"{fit_med * 1e3:.0f} ms: ours {statistics.median(paper_s) / fit_med:.1f}x faster (target >= 30); "
            f"|dk| max {max(dk):.5f} median {statistics.median(dk):.5f} (target <= 0.002), "
            f"|dλ/λ| max {max(dlam):.5f}"
        )

    if "wandb" not in skip:
        import wandb

        ids = torch.zeros((1, 1), dtype=torch.long)

        def forward_and_log() -> None:
            with torch.no_grad():
                model(input_ids=ids)
            wandb.log({"loss": 0.0})

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = wandb.init(
                mode="offline", dir=tmp, project="weibull-peers", settings=wandb.Settings(silent=True)
            )
            plain, watched = [], []
            forward_and_log()
            for _ in range(args.repeats):
                plain.append(_s(forward_and_log))
            wandb.watch(model, log="parameters", log_freq=1)
            forward_and_log()
            for _ in range(args.repeats):
                watched.append(_s(forward_and_log))
                ours()
            wandb.unwatch(model)
            run.finish()
        pass_s = statistics.median(watched) - statistics.median(plain)
        snap = statistics.median(snapshot_s)
        print(
            f"wandb.watch(log='parameters') one logging pass: {pass_s * 1e3:.0f} ms (forward+log {statistics.median(watched) * 1e3:.0f} ms "
            f"watched vs {statistics.median(plain) * 1e3:.0f} ms plain) vs snapshot {snap * 1e3:.0f} ms: "
            f"ours {pass_s / snap:.1f}x faster (target >= 1)"
        )

    if "ww" not in skip:
        import logging

        import weightwatcher

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        ww_s = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.ww_repeats):
                ww_s.append(_s(lambda: weightwatcher.WeightWatcher(model=model).analyze()))
                ours()
        snap = statistics.median(snapshot_s)
        print(
            f"WeightWatcher {weightwatcher.__version__} analyze(): {statistics.median(ww_s):.1f} s vs snapshot "
            f"{snap * 1e3:.0f} ms: ours {statistics.median(ww_s) / snap:.0f}x faster (target >= 100)"
        )
    monitor.close()
    print(
        f"ours over the whole run: snapshot median {statistics.median(snapshot_s) * 1e3:.0f} ms, fit_many median "
        f"{statistics.median(fit_s) * 1e3:.0f} ms ({len(snapshot_s)} repeats)"
    )


if __name__ == "__main__":
    main()
