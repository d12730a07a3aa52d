"""Speed of one Weibull fit against one read pass of the same tensor, measured in the same run.

For 4096x4096 and 4096x11008 in fp32 and bf16: milliseconds per fit for the histogram and exact methods, and the
ratio of the histogram fit to the read floor of ``benchmarks/floor.py`` (the fastest of ``vector_norm(w, 2)``,
``w.sum()`` and a copy into a preallocated buffer over the same tensor; target <= 1.5 on a 2-core CPU).
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
from floor import ReadFloor, machine_line  # sibling script (benchmarks/ is on sys.path when run)

from weibull_monitor.estimator import fit_weibull
from weibull_monitor.estimator.histogram import WeightHistogram

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
    print(f"{machine_line()}; {args.repeats} repeats (medians)")
    header = (
        f"{'shape':>12} {'dtype':>9} {'floor ms':>9} {'hist ms':>8} {'count ms':>8} {'exact ms':>9} {'ratio':>6} "
        f"{'best':>5}"
    )
    print(header)
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        base = torch.randn(shape, generator=generator) * 0.02
        for dtype in DTYPES:
            w = base.to(dtype)
            hist = WeightHistogram.from_tensor(w)
            fit_weibull(w)  # warm-up: thread pool, code tables
            reads = ReadFloor([w])
            fit, count = [], []
            for _ in range(args.repeats):
                reads.time_once()
                fit.append(_ms(fit_weibull, w))
                count.append(_ms(hist.fit))
            floor = reads.floor_ms()
            exact = [_ms(lambda t: fit_weibull(t, method="exact"), w) for _ in range(args.exact_repeats)]
            print(
                f"{'x'.join(map(str, shape)):>12} {str(dtype).removeprefix('torch.'):>9} "
                f"{floor:9.1f} {statistics.median(fit):8.1f} {statistics.median(count):8.1f} "
                f"{statistics.median(exact):9.0f} {statistics.median(fit) / floor:6.2f} "
                f"{min(fit) / min(min(ts) for ts in reads.times.values()):5.2f}"
            )
    print("hist ms: histogram method, whole fit; count ms: fitting the counts alone (included in hist ms);")
    print("ratio: median histogram fit / the read floor (fastest median of the l2, sum and copy passes);")
    print("best: fastest histogram fit / fastest read pass (the least disturbed figures on a shared machine)")
    _whole_model(args.repeats)
    _anchor_cost()


def _whole_model(repeats: int) -> None:
    """fit_many over every block matrix of a LLaMA-shaped model vs a loop of fit_weibull vs the read floor."""
    from weibull_monitor.demos.toy import llama_config_with_params
    from weibull_monitor.estimator import fit_many

    config = llama_config_with_params(25e6, hidden_size=512)
    generator = torch.Generator().manual_seed(1)
    shapes = []
    for _ in range(config.num_hidden_layers):
        h, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * 64
        shapes += [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    named = [(f"m{i}", torch.randn(s, generator=generator) * 0.02) for i, s in enumerate(shapes)]
    tensors = [t for _, t in named]
    fit_many(named)
    reads = ReadFloor(tensors)
    batched, loop = [], []
    for _ in range(repeats):
        reads.time_once()
        batched.append(_ms(fit_many, named))
        loop.append(_ms(lambda: [fit_weibull(t) for t in tensors]))
    elements = sum(t.numel() for t in tensors) / 1e6
    f = reads.floor_ms()
    b, lp = statistics.median(batched), statistics.median(loop)
    print(
        f"{len(named)} matrices, {elements:.1f}M elements (fp32): read floor {f:.1f} ms, fit_many {b:.1f} ms "
        f"(ratio {b / f:.2f}), fit_weibull loop {lp:.1f} ms (ratio {lp / f:.2f})"
    )


def _anchor_cost() -> None:
    """Cost of computing the anchors (done once at import)."""
    import numpy as np

    from weibull_monitor.estimator import quadrature as _quadrature

    start = time.perf_counter()
    _quadrature.line_fit_limit(lambda f: np.log(_quadrature.half_normal_quantile(f)))
    print(f"anchors by quadrature: {(time.perf_counter() - start) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
