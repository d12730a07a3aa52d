"""Monitor a plain PyTorch training loop: tiny LLaMA, AdamW, cosine schedule, on the CPU in a few seconds.

    python examples/plain_loop.py --steps 200 --every 25 --store weibull_example.sqlite

Every ``every`` optimizer steps the monitor fits the Weibull shape k and scale of every weight matrix, logs one
line, checks the alert rules and writes the snapshot to the SQLite store; the end prints a summary read back
from the store.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from weibull_monitor.demos.toy import byte_batches, tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.sinks import LoggingSink
from weibull_monitor.store import RunStore


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--store", type=Path, default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # tiny matrices: more threads only contend

    store_path = args.store or Path(tempfile.mkdtemp()) / "weibull.sqlite"
    model = tiny_llama(seed=0)
    # the usual AdamW grouping: decay the matrices, not the norms
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    scheduler = cosine_schedule(optimizer, warmup=args.steps // 10, total=args.steps)
    batches = byte_batches(batch_size=4, seq_len=32, seed=0)

    started = time.perf_counter()
    with WeibullMonitor(
        model, optimizer, every=args.every, store=store_path, sinks=[LoggingSink()], run_name="plain-loop"
    ) as monitor:
        monitor.observe(0)  # the initial weights: the reference of scale growth
        for step in range(1, args.steps + 1):
            ids = next(batches)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            monitor.observe(step)  # cheap except every `every` steps
            if step % args.every == 0:
                print(f"step {step}: loss {loss.item():.3f}")
            if monitor.stop_requested:
                print("stopping: a critical alert fired")
                break
    elapsed = time.perf_counter() - started

    with RunStore(store_path) as store:
        run = store.run_id("plain-loop")
        snapshots = store.snapshots(run)
        aggregates = {}
        for row in store.aggregates(run):
            aggregates.setdefault(row["step"], {})[row["metric"]] = row["value"]
        alerts = store.alerts(run)
        n_fits = len(store.fits(run_id=run))
    print(
        f"\nstore {store_path}: {len(snapshots)} snapshots, {n_fits} fits, {len(alerts)} alerts ({elapsed:.1f} s)"
    )
    print(f"{'step':>5} {'T/tau':>8} {'sel k':>7} {'trans k':>7} {'gap':>7} {'trans growth':>12}")
    for snap in snapshots:
        agg = aggregates.get(snap["step"], {})

        def fmt(key: str, spec: str, agg: dict = agg) -> str:
            value = agg.get(key)
            return format(value, spec) if value is not None else "-"

        print(
            f"{snap['step']:>5} {fmt('weibull/T_over_tau', '8.4f'):>8} {fmt('weibull/selection/k_median', '7.3f')} "
            f"{fmt('weibull/transmission/k_median', '7.3f')} {fmt('weibull/selection_transmission_gap', '+7.3f')} "
            f"{fmt('weibull/transmission/scale_growth', '12.3f')}"
        )
    for alert in alerts:
        print(f"alert at step {alert['step']}: [{alert['level']}] {alert['rule']}: {alert['message']}")


if __name__ == "__main__":
    main()
