"""The alert benchmark's quick suite as a CI test (``python benchmarks/alert_quality.py --quick``): five short runs
trained with the monitor, labelled by their ground truth (attention entropy, logit, loss), then scored with the
default rules. It fails when a healthy run or the qk-norm control raises a warning, when the too-high-lr run or the
corrupted layer is not flagged at or before the first snapshot that can see the failure, or when replaying the store
does not reproduce the live monitor's alerts. About 55 s of CPU on one thread; docs/alerts.md §4 has the margins
measured under ATEN_CPU_CAPABILITY default/avx2 with 1 and 2 threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.trains
def test_quick_alert_suite(tmp_path):
    threads = os.environ.get("WEIBULL_TEST_THREADS", "1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "alert_quality.py"), "--quick", "--threads", threads,
         "--out", str(tmp_path / "quick")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "quick: OK" in done.stdout
    assert "lr_too_high-llama_mha" in done.stdout and "replay identical" in done.stdout
