"""``weibull-monitor demo``: the first thing to run. A tiny LLaMA learns Python, and the monitor watches it.

A small LLaMA-style model (byte vocabulary) trains on CPU on the Python standard library's own source files, which
every Python install carries, so nothing is downloaded. It trains through the Hugging Face ``Trainer`` with the
:class:`~weibull_monitor.integrations.hf.WeibullCallback`, logs to offline W&B and TensorBoard and to a run store,
then draws the report and prints where every output is and how to open it.

The learning rate (1e-3) and decoupled weight decay (1.0) are chosen so that a run of a few minutes already shows
what the monitor is for (Selection matrices leaving their start and their λ growing, T/τ reaching about 0.6) and
stays healthy: the attention of every layer keeps its entropy above 0.7 nats and no alert above info fires. At the earlier
recipe (lr 3e-3, weight decay 0.1) the last layer's attention went one-hot (entropy below 0.3 nats from step ~175),
the final loss was worse (2.15 against 1.82 over the last 50 steps), and ``attention_logit_bound`` rightly warned
(docs/alerts.md §7).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

#: Default optimizer steps: about 2 minutes of training on one CPU core of the reference machine.
DEFAULT_STEPS = 600
BATCH_SIZE = 8
SEQ_LEN = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1.0
SNAPSHOTS = 30  # snapshots over the run when --every is not given

#: The demo model: 4 layers, hidden 128, grouped-query attention (4 heads, 2 KV heads); about 0.8M parameters.
DEMO_MODEL = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": SEQ_LEN,
}


@dataclass
class DemoOutputs:
    """Where the demo wrote everything, and what it measured (first and last snapshot)."""

    out: Path
    store: Path
    report: Path
    tensorboard: Path
    wandb_run: Path | None
    trainer: Path
    run_name: str
    steps: int
    seconds: float
    snapshots: list[int] = field(default_factory=list)
    k_first: dict[str, float] = field(default_factory=dict)
    k_last: dict[str, float] = field(default_factory=dict)
    scale_growth: dict[str, float] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    T_over_tau: float | None = None


@contextlib.contextmanager
def _demo_environment(out: Path, threads: int):
    """Offline W&B under ``out``, TensorBoard under ``out``, no hub access; restored afterwards."""
    import torch

    values = {
        "WANDB_MODE": "offline",  # forced: the demo never needs the network
        "WANDB_DIR": str(out),
        "WANDB_PROJECT": "weibull-monitor-demo",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TENSORBOARD_LOGGING_DIR": str(out / "tensorboard"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved = {key: os.environ.get(key) for key in values}
    saved_threads = torch.get_num_threads()
    os.environ.update(values)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _available_dashboards() -> tuple[list[str], list[tuple[str, str]]]:
    """(``report_to`` names whose packages are installed, [(dashboard, pip name)] of those that are not)."""
    import importlib.util

    present, missing = [], []
    for name, module, package in (("wandb", "wandb", "wandb"), ("tensorboard", "tensorboard", "tensorboard")):
        if importlib.util.find_spec(module) is None:
            missing.append((name, package))
        else:
            present.append(name)
    return present, missing


def _finish_wandb() -> Path | None:
    """Close the W&B run the Trainer opened (it leaves it open) and return its offline directory."""
    try:
        import wandb
    except ImportError:
        return None
    run = wandb.run
    if run is None:
        return None
    directory = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run directory
    wandb.finish()
    return directory


def _summary(store_path: Path, run_name: str) -> dict[str, Any]:
    from weibull_monitor.store import RunStore

    with RunStore(store_path) as store:
        run_id = store.run_id(run_name)
        if run_id is None:
            return {}
        snapshots = store.snapshots(run_id)
        aggregates = store.aggregates(run_id=run_id)
        alerts = store.alerts(run_id)
    steps = [s["step"] for s in snapshots]
    by_step: dict[int, dict[str, float]] = {}
    for row in aggregates:
        by_step.setdefault(row["step"], {})[row["metric"]] = row["value"]
    first, last = (by_step.get(steps[0], {}), by_step.get(steps[-1], {})) if steps else ({}, {})
    classes = ("selection", "value", "transmission")
    return {
        "snapshots": steps,
        "k_first": {c: first[f"weibull/{c}/k_median"] for c in classes if f"weibull/{c}/k_median" in first},
        "k_last": {c: last[f"weibull/{c}/k_median"] for c in classes if f"weibull/{c}/k_median" in last},
        "scale_growth": {
            c: last[f"weibull/{c}/scale_growth"] for c in classes if f"weibull/{c}/scale_growth" in last
        },
        "alerts": alerts,
        "T_over_tau": snapshots[-1]["T_over_tau"] if snapshots else None,
    }


def run_demo(
    steps: int | None = None,
    out: str | Path = "weibull-demo",
    *,
    every: int | None = None,
    seed: int = 0,
    threads: int = 1,
    stream: TextIO | None = None,
) -> DemoOutputs:
    """Train, monitor, report; print where the outputs are to ``stream`` (stdout). Returns the paths and figures.

    ``steps``: optimizer steps (default :data:`DEFAULT_STEPS`). ``every``: snapshot interval in steps (default: about
    30 snapshots per run). ``threads``: torch CPU threads; one is fastest for a model this small.
    """
    stream = stream or sys.stdout
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    every = max(1, steps // SNAPSHOTS) if every is None else int(every)
    if every < 1:
        raise ValueError(f"--every must be at least 1, got {every}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "weibull.sqlite"
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"

    with _demo_environment(out, threads):
        import transformers
        from transformers import Trainer, TrainingArguments

        from weibull_monitor.alerts import default_rules
        from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
        from weibull_monitor.integrations.hf import WeibullCallback
        from weibull_monitor.offline.report import write_report

        transformers.logging.set_verbosity_error()
        model = tiny_llama(seed, **DEMO_MODEL)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"weibull-monitor demo: a {DEMO_MODEL['num_hidden_layers']}-layer LLaMA ({n_params / 1e6:.1f}M parameters, "
            f"byte-level) learns the Python standard library's source for {steps} steps "
            f"(lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}); a snapshot every {every} steps.",
            file=stream,
            flush=True,
        )
        dataset = ByteWindowDataset(
            n_samples=min(max(steps * BATCH_SIZE, 64), 8192), seq_len=SEQ_LEN, seed=seed
        )
        dashboards, missing = _available_dashboards()
        for name, package in missing:
            print(
                f"  ({name} is not installed: pip install {package}; the demo goes on without it)",
                file=stream,
            )
        args = TrainingArguments(
            output_dir=str(out / "trainer"),
            run_name=run_name,
            max_steps=steps,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="constant_with_warmup",
            logging_steps=max(1, every),
            save_strategy="no",
            report_to=dashboards,
            use_cpu=True,
            disable_tqdm=not sys.stderr.isatty(),
            dataloader_num_workers=0,
            seed=seed,
        )
        rules = default_rules()
        callback = WeibullCallback(every=every, store=str(store_path), run_name=run_name, rules=rules)
        if "wandb" in dashboards:
            # started here, under ``out``, with the demo's settings: the Trainer's callback reuses an active run,
            # and W&B would otherwise keep the directory of the first run this process ever started
            import wandb

            wandb.init(project="weibull-monitor-demo", name=run_name, dir=str(out), mode="offline")
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        wandb_run = _finish_wandb()
        report = write_report(store_path, out / "report", run=run_name)

    outputs = DemoOutputs(
        out=out,
        store=store_path,
        report=report,
        tensorboard=out / "tensorboard",
        wandb_run=wandb_run,
        trainer=out / "trainer",
        run_name=run_name,
        steps=steps,
        seconds=seconds,
        rules=[rule.name for rule in rules],
        **_summary(store_path, run_name),
    )
    _print_outputs(outputs, stream)
    return outputs


def _print_outputs(o: DemoOutputs, stream: TextIO) -> None:
    def line(text: str = "") -> None:
        print(text, file=stream)

    line(f"\ntrained {o.steps} steps in {o.seconds:.0f} s; {len(o.snapshots)} snapshots in {o.store.name}")
    for klass in ("selection", "value", "transmission"):
        if klass in o.k_first and klass in o.k_last:
            growth = o.scale_growth.get(klass)
            growth_text = f", scale λ x{growth:.2f}" if growth is not None else ""
            line(f"  {klass:<12} median k {o.k_first[klass]:.3f} -> {o.k_last[klass]:.3f}{growth_text}")
    if o.T_over_tau is not None:
        line(f"  T/tau (sum of lr x weight decay) reached {o.T_over_tau:.3f}")
    levels: dict[str, int] = {}
    for alert in o.alerts:
        levels[alert["level"]] = levels.get(alert["level"], 0) + 1
    fired = ", ".join(f"{n} {level}" for level, n in sorted(levels.items())) or "none fired"
    line(f"  alert rules evaluated at every snapshot: {', '.join(o.rules)}; alerts: {fired}")
    for alert in o.alerts[:3]:
        line(f"    step {alert['step']}: [{alert['level']}] {alert['message']}")

    line("\nOutputs")
    line(f"  report       {o.report}")
    line(f"               open:  python -m webbrowser {o.report.as_uri()}")
    line(f"  run store    {o.store}")
    line(f"               redraw: weibull-monitor report {o.store} -o {o.out / 'report'}")
    if o.tensorboard.is_dir():
        line(f"  TensorBoard  {o.tensorboard}")
        line(f"               open:  tensorboard --logdir {o.tensorboard}   (then http://localhost:6006)")
    if o.wandb_run is not None:
        line(f"  W&B offline  {o.wandb_run}")
        line(f"               upload when you want: wandb sync {o.wandb_run}")
    line(f"  trainer      {o.trainer}")
