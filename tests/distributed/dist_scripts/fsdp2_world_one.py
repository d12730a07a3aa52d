"""FSDP2 ``fully_shard`` with a world of one process (a common single-GPU or debugging setup): every matrix is a
DTensor whose local shard holds all of it. The monitor must fit all of them, equal to the fits of the same weights
unsharded (issue 19: 0 of 16 were fitted, all skipped as "tensor subclass DTensor is not read directly").

Writes ``result.json`` into the folder given as argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from weibull_monitor import WeibullMonitor, fit_many

    dist.init_process_group("gloo")
    assert dist.get_world_size() == 1
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    plain = {name: p.detach().clone() for name, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    monitor = WeibullMonitor(model, store=None, every=1)
    snapshot = monitor.observe(0)
    reference = fit_many({key: plain[key] for key in snapshot.fits})
    result = {
        "parameter_types": kinds,
        "matrices": len(snapshot.fits),
        "ok": sum(1 for fit in snapshot.fits.values() if fit.ok),
        "skipped": dict(snapshot.skipped),
        "aggregates": len(snapshot.aggregates),
        "max_dk": max(abs(snapshot.fits[k].k - reference[k].k) for k in snapshot.fits),
        "max_dscale": max(abs(snapshot.fits[k].scale / reference[k].scale - 1) for k in snapshot.fits),
        "logit_bounds": len(snapshot.logit_bounds),
        "logit_bounds_skipped": {str(layer): reason for layer, reason in snapshot.logit_bounds_skipped.items()},
    }
    (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
