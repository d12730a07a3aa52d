"""Speed of one Weibull fit against one read pass of the same tensor, measured in the same run.

For 4096x4096 and 4096x11008 in fp32 and bf16: milliseconds per fit for the histogram and exact methods, and the
ratio of the histogram fit to one ``torch.linalg.vector_norm(w, 1)`` pass (target <= 1.5 on a 2-core CPU).
The CPU may be shared, so every figure is a median over interleaved repeats, and the ratio is the median of the
per-repeat ratios (each from back-to-back timings).

    python benchmarks/fit_speed.py [--repeats 15] [--exact-repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from weibull_monitor.fit import fit_weibull
from weibull_monitor.histogram import WeightHistogram

SHAPES = ((4096, 4096), (4096, 11008))
DTYPES = (torch.float32, torch.bfloat16)


def _ms(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--exact-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    header = f"{'shape':>12} {'dtype':>9} {'floor ms':>9} {'hist ms':>8} {'count ms':>8} {'exact ms':>9} {'ratio':>6}"
    print(header)
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        base = torch.randn(shape, generator=generator) * 0.02
        for dtype in DTYPES:
            w = base.to(dtype)
            hist = WeightHistogram.from_tensor(w)
            fit_weibull(w)  # warm-up: thread pool, code tables
            floor, fit, count, ratios = [], [], [], []
            for _ in range(args.repeats):
                a = _ms(torch.linalg.vector_norm, w, 1)
                b = _ms(fit_weibull, w)
                c = _ms(hist.fit)
                floor.append(a)
                fit.append(b)
                count.append(c)
                ratios.append(b / a)
            exact = [_ms(lambda t: fit_weibull(t, method="exact"), w) for _ in range(args.exact_repeats)]
            print(
                f"{'x'.join(map(str, shape)):>12} {str(dtype).removeprefix('torch.'):>9} "
                f"{statistics.median(floor):9.1f} {statistics.median(fit):8.1f} {statistics.median(count):8.1f} "
                f"{statistics.median(exact):9.0f} {statistics.median(ratios):6.2f}"
            )
    print("hist ms: histogram method, whole fit; count ms: fitting the counts alone (included in hist ms);")
    print("ratio: median over repeats of (histogram fit / one vector_norm(w, 1) pass timed just before it)")


if __name__ == "__main__":
    main()
