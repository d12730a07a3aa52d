"""The loader fuzz harness (tests/robustness/fuzz_runner.py) on the issue-19 inputs and 200 structure-aware
mutations of real safetensors, PyTorch (zip and legacy), GGUF, index, config and trainer-state files.

Targets checked for every input: no hang, CPU <= 10 s and resident memory growth <= 500 MB; exit 0 with every ok
fit equal to the fit of the bytes the format's own library reads, or exit 2 with one error line; no traceback; no
file changed or created that the command does not own. The larger run behind docs/reliability.md:
``python tests/robustness/fuzz_runner.py OUT --cases 3000 --big``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).parent / "fuzz_runner.py"


def test_every_input_of_the_corpus_meets_the_targets(tmp_path):
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(tmp_path / "fuzz"), "--cases", "200", "--seed", "19"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary_path = tmp_path / "fuzz" / "summary.json"
    assert summary_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    failed = [(r["name"], r["problems"]) for r in summary["results"] if r["problems"]]
    print(
        f"\n{summary['cases']} inputs: {summary['outcomes']}; {summary['rows_checked']} ok rows checked against the "
        f"libraries; worst CPU {summary['worst_cpu_s']}, worst memory growth {summary['worst_memory_growth_mb']}"
    )
    assert not failed, failed[:20]
    assert summary["outcomes"]["hang"] == 0 and summary["outcomes"]["crash"] == 0
    assert summary["rows_checked"] > 300  # the ok outcomes were verified, not only counted
    assert {"safetensors", "torch", "gguf", "index", "config", "series", "store", "report"} <= set(summary["structures"])
    assert done.returncode == 0
