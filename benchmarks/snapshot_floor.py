"""A whole snapshot against the fastest read of the same bytes, measured in the same run.

``WeibullMonitor.snapshot(step)`` (entries, fits, dynamics, aggregates, alerts; no store, no sinks) of a LLaMA-shaped
model, fp32 and bf16, against the read floor of ``benchmarks/floor.py`` (the fastest of ``vector_norm(m, 2)``,
``m.sum()`` and a copy into a preallocated buffer over exactly the matrices the snapshot reads), interleaved in
each repeat. Also timed: ``fit_many`` over the same matrices (the fit engine alone), and the snapshot with the
weights-only attention-logit bounds (``logit_bounds=True``, the default; ``snap+lb``): the bound is extra work on
W_q and W_k (two Gram products per layer, docs/alerts.md), not a read of the weights, so the ratio to the read floor
is quoted for the snapshot without it and the bound's cost beside it.

``--layerwise`` builds a larger model (default 1B-shaped: hidden 2048) one decoder layer at a time, snapshots each
layer with its own monitor and sums the layers' medians, so the ratio is measured on 1B-scale matrices without
holding the model.

    python benchmarks/snapshot_floor.py [--params 100e6] [--repeats 11] [--threads N] [--dtypes fp32,bf16]
    python benchmarks/snapshot_floor.py --layerwise [--params 1e9] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from floor import ReadFloor, machine_line, timed_ms  # sibling script (benchmarks/ is on sys.path when run)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(n_params: float, dtype: torch.dtype, hidden: int = 768) -> torch.nn.Module:
    """A LLaMA-shaped model whose blocks hold about ``n_params`` parameters, Gaussian-initialised, in ``dtype``."""
    from transformers import LlamaForCausalLM

    from weibull_monitor.demos.toy import llama_config_with_params

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config_with_params(n_params, hidden_size=hidden))
    return model.to(dtype).eval()


def measure(model: torch.nn.Module, repeats: int) -> dict[str, object]:
    """Interleaved timings (ms): the read floor's passes, ``fit_many`` and a full snapshot, over the monitor's
    matrices."""
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.monitor import WeibullMonitor
    from weibull_monitor.snapshot import collect_entries

    monitor = WeibullMonitor(model, None, every=10**9, store=None, rules=[], logit_bounds=False)
    bounded = WeibullMonitor(model, None, every=10**9, store=None, rules=[])
    entries = collect_entries(model, monitor.roles, getattr(model, "config", None))
    named = [(entry.key, entry.matrix.tensor.detach()) for entry in entries]
    floor = ReadFloor([t for _, t in named])
    step = 0

    def snapshot(which: WeibullMonitor = monitor) -> None:
        nonlocal step
        step += 1
        which.snapshot(step)

    floor.time_once(), fit_many(named), snapshot(), snapshot(bounded)  # warm-up: pool, tables, role map
    floor.times = {name: [] for name in floor.times}
    times: dict[str, list[float]] = {"fit_many": [], "snapshot": [], "snapshot_cpu": [], "snapshot_bound": []}
    for _ in range(repeats):
        floor.time_once()
        times["fit_many"].append(timed_ms(lambda: fit_many(named)))
        cpu = time.process_time()
        times["snapshot"].append(timed_ms(snapshot))
        times["snapshot_cpu"].append((time.process_time() - cpu) * 1e3)  # every thread of the process
        times["snapshot_bound"].append(timed_ms(lambda: snapshot(bounded)))
    monitor.close()
    bounded.close()
    return {"floor": floor, "matrices": len(named), "elements": sum(t.numel() for _, t in named), **times}


def report(label: str, t: dict[str, object]) -> None:
    floor: ReadFloor = t["floor"]  # type: ignore[assignment]
    medians = floor.medians()
    base = floor.floor_ms()
    snap = statistics.median(t["snapshot"])  # type: ignore[arg-type]
    fit = statistics.median(t["fit_many"])  # type: ignore[arg-type]
    cpu = statistics.median(t["snapshot_cpu"])  # type: ignore[arg-type]
    bound = statistics.median(t["snapshot_bound"])  # type: ignore[arg-type]
    print(
        f"{label:>10} {t['matrices']:>8} {t['elements'] / 1e6:8.1f}M {medians['l2']:7.1f} {medians['sum']:7.1f} "
        f"{medians['copy']:7.1f} {base:7.1f} {fit:8.1f} {snap:8.1f} {cpu:8.1f} {fit / base:6.2f} {snap / base:6.2f}"
        f" {bound:9.1f} {bound / base:7.2f}"
    )


def header() -> None:
    print(
        f"{'model':>10} {'matrices':>8} {'elements':>9} {'l2 ms':>7} {'sum ms':>7} {'copy ms':>7} {'floor':>7} "
        f"{'fit ms':>8} {'snap ms':>8} {'snap cpu':>8} {'fit/fl':>6} {'snap/fl':>6} {'snap+lb ms':>9} {'+lb/fl':>7}"
    )


def layerwise(params: float, hidden: int, dtype: torch.dtype, repeats: int) -> dict[str, object]:
    """Snapshot a ``params``-shaped model one decoder layer at a time; the sums of the layers' medians."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from weibull_monitor.demos.toy import llama_config_with_params

    config = llama_config_with_params(params, hidden_size=hidden)
    total: dict[str, object] = {
        "matrices": 0,
        "elements": 0,
        "fit_many": [0.0],
        "snapshot": [0.0],
        "snapshot_cpu": [0.0],
        "snapshot_bound": [0.0],
    }
    floors: dict[str, float] = {name: 0.0 for name in ("l2", "sum", "copy")}
    torch.manual_seed(0)
    for index in range(config.num_hidden_layers):
        layer = LlamaDecoderLayer(config, layer_idx=index).to(dtype).eval()
        with torch.no_grad():
            for p in layer.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, config.initializer_range)
        t = measure(layer, repeats)
        for name, ms in t["floor"].medians().items():  # type: ignore[union-attr]
            floors[name] += ms
        for key in ("fit_many", "snapshot", "snapshot_cpu", "snapshot_bound"):
            total[key][0] += statistics.median(t[key])  # type: ignore[index, arg-type]
        total["matrices"] += t["matrices"]  # type: ignore[operator]
        total["elements"] += t["elements"]  # type: ignore[operator]
        del layer
    summed = ReadFloor([])
    summed.times = {name: [ms] for name, ms in floors.items()}
    total["floor"] = summed
    return total


