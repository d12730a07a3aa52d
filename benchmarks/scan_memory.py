"""Peak memory of ``weibull-monitor scan`` on a >= 2 GB safetensors file, against the size of its largest tensor.

Writes a synthetic safetensors file (Gaussian fp32 and bf16 matrices with LLaMA-like names) into a temporary
directory, scans it in a fresh subprocess and prints that process's peak RSS beside the largest tensor's size and
beside the RSS of a process that only imports what the scan imports. The file is deleted afterwards.

Target: peak RSS <= largest tensor + 300 MB.

    python benchmarks/scan_memory.py [--gb 2.0] [--method histogram] [--dir /tmp] [--compare-safe-open]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MB = 1024 * 1024


def write_synthetic(path: Path, total_bytes: float, seed: int = 0) -> tuple[int, int]:
    """Write a LLaMA-shaped safetensors file of about ``total_bytes``; return (file size, largest tensor bytes).

    Tensors are written one at a time in 16 MB pieces, so writing needs no more memory than a piece.
    """
    hidden, inter = 4096, 11008
    layer = [
        ("self_attn.q_proj.weight", (hidden, hidden), "F32"),
        ("self_attn.k_proj.weight", (hidden // 4, hidden), "BF16"),
        ("self_attn.v_proj.weight", (hidden // 4, hidden), "BF16"),
        ("self_attn.o_proj.weight", (hidden, hidden), "F32"),
        ("mlp.gate_proj.weight", (inter, hidden), "BF16"),
        ("mlp.up_proj.weight", (inter, hidden), "BF16"),
        ("mlp.down_proj.weight", (hidden, inter), "F32"),
        ("input_layernorm.weight", (hidden,), "F32"),
    ]
    itemsize = {"F32": 4, "BF16": 2}
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16}
    entries: list[tuple[str, tuple[int, ...], str]] = []
    size = 0
    index = 0
    while size < total_bytes:
        for suffix, shape, code in layer:
            entries.append((f"model.layers.{index}.{suffix}", shape, code))
            size += itemsize[code] * int(torch.tensor(shape).prod())
        index += 1
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, code in entries:
        nbytes = itemsize[code] * int(torch.tensor(shape).prod())
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(seed)
    largest = 0
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for _name, shape, code in entries:
            numel = int(torch.tensor(shape).prod())
            largest = max(largest, numel * itemsize[code])
            piece = 4 * MB
            std = 0.02 if len(shape) == 2 else 1.0
            for start in range(0, numel, piece):
                count = min(piece, numel - start)
                values = (torch.randn(count, generator=generator) * std).to(dtypes[code])
                handle.write(values.view(torch.uint8).numpy().tobytes())
    return path.stat().st_size, largest


def peak_rss_of(command: list[str]) -> tuple[float, float, int]:
    """Run ``command`` in a subprocess; return (its peak RSS in MB, wall seconds, exit status)."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"rc = subprocess.run({command!r}, stdout=subprocess.DEVNULL).returncode; "
        "w = time.perf_counter() - t; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, w, rc)"
    )
    # A wrapper process per measurement: RUSAGE_CHILDREN then covers exactly one scan.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]) / 1024, float(out[1]), int(out[2])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gb", type=float, default=2.0, help="size of the synthetic file in GiB (>= 2 for the issue)"
    )
    parser.add_argument("--method", default="histogram", choices=("histogram", "exact"))
    parser.add_argument(
        "--compare-safe-open",
        action="store_true",
        help="also measure a safetensors.safe_open get_tensor loop",
    )
    parser.add_argument(
        "--dir", default=None, help="where to write the temporary file (default: the system temp dir)"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="weibull_scan_memory_", dir=args.dir))
    try:
        path = workdir / "model.safetensors"
        started = time.perf_counter()
        file_size, largest = write_synthetic(path, args.gb * 1024 * MB)
        print(f"wrote {path} ({file_size / MB:.0f} MB) in {time.perf_counter() - started:.0f} s")
        env_python = [sys.executable, "-c"]
        baseline_mb, _, _ = peak_rss_of(
            [
                *env_python,
                "import torch, weibull_monitor.cli, weibull_monitor.offline.scan, weibull_monitor.estimator, weibull_monitor.models",
            ]
        )
        scan_mb, wall, status = peak_rss_of(
            [
                sys.executable,
                "-m",
                "weibull_monitor.cli",
                "scan",
                str(path),
                "--json",
                "--no-progress",
                "--method",
                args.method,
            ]
        )
        if status != 0:
            raise SystemExit(f"scan exited with status {status}")
        largest_mb = largest / MB
        print(f"file size                  {file_size / MB:9.0f} MB")
        print(f"largest tensor             {largest_mb:9.0f} MB")
        print(f"peak RSS, imports only     {baseline_mb:9.0f} MB")
        print(f"peak RSS, scan ({args.method:9s})  {scan_mb:9.0f} MB   ({wall:.1f} s)")
        print(f"scan peak - largest tensor {scan_mb - largest_mb:9.0f} MB   (target <= 300 MB)")
        print(
            f"scan peak - imports        {scan_mb - baseline_mb:9.0f} MB   = {(scan_mb - baseline_mb) / largest_mb:.2f} x largest tensor"
        )
        print(f"scan peak / file size      {scan_mb / (file_size / MB):9.2f}")
        print("PASS" if scan_mb <= largest_mb + 300 else "FAIL", "(peak RSS <= largest tensor + 300 MB)")
        if args.compare_safe_open:
            # The same fits through safetensors.safe_open(...).get_tensor (one tensor at a time): the reason the
            # loader maps the file itself.
            loop = (
                "import sys; from safetensors import safe_open; from weibull_monitor.estimator import fit_weibull\n"
                "with safe_open(sys.argv[1], 'pt') as f:\n"
                "    for name in f.keys():\n"
                "        t = f.get_tensor(name)\n"
                "        fit_weibull(t, method=sys.argv[2]) if t.dim() == 2 else None\n"
                "        del t\n"
            )
            other_mb, other_wall, status = peak_rss_of([sys.executable, "-c", loop, str(path), args.method])
            print(f"peak RSS, safe_open loop   {other_mb:9.0f} MB   ({other_wall:.1f} s, status {status})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
