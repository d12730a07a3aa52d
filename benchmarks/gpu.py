"""GPU: a snapshot of a 7B-shaped bf16 model on CUDA against the HBM read floor, and its fits against CPU fits.

Prepared to run in one command on a CUDA machine (nothing is downloaded; the model is built from a LLaMA config
with random Gaussian weights directly on the device, ~13.5 GB of bf16):

    python benchmarks/gpu.py                      # 7B-shaped (hidden 4096, 32 layers), 5 repeats
    python benchmarks/gpu.py --params 1e9 --hidden 2048 --repeats 3
    python benchmarks/gpu.py --device cpu --params 2e7 --hidden 256   # a dry run of the script on a CPU

Prints, medians over interleaved repeats: the read floor of ``benchmarks/floor.py`` over the matrices the snapshot
reads (fastest of ``vector_norm(m, 2)``, ``m.sum()``, a copy into a preallocated buffer, each bracketed by
``torch.cuda.synchronize``), ``WeibullMonitor.snapshot`` (no store, no sinks), their ratio (target <= 2), and the
largest |Δk| and |Δλ|/λ between the device fits and CPU fits of the same matrices (bf16: expected ~1e-12).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from floor import ReadFloor, timed_ms  # sibling script (benchmarks/ is on sys.path when run)


def build(params: float, hidden: int, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from weibull_monitor.demos.toy import llama_config_with_params

    config = llama_config_with_params(
        params, hidden_size=hidden, num_key_value_heads=hidden // 128, vocab_size=32000
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=6.5e9)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compare", type=int, default=24, help="matrices whose fits are compared with CPU fits")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.monitor import WeibullMonitor
    from weibull_monitor.snapshot import collect_entries

    started = time.perf_counter()
    model = build(args.params, args.hidden, device)
    monitor = WeibullMonitor(model, None, every=10**9, store=None, rules=[])
    entries = collect_entries(model, monitor.roles, model.config)
    tensors = [e.matrix.tensor.detach() for e in entries]
    floor = ReadFloor(tensors)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name}: {len(tensors)} matrices, {floor.nbytes / 1e9:.2f} GB of bf16, built in "
        f"{time.perf_counter() - started:.0f} s"
    )
    step = 0

    def snapshot() -> object:
        nonlocal step
        step += 1
        return monitor.snapshot(step)

    floor.time_once(), snapshot()  # warm-up: kernels, code tables, allocator
    floor.times = {k: [] for k in floor.times}
    snap_ms = []
    for _ in range(args.repeats):
        floor.time_once()
        snap_ms.append(timed_ms(snapshot, device))
    last = monitor.last_snapshot
    for pass_name, ms in floor.medians().items():
        print(f"  {pass_name:>5} pass: {ms:8.1f} ms ({floor.nbytes / 1e9 / (ms / 1e3):7.1f} GB/s)")
    base, snap = floor.floor_ms(), statistics.median(snap_ms)
    print(f"  floor ({floor.fastest()}): {base:.1f} ms; snapshot: {snap:.1f} ms; snapshot / floor = {snap / base:.2f}")
    chosen = entries[:: max(1, len(entries) // args.compare)][: args.compare]
    on_cpu = fit_many([(e.key, e.matrix.tensor.detach().cpu()) for e in chosen])
    dk = max(abs(last.fits[e.key].k - on_cpu[e.key].k) for e in chosen)
    dl = max(abs(last.fits[e.key].scale / on_cpu[e.key].scale - 1) for e in chosen)
    print(f"  device fits vs CPU fits over {len(chosen)} matrices: max |dk| {dk:.2e}, max |dλ|/λ {dl:.2e}")
    monitor.close()


if __name__ == "__main__":
    main()
