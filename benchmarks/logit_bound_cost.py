"""Cost of the weights-only attention-logit bound (``weibull_monitor.snapshot.logit_bound``) per attention layer,
against one read pass of that layer's W_q and W_k (``torch.linalg.vector_norm``, the floor of any weight statistic).

    python benchmarks/logit_bound_cost.py [--threads 1] [--repeats 5]

LLaMA-shaped layers, fp32 on the CPU: hidden 128 (4 heads, as in the alert benchmark), 1024 (16 heads, 4 KV heads)
and 4096 (32 heads, 8 KV heads, LLaMA-2/3 7-8B). Prints the median over ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout: measure that checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.models import model_roles
from weibull_monitor.snapshot import collect_entries
from weibull_monitor.snapshot.logit_bound import attention_logit_bounds

SHAPES = ((128, 4, 4), (1024, 16, 4), (4096, 32, 8))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (LAPACK workspaces, allocator)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; per attention layer, median of {args.repeats}")
    print(f"{'hidden':>6} {'heads':>5} {'kv':>3} {'bound ms':>9} {'read W_q,W_k ms':>16} {'ratio':>6}")
    for hidden, heads, kv in SHAPES:
        model = tiny_llama(
            0, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads,
            num_key_value_heads=kv, vocab_size=256,
        )  # fmt: skip
        entries = collect_entries(model, model_roles(model), model.config)
        attn = model.model.layers[0].self_attn
        bound = _median_seconds(
            lambda m=model, e=entries: attention_logit_bounds(m, e, m.config), args.repeats
        )
        floor = _median_seconds(
            lambda a=attn: [torch.linalg.vector_norm(w.weight, 1) for w in (a.q_proj, a.k_proj)], args.repeats
        )
        print(
            f"{hidden:>6} {heads:>5} {kv:>3} {1e3 * bound:>9.2f} {1e3 * floor:>16.2f} {bound / floor:>6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
