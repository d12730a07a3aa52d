"""Peak extra memory of a snapshot beyond the weights, for a ~125M LLaMA-shaped model and one twice as large.

Each model is measured in a fresh subprocess: build the model, read every weight once (so its pages are resident),
then reset the kernel's RSS high-water mark (``/proc/self/clear_refs`` <- 5), note the current RSS, run a snapshot
(``WeibullMonitor.snapshot`` without a store) and read the high-water mark (``VmHWM``) again. The extra memory is
HWM - RSS before the snapshot: code buffers, counts, thread stacks, anything the snapshot allocates. The first
snapshot also pays one-time costs (thread pool, tables, role map); the second shows the steady state.

Target: <= 64 MiB and not growing with model size.

    python benchmarks/memory.py [--params 125e6,250e6] [--dtype fp32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def child(n_params: float, dtype_name: str, threads: int) -> dict[str, float]:
    """Run in the subprocess: the extra RSS peak (MiB) of a first and a second snapshot."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from snapshot_floor import DTYPES, build_model

    from weibull_monitor.monitor import WeibullMonitor

    model = build_model(n_params, DTYPES[dtype_name])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            torch.linalg.vector_norm(p, 2)
    monitor = WeibullMonitor(model, None, every=10**9, store=None, rules=[])
    result: dict[str, float] = {"weights_mib": weights / MIB}
    for label, step in (("first", 1), ("second", 2)):
        _reset_peak()
        before = _status_kib("VmRSS")
        monitor.snapshot(step)
        peak = _status_kib("VmHWM")
        result[f"{label}_extra_mib"] = (peak - before) / 1024
    monitor.close()
    result["rss_mib"] = _status_kib("VmRSS") / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="125e6,250e6")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(float(args.params), args.dtype, args.threads)))
        return
    print(f"{args.dtype} weights, {args.threads} threads, one fresh subprocess per model")
    print(
        f"{'params':>8} {'weights MiB':>11} {'first extra MiB':>15} {'second extra MiB':>16} {'RSS MiB':>8}"
    )
    for n in args.params.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--params",
                n,
                "--dtype",
                args.dtype,
                "--threads",
                str(args.threads),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{float(n) / 1e6:7.0f}M {r['weights_mib']:11.0f} {r['first_extra_mib']:15.1f} "
            f"{r['second_extra_mib']:16.1f} {r['rss_mib']:8.0f}"
        )
    print(
        "extra = RSS high-water mark during the snapshot - RSS just before it (target <= 64 MiB, flat in size)"
    )


if __name__ == "__main__":
    main()
