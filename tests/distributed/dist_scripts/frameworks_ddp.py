"""One rank of the framework checks under DDP: HF Trainer and Lightning (strategy="ddp"), CPU, gloo.

Launched by tests/test_distributed.py as users launch them:
  ``torchrun --nproc_per_node 2 frameworks_ddp.py OUT_DIR hf``   (HF Trainer, ddp_backend="gloo", use_cpu=True)
  ``python frameworks_ddp.py OUT_DIR lit``                       (Lightning starts rank 1 itself: strategy="ddp")
Runs:
- hf / lit:            the WeibullCallback, 12 steps, every=4, store OUT_DIR/<name>.sqlite (written by rank 0 only);
- hf_stop / lit_stop:  20 steps, stop_on_critical, with a rule that fires a critical alert on rank 1 only from step 8.

Writes OUT_DIR/<framework>_rank<r>.json (final global steps, the last snapshot's fits on this rank, errors).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(int(os.environ.get("WEIBULL_TEST_THREADS", "1")))  # conftest.py: 1 unless asked

SEQ = 32
MODEL = {"hidden_size": 128, "intermediate_size": 344}


def rank_one_critical_rule(from_step: int):
    """A critical alert that only rank 1 raises: without agreement, rank 0 would train on and hang in DDP."""
    from weibull_monitor.alerts import Breach, Rule

    class RankOneCritical(Rule):
        name = "forced_rank1_critical"
        level = "critical"

        def evaluate(self, snapshot):
            if dist.get_rank() == 1 and snapshot.step >= from_step:
                return [Breach(key="forced", matrices=(), values={}, message="forced on rank 1 (test)")]
            return []

    return RankOneCritical()


def last_fits(snapshot) -> dict:
    return {
        "step": snapshot.step,
        "fits": {key: [fit.k, fit.scale, fit.n] for key, fit in snapshot.fits.items()},
    }


def keep_last_snapshot(callback) -> list:
    """The callbacks close their monitor at train end: keep its last snapshot (every rank has one) just before."""
    kept: list = []
    original = callback.on_train_end

    def on_train_end(*args, **kwargs):
        if callback.monitor is not None and callback.monitor.last_snapshot is not None:
            kept.append(callback.monitor.last_snapshot)
        return original(*args, **kwargs)

    callback.on_train_end = on_train_end
    return kept


def run_hf(out_dir: Path, name: str, max_steps: int, rules=None, stop: bool = False) -> dict:
    from transformers import Trainer, TrainingArguments

    from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
    from weibull_monitor.integrations.hf import WeibullCallback

    callback = WeibullCallback(
        every=4, store=str(out_dir / f"{name}.sqlite"), stop_on_critical=stop, rules=rules
    )
    last = keep_last_snapshot(callback)
    args = TrainingArguments(
        output_dir=str(out_dir / name),
        use_cpu=True,
        ddp_backend="gloo",
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_timeout=60,  # seconds: a deadlock fails fast instead of hanging CI
    )
    trainer = Trainer(
        model=tiny_llama(seed=0, **MODEL),
        args=args,
        train_dataset=ByteWindowDataset(n_samples=96, seq_len=SEQ),
        callbacks=[callback],
    )
    trainer.train()
    return {"global_step": int(trainer.state.global_step), "last_fits": last_fits(last[0]) if last else {}}


def run_lightning(out_dir: Path, name: str, max_steps: int, rules=None, stop: bool = False) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
    from weibull_monitor.integrations.lightning import WeibullCallback

    class LitLlama(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama(seed=0, **MODEL)
            self.config = self.model.config

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)

    callback = WeibullCallback(
        every=4, store=str(out_dir / f"{name}.sqlite"), stop_on_critical=stop, rules=rules
    )
    last = keep_last_snapshot(callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        # strategy="ddp", with a collective timeout so that a deadlock fails in seconds instead of hanging CI
        strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir / name),
        callbacks=[callback],
    )
    loader = torch.utils.data.DataLoader(ByteWindowDataset(n_samples=96, seq_len=SEQ), batch_size=2)
    trainer.fit(LitLlama(), loader)
    return {
        "global_step": int(trainer.global_step),
        "last_fits": last_fits(last[0]) if last else {},
        "strategy": type(trainer.strategy).__name__,
        "world_size": int(trainer.world_size),
    }


def main() -> None:
    out_dir, framework = Path(sys.argv[1]), sys.argv[2]
    faulthandler.dump_traceback_later(120, exit=True)  # a hang shows where each rank waits, in the test's log
    runs = {
        "hf": (
            ("hf", lambda: run_hf(out_dir, "hf", 12)),
            ("hf_stop", lambda: run_hf(out_dir, "hf_stop", 20, [rank_one_critical_rule(8)], stop=True)),
        ),
        "lit": (
            ("lit", lambda: run_lightning(out_dir, "lit", 12)),
            (
                "lit_stop",
                lambda: run_lightning(out_dir, "lit_stop", 20, [rank_one_critical_rule(8)], stop=True),
            ),
        ),
    }[framework]
    # torchrun sets RANK; Lightning's own launcher sets LOCAL_RANK for the processes it starts (one node here).
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    out: dict = {"rank": rank, "errors": {}}
    for name, run in runs:
        try:
            out[name] = run()
        except Exception:
            out["errors"][name] = traceback.format_exc()
        # Written after every run, so a later hang still leaves the earlier results for the test to report.
        (out_dir / f"{framework}_rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
