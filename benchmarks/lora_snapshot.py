"""Snapshot cost of a PEFT fine-tune against the same model without adapters (target: <= 2x).

One LLaMA-shaped model (``--params``, default 60M in the blocks; hidden 768) is monitored three ways, each by its
own ``WeibullMonitor`` (no store, no sinks, the default alert rules), timings interleaved round by round:

- ``plain``: the model itself, every parameter trainable (every matrix fitted every snapshot);
- ``lora qv``: PEFT LoRA r=16 on q_proj and v_proj (the peft default for LLaMA);
- ``lora all``: LoRA r=16 on every linear of the blocks (q, k, v, o, gate, up, down).

Each monitor takes a first snapshot (every matrix fitted, frozen ones included) outside the timing; then every
round times one snapshot of each (steady state: adapted matrices on their effective weight W0 + s·B@A, frozen
ones reused, the factors fitted apart at every ``--factors-every``-th snapshot) and prints the mean (the amortised
cost, the ratio to ``plain`` is of means) and the median. ``--first`` also times
first snapshots (fresh monitors). The |Δk| column compares the effective fits with an exact sort of the merged
matrix (``merge_and_unload``) after one optimizer step on the factors.

    python benchmarks/lora_snapshot.py [--params 60e6] [--repeats 7] [--rank 16] [--first] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(params: float) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from weibull_monitor.demos.toy import llama_config_with_params

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config_with_params(params, vocab_size=4096))


def lora(model: torch.nn.Module, targets: list[str], rank: int) -> torch.nn.Module:
    import peft

    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    )
    with torch.no_grad():  # B starts at zero: give it a trained-looking value so the effective weight moves
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    return wrapped


def timed(monitor, step: int) -> float:
    started = time.perf_counter()
    monitor.snapshot(step)
    return time.perf_counter() - started


def max_dk_against_merged(model: torch.nn.Module, snapshot) -> float:
    from weibull_monitor.estimator import fit_weibull

    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    worst = 0.0
    for key in snapshot.adapted:
        plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
        worst = max(worst, abs(snapshot.fits[key].k - fit_weibull(merged[plain], method="exact").k))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=60e6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--first", action="store_true", help="also time first snapshots (fresh monitors)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument(
        "--factors-every",
        type=int,
        default=5,
        help="the monitor's adapter_factors_every (default: its default, 5)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from weibull_monitor.monitor import WeibullMonitor

    base = build(args.params)
    models = {
        "plain": base,
        "lora qv": lora(base, ["q_proj", "v_proj"], args.rank),
        "lora all": lora(
            base, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], args.rank
        ),
    }
    monitors = {
        name: WeibullMonitor(m, every=1, store=None, adapter_factors_every=args.factors_every)
        for name, m in models.items()
    }
    n_matrices = {name: len(mon.roles) for name, mon in monitors.items()}
    first = {name: timed(mon, 0) for name, mon in monitors.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(args.repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(timed(monitors[name], round_ + 1))
    plain = statistics.fmean(times["plain"])
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters, rank {args.rank}, "
          f"{args.repeats} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'monitor':10s} {'matrices':>8s} {'adapted':>8s} {'frozen':>7s} {'first ms':>9s} {'mean ms':>8s} "
          f"{'median ms':>9s} {'ratio':>6s}")  # fmt: skip
    for name in names:
        snap = monitors[name].last_snapshot
        mean, median = statistics.fmean(times[name]), statistics.median(times[name])
        print(f"{name:10s} {n_matrices[name]:8d} {len(snap.adapted):8d} {len(snap.frozen):7d} "
              f"{1e3 * first[name]:9.1f} {1e3 * mean:8.1f} {1e3 * median:9.1f} {mean / plain:6.2f}")  # fmt: skip
    if args.first:
        fresh = {name: [] for name in names}
        for _ in range(max(1, args.repeats // 2)):
            for name in names:
                fresh[name].append(timed(WeibullMonitor(models[name], every=1, store=None), 0))
        base_first = statistics.median(fresh["plain"])
        for name in names:
            m = statistics.median(fresh[name])
            print(f"first snapshot {name:10s} {1e3 * m:8.1f} ms  ratio {m / base_first:.2f}")
    for name in ("lora qv", "lora all"):
        print(f"{name}: max |Δk| effective fit vs exact sort of the merged matrix: "
              f"{max_dk_against_merged(models[name], monitors[name].last_snapshot):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
