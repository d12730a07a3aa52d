"""The floor every benchmark divides by: the fastest read of the same bytes, measured in the same run.

No statistic of every weight can cost less than reading every weight once, but no single torch op is that read:
on CPU ``vector_norm(p, 1)`` is not vectorised and costs several reads, ``vector_norm(p, 2)`` and ``p.sum()`` are,
and a copy into a preallocated buffer moves the bytes with no arithmetic at all. So the floor is the fastest of
those three passes over exactly the tensors the measured code reads (the median of each over the repeats, then the
smallest median), timed interleaved with it. On an accelerator every pass is bracketed by a device synchronisation.

Used as a module by the other scripts (``from floor import ReadFloor``); run alone it prints the three passes for a
LLaMA-shaped model: ``python benchmarks/floor.py [--params 125e6] [--dtype bf16] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Measure the checkout these scripts sit in, not whatever copy is installed: run as ``python benchmarks/x.py``,
# sys.path[0] is benchmarks/, so without this an editable install of another worktree would be the one timed.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

PASS_NAMES = ("l2", "sum", "copy")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReadFloor:
    """Read passes over ``tensors`` (one device): ``l2`` (``vector_norm(t, 2)``), ``sum`` (``t.sum()``), ``copy``
    (into one preallocated buffer as large as the largest tensor, reused, so the floor adds no allocation)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = [t.detach() for t in tensors]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        largest = max(self.tensors, key=lambda t: t.numel() * t.element_size(), default=None)
        self._buffer = (
            torch.empty(largest.numel() * largest.element_size(), dtype=torch.uint8, device=self.device)
            if largest is not None
            else None
        )
        self.times: dict[str, list[float]] = {name: [] for name in PASS_NAMES}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def _run(self, name: str) -> None:
        with torch.no_grad():
            if name == "l2":
                for t in self.tensors:
                    torch.linalg.vector_norm(t, 2)
            elif name == "sum":
                for t in self.tensors:
                    t.sum()
            else:
                for t in self.tensors:
                    out = self._buffer[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                    out.copy_(t)

    def time_once(self) -> dict[str, float]:
        """One timing (ms) of each pass, appended to ``times``."""
        measured = {}
        for name in PASS_NAMES:
            measured[name] = timed_ms(lambda n=name: self._run(n), self.device)
            self.times[name].append(measured[name])
        return measured

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(ts) for name, ts in self.times.items() if ts}

    def floor_ms(self) -> float:
        """The smallest median: the fastest read of these bytes seen in this run."""
        return min(self.medians().values())

    def fastest(self) -> str:
        medians = self.medians()
        return min(medians, key=medians.__getitem__)


def machine_line() -> str:
    """CPU model, cores, load average and the counting backend in use: what a reader needs to weigh the figures."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    import weibull_monitor
    from weibull_monitor.estimator.histogram import COUNTING_BACKEND

    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{model}, {os.cpu_count()} cores, load average {load} (1/5/15 min), torch {torch.__version__} on "
        f"{torch.get_num_threads()} threads, counting: {COUNTING_BACKEND} "
        f"({Path(weibull_monitor.__file__).parent.parent})"
    )


def timed_ms(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall time of ``fn()`` in ms, device work included."""
    device = device or torch.device("cpu")
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=125e6)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    from weibull_monitor.demos.toy import llama_config_with_params

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config_with_params(args.params))
    model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    floor = ReadFloor([p for p in model.parameters() if p.dim() == 2])
    floor.time_once()  # warm-up
    floor.times = {name: [] for name in PASS_NAMES}
    for _ in range(args.repeats):
        floor.time_once()
    gb = floor.nbytes / 1e9
    for name, ms in floor.medians().items():
        print(f"{name:>5}: {ms:8.1f} ms  ({gb / (ms / 1e3):5.1f} GB/s)")
    print(f"floor: {floor.fastest()} ({floor.floor_ms():.1f} ms for {gb:.2f} GB)")


if __name__ == "__main__":
    main()
