"""The demo check: ``weibull-monitor demo``'s own recipe (HF Trainer, its model, dataset and arguments) trained with
the monitor (``rules=[]``) *and* this suite's attention probe and weights-only per-head figures, so the package rules
(the weights-only one included) and the ground truth can both be applied to exactly what the demo trains.

    python benchmarks/alert_quality.py --demo-check --out out/demo_check [--steps 600]

(``--replay <demo out>/weibull.sqlite`` replays the real demo's store instead: every Weibull rule, no per-head data.)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ._toy import demo_recipe
from .models import ATTN_IMPL, AttentionProbe, qk_head_norms, register_probe, weight_norms
from .runs import RunSpec
from .train import SIGNALS, STORE, _json_safe


def train_demo(out: Path, steps: int | None = None, seed: int = 0) -> RunSpec:
    """Train the demo recipe under ``out/<name>/`` like a suite run (store + signals) and return its spec."""
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from weibull_monitor import WeibullMonitor

    recipe = demo_recipe()
    steps = int(steps or recipe["steps"])
    every = max(1, steps // recipe["snapshots"])
    spec = RunSpec(
        "demo_trainer", seed, "healthy", lr=recipe["lr"], weight_decay=recipe["weight_decay"], steps=steps,
        warmup=max(1, steps // 20), batch=recipe["batch"], seq_len=recipe["seq_len"], betas=(0.9, 0.999),
        every=every,
    )  # fmt: skip
    directory = Path(out) / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (STORE, STORE + "-wal", STORE + "-shm", SIGNALS):
        (directory / stale).unlink(missing_ok=True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    register_probe()
    model = recipe["model"](seed)
    model.config._attn_implementation = ATTN_IMPL
    dataset = recipe["dataset"](steps, seed)
    args = TrainingArguments(
        output_dir=str(directory / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=recipe["batch"],
        learning_rate=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="constant_with_warmup",
        logging_steps=every,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
    )
    probe = AttentionProbe()
    sig: dict[str, Any] = {
        "spec": spec.to_dict(), "digest": spec.digest(), "steps": [], "loss": [], "grad_norm": [], "lr": [],
        "attn_entropy": [], "attn_entropy_min_head": [], "attn_logit_max": [], "w_steps": [], "weight_norms": {},
        "qk_head_norms": [],
    }  # fmt: skip

    class Probe(TrainerCallback):
        monitor: Any = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.monitor = WeibullMonitor(
                model, optimizer, every=every, store=str(directory / STORE), rules=[], run_name=spec.name
            )
            self.monitor.observe(0)
            self._weights(model, 0)
            AttentionProbe.active = probe

        def _weights(self, model, step):
            sig["w_steps"].append(step)
            for name, value in weight_norms(model).items():
                sig["weight_norms"].setdefault(name, []).append(value)
            sig["qk_head_norms"].append(qk_head_norms(model))

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            record = probe.take()
            step = state.global_step
            sig["steps"].append(step)
            sig["lr"].append(float(optimizer.param_groups[0]["lr"]))
            if record is not None:  # the last micro-batch's forward (no accumulation here)
                sig["attn_entropy"].append(record.entropy)
                sig["attn_entropy_min_head"].append(record.entropy_min_head)
                sig["attn_logit_max"].append(record.logit_max)
            self.monitor.observe(step)
            if step % every == 0:
                self._weights(model, step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

        def on_train_end(self, args, state, control, **kwargs):
            AttentionProbe.active = None
            self.monitor.close()

    class LossTrainer(Trainer):  # the per-step loss and gradient norm, as the suite records them
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            sig["loss"].append(float(loss.detach()))
            grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
            sig["grad_norm"].append(
                float(torch.linalg.vector_norm(torch.stack(grads))) if grads else math.nan
            )
            return loss

    started = time.perf_counter()
    LossTrainer(model=model, args=args, train_dataset=dataset, callbacks=[Probe()]).train()
    sig["wall_s"] = time.perf_counter() - started
    n = min(len(sig["steps"]), len(sig["loss"]))
    for key in (
        "steps",
        "loss",
        "grad_norm",
        "lr",
        "attn_entropy",
        "attn_entropy_min_head",
        "attn_logit_max",
    ):
        sig[key] = sig[key][:n]
    sig["complete"] = True
    (directory / SIGNALS).write_text(json.dumps(_json_safe(sig)))
    return spec
