"""One big snapshot in its own process, for tests/test_load.py (which watches this process's memory).

    python load_snapshot.py many N      # a model of N small matrices (16x16 fp32), one monitor snapshot
    python load_snapshot.py huge N      # one N-element bf16 matrix (rows x 25000), one monitor snapshot

Prints "READY <rss bytes>" once the weights exist (the baseline the parent measures growth from), then one JSON
line with the figures: seconds of the snapshot, fits ok, peak RSS growth seen from inside (sampled every 2 ms).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class ManyMatrices(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mats = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(16, 16, generator=gen)) for _ in range(n)
        )


class OneHugeMatrix(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        cols = 25_000
        weight = torch.empty(n // cols, cols, dtype=torch.bfloat16)
        block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
        flat = weight.view(-1)
        for start in range(0, flat.numel(), block.numel()):  # cheap fill: copies of one random block
            piece = flat[start : start + block.numel()]
            piece.copy_(block[: piece.numel()])
        self.proj = torch.nn.Linear(1, 1, bias=False)
        self.proj.weight = torch.nn.Parameter(weight, requires_grad=False)


def main() -> None:
    kind, n = sys.argv[1], int(float(sys.argv[2]))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from weibull_monitor.monitor import WeibullMonitor

    model = ManyMatrices(n) if kind == "many" else OneHugeMatrix(n)
    monitor = WeibullMonitor(model, every=1, store=None, rules=[])
    _ = monitor.roles  # role map built before the baseline: it is per model, not per snapshot
    base = rss()
    print(f"READY {base}", flush=True)
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    snapshot = monitor.observe(0)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    fits = snapshot.fits if snapshot is not None else {}
    print(
        json.dumps(
            {
                "kind": kind,
                "n": n,
                "matrices": len(fits),
                "ok": sum(f.ok for f in fits.values()),
                "seconds": seconds,
                "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "rss_growth_bytes": peak[0] - base,
                "k": [f.k for f in fits.values()][:3],
            }
        ),
        flush=True,
    )
    monitor.close()


if __name__ == "__main__":
    main()
