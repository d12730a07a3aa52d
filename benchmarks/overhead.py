"""Training-time overhead of WeibullMonitor at ``every=100``: wall time with / without the monitor, one run.

Models: ``tiny`` (the 0.1M-parameter toy LLaMA of the tests, 2 layers of width 64), ``demo`` (the demo's 0.8M
LLaMA, 4 layers of width 128) and ``100m`` (a ~100M-parameter LLaMA-shaped model,
weibull_monitor.demos.toy.llama_config_with_params). Each trains in blocks of ``every`` optimizer steps, alternating
blocks without and with ``observe`` (order swapped on every repeat so drift of a shared CPU cancels). One
``WeibullMonitor`` (with its SQLite store) serves the whole run, as in a real script, and has taken its first
snapshot during warm-up; a monitored block ends on a due step, so it pays for exactly one steady-state snapshot
(fits, dynamics, alerts and the SQLite write: the due ``observe`` call is timed whole) plus ``observe`` on the
other steps. The optimizer step hook stays on in plain blocks too (~1 us a step). Printed per model:

- ``measured``: total wall time of monitored blocks / total wall time of plain blocks - 1 (noisy on a shared CPU,
  where other processes change the speed from block to block);
- ``cpu``: the same ratio of this process's CPU time (``time.process_time``), which other processes on a shared
  machine barely disturb;
- ``components``: (median due-step ``observe`` time + every x per-step cost) / (every x median plain step
  time), from timings of the pieces themselves in the same run (insensitive to block-to-block noise).
  Target: <= 0.5%.

    python benchmarks/overhead.py [--models tiny,demo,100m] [--every 100] [--repeats 2] [--batch 2] [--seq 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from weibull_monitor.demos.toy import byte_batches, llama_config_with_params, tiny_llama, tiny_llama_config
from weibull_monitor.monitor import WeibullMonitor


def build(name: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    if name == "tiny":
        return tiny_llama(0)
    if name == "demo":
        from weibull_monitor.demos.demo import DEMO_MODEL

        return tiny_llama(0, **DEMO_MODEL)
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config_with_params(100e6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,demo,100m")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of (plain, monitored) blocks per model")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _ = tiny_llama_config()  # import transformers before timing anything
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), every={args.every}, "
        f"batch {args.batch} x seq {args.seq}, {args.repeats} repeat(s) of (plain, monitored) blocks"
    )
    for name in args.models.split(","):
        model = build(name.strip())
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        batches = byte_batches(args.batch, args.seq, seed=0)
        step_times: list[float] = []

        def train_step(model=model, optimizer=optimizer, batches=batches, step_times=step_times) -> None:
            ids = next(batches)
            started = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - started)

        store = Path(tempfile.mkdtemp()) / "overhead.sqlite"
        monitor = WeibullMonitor(model, optimizer, every=args.every, store=store, run_name=name)
        for warm_step in range(3):  # warm-up: allocator, optimizer state, the role map and the first snapshot
            train_step()
            monitor.observe(warm_step)  # step 0 is due
        step_times.clear()
        global_step = args.every  # blocks then end on multiples of every: one due step each
        plain, monitored, snapshot_s = [], [], []
        plain_cpu, monitored_cpu = [], []
        for repeat in range(args.repeats):
            for mode in ("plain", "monitored") if repeat % 2 == 0 else ("monitored", "plain"):
                started, started_cpu = time.perf_counter(), time.process_time()
                for _ in range(args.every):
                    global_step += 1
                    train_step()
                    if mode == "monitored":
                        observed = time.perf_counter()
                        if monitor.observe(global_step) is not None:
                            snapshot_s.append(time.perf_counter() - observed)
                elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
                if mode == "monitored":
                    monitored.append(elapsed)
                    monitored_cpu.append(elapsed_cpu)
                else:
                    plain.append(elapsed)
                    plain_cpu.append(elapsed_cpu)
        monitor.close()
        # per-step cost of the monitor away from due steps: optimizer hook + observe (timed in isolation)
        monitor = WeibullMonitor(model, optimizer, every=10**9, store=None, rules=[])
        n = 2000
        started = time.perf_counter()
        for step in range(1, n + 1):
            monitor._on_optimizer_step(optimizer, (), {})
            monitor.observe(step)
        per_step_s = (time.perf_counter() - started) / n
        monitor.close()

        step_s = statistics.median(step_times)
        measured = sum(monitored) / sum(plain) - 1
        measured_cpu = sum(monitored_cpu) / sum(plain_cpu) - 1
        components = (statistics.median(snapshot_s) + args.every * per_step_s) / (args.every * step_s)
        print(
            f"{name:>5}: {n_params / 1e6:6.1f}M params, {model.config.num_hidden_layers} layers | "
            f"step {step_s * 1e3:8.1f} ms | due observe {statistics.median(snapshot_s) * 1e3:7.1f} ms | "
            f"hook+observe {per_step_s * 1e6:5.1f} us/step | overhead measured {measured * 100:+6.2f}% "
            f"(blocks plain {', '.join(f'{t:.1f}' for t in plain)} s; monitored {', '.join(f'{t:.1f}' for t in monitored)} s) "
            f"| cpu {measured_cpu * 100:+6.2f}% | components {components * 100:.3f}%"
        )


if __name__ == "__main__":
    main()
