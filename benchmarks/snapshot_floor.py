"""Floor ratio: a full snapshot of a ~125M-parameter LLaMA-shaped model against one read pass of its matrices.

The floor is one ``torch.linalg.vector_norm(m, 1)`` pass over every matrix the monitor reads (the same entries the
snapshot fits): no statistic of every weight can cost less than reading every weight once. For fp32 and bf16
weights the script times, back to back in each repeat,

- ``floor``: the read pass over all matrices, ``vector_norm(m, 1)`` (the issue's floor);
- ``l2 pass``: ``vector_norm(m, 2)`` over the same matrices, a stricter reference: on CPU torch vectorises the 2-norm
  reduction but not the 1-norm one, so this is closer to the memory-bandwidth floor (measured 5-10x faster);
- ``fit_many``: the fit engine alone over the same matrices (``weibull_monitor.estimator.fit_many``);
- ``snapshot``: ``WeibullMonitor.snapshot(step)`` without a store or sinks (entries, fits, dynamics, aggregates,
  alerts), i.e. what a due step costs the training loop beyond writing to disk.

Printed: medians in ms and the median of the per-repeat ratios to the floor (target <= 1.5 for the snapshot), plus
best-of ratios (fastest / fastest: the least disturbed figures on a shared CPU).

    python benchmarks/snapshot_floor.py [--params 125e6] [--repeats 11] [--threads N] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(n_params: float, dtype: torch.dtype) -> torch.nn.Module:
    """A LLaMA-shaped model whose blocks hold about ``n_params`` parameters, Gaussian-initialised, in ``dtype``."""
    from transformers import LlamaForCausalLM

    from weibull_monitor.demos.toy import llama_config_with_params

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config_with_params(n_params))
    return model.to(dtype).eval()


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(model: torch.nn.Module, repeats: int) -> dict[str, list[float]]:
    """Interleaved timings (ms) of the floor, the fit engine and a full snapshot over the monitor's matrices."""
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.monitor import WeibullMonitor
    from weibull_monitor.snapshot import collect_entries

    monitor = WeibullMonitor(model, None, every=10**9, store=None, rules=[])
    entries = collect_entries(model, monitor.roles, getattr(model, "config", None))
    matrices = [entry.matrix.tensor.detach() for entry in entries]
    named = [(entry.key, entry.matrix.tensor.detach()) for entry in entries]

    def floor() -> None:
        with torch.no_grad():
            for m in matrices:
                torch.linalg.vector_norm(m, 1)

    def l2_pass() -> None:
        with torch.no_grad():
            for m in matrices:
                torch.linalg.vector_norm(m, 2)

    step = 0

    def snapshot() -> None:
        nonlocal step
        step += 1
        monitor.snapshot(step)

    for fn in (floor, l2_pass, lambda: fit_many(named), snapshot):  # warm-up: thread pool, tables, role map
        fn()
    timings: dict[str, list[float]] = {"floor": [], "l2": [], "fit_many": [], "snapshot": []}
    for _ in range(repeats):
        timings["l2"].append(_ms(l2_pass))
        timings["floor"].append(_ms(floor))
        timings["fit_many"].append(_ms(lambda: fit_many(named)))
        timings["snapshot"].append(_ms(snapshot))
    monitor.close()
    timings["matrices"] = [float(len(matrices))]
    timings["elements"] = [float(sum(m.numel() for m in matrices))]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=125e6)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    print(
        f"{'dtype':>5} {'matrices':>8} {'elements':>9} {'floor ms':>9} {'fit_many ms':>11} {'snapshot ms':>11} "
        f"{'fit ratio':>9} {'snap ratio':>10} {'best snap':>9} {'l2 ms':>6} {'snap/l2':>7}"
    )
    for name in args.dtypes.split(","):
        model = build_model(args.params, DTYPES[name.strip()])
        t = measure(model, args.repeats)
        fit_ratio = statistics.median(b / a for a, b in zip(t["floor"], t["fit_many"], strict=True))
        snap_ratio = statistics.median(b / a for a, b in zip(t["floor"], t["snapshot"], strict=True))
        snap_l2 = statistics.median(b / a for a, b in zip(t["l2"], t["snapshot"], strict=True))
        print(
            f"{name:>5} {int(t['matrices'][0]):>8} {t['elements'][0] / 1e6:8.1f}M "
            f"{statistics.median(t['floor']):9.1f} {statistics.median(t['fit_many']):11.1f} "
            f"{statistics.median(t['snapshot']):11.1f} {fit_ratio:9.2f} {snap_ratio:10.2f} "
            f"{min(t['snapshot']) / min(t['floor']):9.2f} {statistics.median(t['l2']):6.1f} {snap_l2:7.2f}"
        )
        del model
    print(
        "ratios: median over repeats of (time / read pass timed just before it); target for snapshot <= 1.5"
    )
    print(
        "best snap: fastest snapshot / fastest read pass; snap/l2: median of (snapshot / vector_norm(m, 2) pass)"
    )


if __name__ == "__main__":
    main()
