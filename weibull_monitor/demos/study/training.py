"""Training one setting from one seed with the monitor attached."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from weibull_monitor.demos.study.config import Setting, StudyConfig
from weibull_monitor.demos.toy import BYTE_VOCAB, byte_batches, tiny_llama
from weibull_monitor.monitor import WeibullMonitor


def build_model(config: StudyConfig, seed: int | None = None) -> Any:
    """The study's model, freshly initialised from ``seed`` (default: the config's first seed; byte vocabulary,
    no download)."""
    import torch

    seed = config.seeds[0] if seed is None else seed
    if config.arch == "llama":
        return tiny_llama(seed, initializer_range=config.initializer_range, **config.model)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    params: dict[str, Any] = {
        "vocab_size": BYTE_VOCAB,
        "max_position_embeddings": max(256, config.seq_len),
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": False,
        **config.model,
    }
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**params))


def train_setting(
    config: StudyConfig,
    setting: Setting,
    store: Any,
    *,
    seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one setting from ``seed`` (default: the config's first seed; it decides the initial weights and the
    batch order) with a :class:`WeibullMonitor` writing run ``config.run_name(setting, seed)`` into the SQLite file
    ``store`` (the monitor opens and closes it). Returns what the store does not hold: steps, seconds (wall and
    this process's CPU), final loss."""
    import torch

    seed = config.seeds[0] if seed is None else seed
    name = config.run_name(setting, seed)
    model = build_model(config, seed)
    model.train()
    # the usual AdamW grouping: decay the matrices, not the norms and biases
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": setting.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=setting.lr,
        betas=config.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: config.lr_at(setting, done + 1) / setting.lr
    )
    batches = byte_batches(batch_size=config.batch_size, seq_len=config.seq_len, seed=seed)
    steps, every = config.steps(setting), config.every(setting)
    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    with WeibullMonitor(model, optimizer, every=every, store=store, run_name=name, rules=[]) as monitor:
        monitor.observe(0)  # the initial weights: λ_first, the reference of scale growth
        for step in range(1, steps + 1):
            ids = next(batches)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            monitor.observe(step)
        if steps % every:
            monitor.snapshot(steps)  # the terminal state is always measured
        reached = monitor.last_snapshot.T_over_tau if monitor.last_snapshot is not None else None
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tail = losses[-max(1, len(losses) // 10) :]
    log(
        f"  {name}: {steps} steps (every {every}), T/τ {reached if reached is not None else math.nan:.2f}, "
        f"final loss {statistics.mean(tail):.3f} (mean of the last 10%), {seconds:.1f} s"
    )
    return {
        "seed": seed,
        "steps": steps,
        "every": every,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "final_loss": statistics.mean(tail),
    }


# ------------------------------------------------------------------------------------------------ statistics
