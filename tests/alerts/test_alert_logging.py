"""Warnings and criticals reach Python logging by default, whatever the dashboards: through the HF Trainer with
``report_to=[]`` and no sink, a warning is printed on stderr by logging's last-resort handler; with a LoggingSink
configured it is still logged once, not twice."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from weibull_monitor.alerts import Breach, Rule
from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.sinks import LoggingSink


class AlwaysWarns(Rule):
    name, level = "always_warns", "warning"

    def evaluate(self, snapshot):
        return [Breach("x", (), {}, "a test warning; try nothing")]


@pytest.mark.trains
def test_hf_trainer_without_dashboards_prints_warnings(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, torch
        torch.set_num_threads(int(os.environ.get("WEIBULL_TEST_THREADS", "1")))
        from transformers import Trainer, TrainingArguments
        from weibull_monitor.alerts import Breach, Rule
        from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama
        from weibull_monitor.integrations.hf import WeibullCallback

        class AlwaysWarns(Rule):
            name, level = "always_warns", "warning"
            def evaluate(self, snapshot):
                return [Breach("x", (), {{}}, "a test warning; try nothing")]

        args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, max_steps=2, per_device_train_batch_size=2,
                                 report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 logging_strategy="no", dataloader_num_workers=0)
        callback = WeibullCallback(every=1, store=False, rules=[AlwaysWarns()])
        Trainer(model=tiny_llama(0), args=args, train_dataset=ByteWindowDataset(n_samples=8, seq_len=16),
                callbacks=[callback]).train()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "always_warns" in line]
    assert lines and all("[warning] always_warns" in line for line in lines)


def test_logging_sink_does_not_duplicate_alert_lines(caplog):
    monitor = WeibullMonitor(tiny_llama(0), store=None, rules=[AlwaysWarns()], sinks=[LoggingSink()])
    with caplog.at_level(logging.INFO, logger="weibull_monitor"):
        monitor.snapshot(0)
        monitor.flush()
    monitor.close()
    alert_lines = [r for r in caplog.records if "weibull-monitor alert" in r.getMessage()]
    assert len(alert_lines) == 1 and alert_lines[0].levelno == logging.WARNING
    snapshot_lines = [r for r in caplog.records if r.getMessage().startswith("weibull step 0")]
    assert len(snapshot_lines) == 1 and "warning always_warns" in snapshot_lines[0].getMessage()
