"""How far the histogram fit can be from the exact fit on weights that take few distinct values: Gaussian weights
quantised blockwise to 4 bits and dequantised (absmax int4, NF4, asymmetric min/max with a zero point as in
GPTQ-style groups; block scales kept in full precision or double-quantised to 8 bits), as fp32 and as fp16.

For fp32 weights the histogram reads the top 16 bits of each value and places the values of a bin uniformly in
ln|w| inside it; when a bin holds a handful of repeated values instead, that placement is off by up to half a bin,
and the fit moves a little. fp16/bf16 copies are counted value by value, so they fit exactly.

    python benchmarks/quantized_accuracy.py            # the table of docs/estimator.md (~2 minutes)
    python benchmarks/quantized_accuracy.py --quick    # a smaller grid
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from weibull_monitor.estimator import fit_weibull

NF4 = torch.tensor(
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
     0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
)  # fmt: skip


def _double_quantised(scales: torch.Tensor) -> torch.Tensor:
    """Block scales on an 8-bit grid per group of 256 scales (centred on the group mean), as QLoRA stores them."""
    flat = scales.reshape(-1)
    group = min(256, flat.numel())
    padded = torch.cat([flat, flat[: (-flat.numel()) % group]]).reshape(-1, group)
    mean = padded.mean(1, keepdim=True)
    spread = (padded - mean).abs().amax(1, keepdim=True).clamp(min=1e-12)
    grid = torch.round((padded - mean) / spread * 127) / 127 * spread + mean
    return grid.reshape(-1)[: flat.numel()].reshape(scales.shape)


def dequantised(weight: torch.Tensor, scheme: str, block: int, double: bool) -> torch.Tensor:
    """``weight`` quantised to 4 bits in blocks of ``block`` consecutive values and dequantised (float32)."""
    flat = weight.reshape(-1, block)
    if scheme == "asym":  # min/max with a zero point, 16 levels
        low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        scale = (high - low) / 15
        if double:
            scale = _double_quantised(scale)
        zero = torch.round(-low / scale)
        out = (torch.clamp(torch.round(flat / scale) + zero, 0, 15) - zero) * scale
    else:
        absmax = flat.abs().amax(1, keepdim=True)
        if double:
            absmax = _double_quantised(absmax)
        if scheme == "int4":
            out = torch.clamp(torch.round(flat / absmax * 7), -8, 7) / 7 * absmax
        else:  # nf4: the nearest of the 16 NormalFloat levels
            out = NF4[(flat / absmax)[..., None].sub(NF4).abs().argmin(-1)] * absmax
    return out.reshape(weight.shape)


def measure(shapes, seeds: int, blocks=(32, 64, 128)) -> list[dict]:
    rows = []
    for scheme, double, shape, dtype in itertools.product(
        ("int4", "nf4", "asym"), (False, True), shapes, (torch.float32, torch.float16)
    ):
        worst, worst_sigma = 0.0, 0.0
        for block, seed in itertools.product(blocks, range(seeds)):
            generator = torch.Generator().manual_seed(seed)
            weight = torch.randn(*shape, generator=generator) * 0.02
            values = dequantised(weight, scheme, block, double).to(dtype)
            histogram, exact = fit_weibull(values), fit_weibull(values, method="exact")
            assert histogram.ok and exact.ok, (scheme, shape, histogram.reason, exact.reason)
            error = abs(histogram.k - exact.k)
            worst = max(worst, error)
            worst_sigma = max(worst_sigma, error / exact.k_stderr)
        rows.append(
            {"scheme": scheme + ("+dq" if double else ""), "shape": shape, "dtype": str(dtype).split(".")[1],
             "worst_dk": worst, "worst_dk_in_stderr": worst_sigma}
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two sizes, two seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = ((64, 64), (512, 512)) if args.quick else ((64, 64), (128, 128), (256, 256), (512, 512), (2048, 1024))
    started = time.perf_counter()
    rows = measure(shapes, seeds=2 if args.quick else 6)
    print(f"{'scheme':<9} {'shape':<12} {'dtype':<8} {'worst |dk|':>11} {'in stderr of k':>15}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['scheme']:<9} {shape:<12} {r['dtype']:<8} {r['worst_dk']:>11.2e} {r['worst_dk_in_stderr']:>15.3f}")
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    for label, chosen in (("all sizes", fp32), ("from 256x256 up", [r for r in fp32 if r["shape"][0] >= 256])):
        if chosen:
            print(
                f"fp32, {label}: worst |dk| {max(r['worst_dk'] for r in chosen):.2e}, "
                f"worst {max(r['worst_dk_in_stderr'] for r in chosen):.3f} standard errors of k"
            )
    half = [r for r in rows if r["dtype"] != "float32"]
    print(f"fp16: worst |dk| {max(r['worst_dk'] for r in half):.1e}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