def breakdown(model: torch.nn.Module, repeats: int) -> None:
    """Where a snapshot's CPU time goes, stage by stage (process CPU time, all threads; medians): the counting
    kernel alone (one ``count_many`` over every chunk, into one preallocated block), counting as ``fit_many`` does it
    (slices, buffers, Python), the fit of the counted rows, ``fit_many``, the snapshot."""
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.estimator.histogram import SLICE_ROWS, runtime
    from weibull_monitor.estimator.histogram.fit_counts import compact, fit_compact
    from weibull_monitor.monitor import WeibullMonitor
    from weibull_monitor.snapshot import collect_entries

    monitor = WeibullMonitor(model, None, every=10**9, store=None, rules=[])
    entries = collect_entries(model, monitor.roles, getattr(model, "config", None))
    named = [(entry.key, entry.matrix.tensor.detach()) for entry in entries]
    tensors = [t for _, t in named]
    block = torch.zeros(len(tensors), runtime.N_COLUMNS, dtype=torch.int64)
    scratch = torch.zeros(runtime.N_BINS, dtype=torch.int32)
    words = [(runtime._kernel_words(c), i) for i, t in enumerate(tensors) for c in runtime.chunks(t, 1 << 21)]
    jobs = [(*w[1:], block[i].data_ptr()) for w, i in words if w is not None]
    counted = runtime.count_batch(tensors)
    rows = compact(counted.counts, counted.span, copy=True)
    step = [0]

    def counting() -> None:
        buffer = runtime.CountBuffer(SLICE_ROWS)
        for start in range(0, len(tensors), SLICE_ROWS):
            part = buffer.count(tensors[start : start + SLICE_ROWS])
            compact(part.counts, part.span, copy=True)
            buffer.recycle(part)

    def snapshot() -> None:
        step[0] += 1
        monitor.snapshot(step[0])

    stages = {
        "kernel": (lambda: runtime._KERNEL.count_many(jobs, scratch.data_ptr())) if runtime._KERNEL else None,
        "counting": counting,
        "fit": lambda: fit_compact(rows, counted.kinds, counted.reasons),
        "fit_many": lambda: fit_many(named),
        "snapshot": snapshot,
    }
    cpu: dict[str, list[float]] = {name: [] for name, fn in stages.items() if fn is not None}
    for _ in range(repeats + 1):  # the first round warms up
        for name in cpu:
            start = time.process_time()
            with torch.no_grad(), runtime.torch_on_one_thread():  # as fit_many runs them
                stages[name]()  # type: ignore[misc]
            cpu[name].append((time.process_time() - start) * 1e3)
    monitor.close()
    n = sum(t.numel() for t in tensors)
    print("   CPU ms (all threads): " + ", ".join(f"{k} {statistics.median(v[1:]):.1f}" for k, v in cpu.items()))
    if "kernel" in cpu:
        print(f"   kernel: {statistics.median(cpu['kernel'][1:]) * 1e6 / n:.3f} ns per element")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=None, help="default 100e6 (1e9 with --layerwise)")
    parser.add_argument("--hidden", type=int, default=None, help="default 768 (2048 with --layerwise)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layerwise", action="store_true", help="one decoder layer at a time (a 1B-shaped model)")
    parser.add_argument("--breakdown", action="store_true", help="also print the CPU time of each stage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = args.params or (1e9 if args.layerwise else 100e6)
    hidden = args.hidden or (2048 if args.layerwise else 768)
    print(f"{machine_line()}; {args.repeats} repeats (medians)")
    header()
    for name in args.dtypes.split(","):
        dtype = DTYPES[name.strip()]
        label = f"{params / 1e6:.0f}M {name}"
        if args.layerwise:
            report(label + " L", layerwise(params, hidden, dtype, args.repeats))
        else:
            model = build_model(params, dtype, hidden)
            report(label, measure(model, args.repeats))
            if args.breakdown:
                breakdown(model, args.repeats)
    print(
        "floor: the fastest of the l2 / sum / copy read passes over the same matrices (median of each); "
        "snap/fl: snapshot median / floor (target <= 1.5); snap cpu: CPU time of the snapshot, all threads (ms)"
    )
    print(f"after: {machine_line()}")


if __name__ == "__main__":
    main()
