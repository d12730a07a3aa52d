"""One rank of the sharded-collection checks (run on 2 gloo CPU processes by tests/test_distributed.py).

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python shard_checks.py OUT_DIR
Writes OUT_DIR/rank<r>.json: for every check, the distributed fits and the single-process fits of the same full
weights (computed on this rank before sharding), plus the sorted values each split share covers. The test compares
them; this script asserts nothing itself so that every difference shows up in the test's message.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(int(os.environ.get("WEIBULL_TEST_THREADS", "1")))  # conftest.py: 1 unless asked


def fit_row(fit) -> list:
    return [
        fit.k,
        fit.scale,
        fit.r2,
        fit.n,
        fit.n_zero,
        fit.n_nonfinite,
        bool(fit.ok),
        fit.reason,
        fit.method,
        # The remaining fields as exact reprs (nan included), so that ranks comparing rows compare every bit of
        # what crossed between them (the fits travel as a float64 table).
        *(
            repr(getattr(fit, field))
            for field in ("k_stderr", "scale_rel_stderr", "q10", "q50", "q90", "q99", "q999")
        ),
    ]


def fits_json(fits) -> dict:
    return {key: fit_row(fit) for key, fit in fits.items()}


def entries_for(model, config, shadow=None, role_map=None):
    """Matrix entries the way the monitor builds them: the parameter, plus split views of fused parameters.

    ``shadow`` maps a parameter name to a stand-in object to use instead of the model's parameter (ZeRO-3 checks);
    ``role_map`` replaces ``roles.model_roles(model)`` (a ZeRO-3 model's parameters have empty local shapes).
    """
    from weibull_monitor import distributed
    from weibull_monitor import models as roles
    from weibull_monitor.snapshot import entries_for as entries_of_param

    params = dict(model.named_parameters())
    entries = []
    for name, role in (role_map or roles.model_roles(model)).items():
        tensor = shadow[name] if shadow and name in shadow else params[name]
        entries += entries_of_param(name, distributed.matrix_of(tensor), role, config)
    return entries


def fit_entries(entries, method="histogram"):
    """The collective fit of a list of entries (what the monitor calls at every snapshot)."""
    from weibull_monitor import distributed

    return distributed.fit_matrices([e.key for e in entries], [e.matrix for e in entries], method)


def kind_of(entry) -> str:
    """How an entry's matrix is read: replicated, sharded, or a split part of a sharded parameter."""
    from weibull_monitor import distributed

    return {
        distributed.LocalMatrix: "replicated",
        distributed.ShardedMatrix: "sharded",
        distributed.ShardedView: "split",
    }[type(entry.matrix)]


def reference_fits(model, config, method="histogram"):
    """Single-process fits of the full weights (plain tensors: no process group is consulted)."""
    from weibull_monitor import models as roles
    from weibull_monitor.estimator import fit_many

    named = []
    params = dict(model.named_parameters())
    for name, role in roles.model_roles(model).items():
        weight = params[name].detach()
        named.append((name, weight))
        if roles.fused_components(role):
            for component, view in roles.split_fused(name, weight, config, as_matrix=False).items():
                named.append((roles.split_key(name, component), view))
    return dict(fit_many(named, method=method)), dict(named)


def gathered_share_values(entries) -> dict:
    """For split entries: every rank's share values, gathered here for the test only (sorted lists)."""

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {}
    for entry in entries:
        if entry.component is None:
            continue
        pieces = entry.matrix.local_pieces(0, rank)
        values = torch.cat([p.reshape(-1).float() for p in pieces]) if pieces else torch.empty(0)
        mine[entry.key] = values.tolist()
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    merged = {}
    for part in everyone:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return {key: sorted(values) for key, values in merged.items()}


def zero3_standin(weight: torch.Tensor, rank: int, world: int) -> torch.nn.Parameter:
    """A parameter laid out like DeepSpeed ZeRO-3 partitions it (same attribute names), padding poisoned."""
    flat = weight.detach().reshape(-1)
    numel = flat.numel()
    size = -(-numel // world)
    part = torch.full((size,), 1.0e6, dtype=weight.dtype)  # padding past ds_numel must never be counted
    start = rank * size
    valid = max(0, min(size, numel - start))
    part[:valid] = flat[start : start + valid]
    param = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    part.ds_numel = size
    param.ds_tensor = part
    param.ds_numel = numel
    param.ds_shape = tuple(weight.shape)
    param.ds_status = "NOT_AVAILABLE"
    param.ds_process_group = None
    return param


def reference_fits_of(named):
    from weibull_monitor.estimator import fit_many

    return dict(fit_many(named, method="histogram"))


def check_ddp(out: dict) -> None:
    from weibull_monitor.demos.toy import tiny_llama

    model = tiny_llama(
        seed=1, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2
    )
    reference, _ = reference_fits(model, model.config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    entries = entries_for(ddp.module, model.config)
    out["ddp"] = {
        "dist": fits_json(fit_entries(entries, "histogram")),
        "ref": fits_json(reference),
    }
    exact_ref, _ = reference_fits(model, model.config, method="exact")
    out["ddp_exact"] = {
        "dist": fits_json(fit_entries(entries, "exact")),
        "ref": fits_json(exact_ref),
    }
    # A fit that is not ok (an all-zero matrix) among ok ones: it crosses as an object, the others as table rows.
    from weibull_monitor.distributed import LocalMatrix
    from weibull_monitor.models import Role
    from weibull_monitor.snapshot import MatrixEntry

    zeros = torch.zeros(64, 64)
    other = Role(layer=None, component="other", klass="other")
    mixed = [*entries, MatrixEntry("all_zero", "all_zero", LocalMatrix(zeros), other)]
    mixed_ref = dict(reference)
    mixed_ref["all_zero"] = reference_fits_of([("all_zero", zeros)])["all_zero"]
    out["ddp_mixed"] = {
        "dist": fits_json(fit_entries(mixed, "histogram")),
        "ref": fits_json(mixed_ref),
    }
    # Which rank histogrammed what: each rank should carry about half of the elements.
    from weibull_monitor.distributed.collective import deal_owners

    sizes = [e.matrix.numel for e in entries]
    owners = deal_owners(sizes, dist.get_world_size())
    out["ddp_load"] = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(dist.get_world_size())]
    # A local failure on one rank only (fault injected into rank 1's histogram engine for one matrix it owns):
    # that matrix is skipped with the reason on both ranks, the others are fitted, nothing hangs.
    from weibull_monitor.estimator.histogram import runtime

    victim = next(i for i, owner in enumerate(owners) if owner == 1)
    real_batch = runtime.count_batch  # the engine call the distributed path makes

    def failing_batch(tensors, out=None):
        target = entries[victim].matrix.tensor
        if dist.get_rank() == 1 and any(
            t.data_ptr() == target.data_ptr() and t.shape == target.shape for t in tensors
        ):
            raise RuntimeError("injected fault")
        return real_batch(tensors, out)

    runtime.count_batch = failing_batch
    try:
        out["local_failure"] = {
            "victim": entries[victim].key,
            "fits": fits_json(fit_entries(entries, "histogram")),
            "ref": fits_json(reference),
        }
    finally:
        runtime.count_batch = real_batch
    # Mismatched entry lists: a clean not-ok result on every rank, not a hang.
    short = entries[:-1] if dist.get_rank() == 1 else entries
    out["mismatch"] = fits_json(fit_entries(short, "histogram"))


MANY_SMALL = 2000  # 16x16 matrices: a full-width count table would need 256 KB x 2000 = 500 MiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check_many_small(out: dict) -> None:
    """Many small matrices under DDP: the fits, and this rank's peak RSS growth during fit_matrices.

    The peak is the larger of a 1 ms RSS sampler and the kernel's high-water mark (ru_maxrss) when the call raised
    it: a lower bound of what the call really needed, never more. Run early, before other checks raise the mark.
    """
    import gc
    import resource
    import threading

    from weibull_monitor.distributed import LocalMatrix
    from weibull_monitor.estimator import fit_many
    from weibull_monitor.models import Role
    from weibull_monitor.snapshot import MatrixEntry

    generator = torch.Generator().manual_seed(7)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList(
        torch.nn.Parameter(torch.randn(16, 16, generator=generator) * 0.02) for _ in range(MANY_SMALL)
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    named = [(name, param.detach()) for name, param in ddp.module.named_parameters()]
    reference = fit_many(named)
    role = Role(layer=None, component="other", klass="other")  # fit_matrices never reads the role
    entries = [
        MatrixEntry(name, name, LocalMatrix(param), role) for name, param in ddp.module.named_parameters()
    ]

    gc.collect()
    before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fits = fit_entries(entries, "histogram")
    finally:
        done.set()
        sampler.join()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    high_water = maxrss_after if maxrss_after > maxrss_before else 0
    out["many_small"] = {"dist": fits_json(fits), "ref": fits_json(reference)}
    out["many_small_memory"] = {
        "matrices": MANY_SMALL,
        "peak_extra_bytes": max(peak[0], high_water) - before,
        "full_width_bytes": MANY_SMALL * 8 * 32770,
    }


def check_fsdp2(out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    from weibull_monitor.demos.toy import tiny_llama

    model = tiny_llama(
        seed=2, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2
    )
    reference, _ = reference_fits(model, model.config)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    entries = entries_for(model, model.config)
    out["fsdp2_llama_kinds"] = sorted({kind_of(e) for e in entries})
    out["fsdp2_llama"] = {
        "dist": fits_json(fit_entries(entries, "histogram")),
        "ref": fits_json(reference),
    }


def fused_models():
    # Imported before DeepSpeed can patch tensor creation (transformers' import fails inside zero.Init).
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(3)
    # 3 heads of 32: rows 288, the shard boundary (row 144) falls inside head 1's K block.
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=256,
            hidden_size=96,
            num_attention_heads=3,
            num_hidden_layers=1,
            intermediate_size=192,
            max_position_embeddings=64,
        )
    )
    torch.manual_seed(4)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=96, n_head=3, n_layer=1, n_positions=64))
    return {"neox": neox, "gpt2": gpt2}


def check_fused_fsdp2(out: dict) -> None:
    from torch.distributed.fsdp import fully_shard


    for name, model in fused_models().items():
        reference, full = reference_fits(model, model.config)
        fully_shard(model)
        entries = entries_for(model, model.config)
        out[f"fsdp2_{name}"] = {
            "dist": fits_json(fit_entries(entries, "histogram")),
            "ref": fits_json(reference),
        }
        values = gathered_share_values(entries)
        out[f"fsdp2_{name}_values"] = {
            key: [values[key] == sorted(full[key].reshape(-1).float().tolist()), len(values[key])]
            for key in values
        }


def check_monitor_fsdp2(out: dict) -> None:
    """The user path: WeibullMonitor on an FSDP2 model with a fused QKV (collect_entries -> split parts ->
    fit_matrices); rank 0 writes the store, rank 1 writes nothing."""
    from torch.distributed.fsdp import fully_shard

    from weibull_monitor.monitor import WeibullMonitor

    rank = dist.get_rank()
    model = fused_models()["neox"]
    reference, _ = reference_fits(model, model.config)
    for layer in model.gpt_neox.layers:
        fully_shard(layer)
    fully_shard(model)
    store = str(Path(sys.argv[1]) / "monitor_fsdp2.sqlite") if rank == 0 else None
    with WeibullMonitor(model, every=1, store=store, writer=rank == 0) as monitor:
        snapshot = monitor.snapshot(0)
    out["monitor_fsdp2"] = {"dist": fits_json(snapshot.fits), "ref": fits_json(reference)}


def check_dtensor_placements(out: dict) -> None:
    """Tensor-parallel style placements on the fused weights: Shard(1) (columns), Replicate (counted once), and a
    2-D mesh (1, 2) with (Shard(0), Replicate()) as in HSDP layouts (replicas must not be counted twice)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from weibull_monitor import distributed
    from weibull_monitor import models as roles
    from weibull_monitor.snapshot import entries_for as entries_of_param

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # Shard over a mesh dimension of size 1, replicate over the 2 ranks: only coordinate 0 may count.
    mesh2d = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("shard", "replicate"))
    layouts = {
        "shard_cols": (mesh, [Shard(1)]),
        "replicate": (mesh, [Replicate()]),
        "mesh2d": (mesh2d, [Shard(0), Replicate()]),
    }
    for model_name, model in fused_models().items():
        reference, _ = reference_fits(model, model.config)
        role_map = roles.model_roles(model)
        params = dict(model.named_parameters())
        for layout, (device_mesh, placements) in layouts.items():
            entries = []
            for name, role in role_map.items():
                tensor = distribute_tensor(params[name].detach(), device_mesh, placements)
                entries += entries_of_param(name, distributed.matrix_of(tensor), role, model.config)
            out[f"dtensor_{layout}_{model_name}"] = {
                "dist": fits_json(fit_entries(entries, "histogram")),
                "ref": fits_json(reference),
            }


def check_zero3_standin(out: dict) -> None:

    rank, world = dist.get_rank(), dist.get_world_size()
    for name, model in fused_models().items():
        reference, full = reference_fits(model, model.config)
        shadow = {n: zero3_standin(p, rank, world) for n, p in model.named_parameters() if p.dim() == 2}
        entries = entries_for(model, model.config, shadow)
        out[f"zero3_{name}"] = {
            "dist": fits_json(fit_entries(entries, "histogram")),
            "ref": fits_json(reference),
        }
        values = gathered_share_values(entries)
        out[f"zero3_{name}_values"] = {
            key: [values[key] == sorted(full[key].reshape(-1).float().tolist()), len(values[key])]
            for key in values
        }


def check_zero3_deepspeed(out: dict) -> None:
    """Real DeepSpeed ZeRO-3 partitions (CPU accelerator, gloo), before and after one optimizer step."""
    try:
        import deepspeed
    except ImportError as error:
        out["deepspeed"] = f"unavailable: {error}"
        return
    from weibull_monitor import distributed
    from weibull_monitor import models as roles
    from weibull_monitor.estimator import fit_many

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the process group already up
    out["deepspeed"] = deepspeed.__version__
    for name, model in fused_models().items():
        role_map = roles.model_roles(model)
        reference, _ = reference_fits(model, model.config)
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        params = dict(engine.module.named_parameters())
        out[f"ds_{name}_partitioned"] = all(distributed.is_sharded(params[n]) for n in role_map)
        entries = entries_for(engine.module, model.config, shadow=params, role_map=role_map)
        out[f"ds_{name}"] = {
            "dist": fits_json(fit_entries(entries, "histogram")),
            "ref": fits_json(reference),
        }
        if name == "neox":  # the user path: WeibullMonitor on the ZeRO-3 model (rank 0 would write)
            from weibull_monitor.monitor import WeibullMonitor

            with WeibullMonitor(engine.module, every=1, store=None, writer=dist.get_rank() == 0) as monitor:
                out["ds_monitor_neox"] = {
                    "dist": fits_json(monitor.snapshot(0).fits),
                    "ref": fits_json(reference),
                }
        ids = torch.arange(32).reshape(1, 32) % 256
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        after = fit_entries(entries, "histogram")
        # The reference after the step needs the full weights: gathered here in the test, never by the library.
        named = []
        with deepspeed.zero.GatheredParameters([params[n] for n in role_map]):
            for n, role in role_map.items():
                full = params[n].detach().clone()
                named.append((n, full))
                if roles.fused_components(role):
                    for component, view in roles.split_fused(n, full, model.config, as_matrix=False).items():
                        named.append((roles.split_key(n, component), view))
        out[f"ds_{name}_after_step"] = {"dist": fits_json(after), "ref": fits_json(dict(fit_many(named)))}


def check_fsdp1(out: dict) -> None:
    """FSDP1 with use_orig_params=True: the attention module wrapped on its own (its flat shard boundary falls
    inside the fused QKV weight), then the root; parameters registered with distributed.register_fsdp1."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from weibull_monitor import distributed
    from weibull_monitor import models as roles

    for name, model in fused_models().items():
        role_map = roles.model_roles(model)
        reference, full = reference_fits(model, model.config)
        if name == "neox":
            model.gpt_neox.layers[0].attention = FSDP(
                model.gpt_neox.layers[0].attention, use_orig_params=True, device_id=torch.device("cpu")
            )
        else:
            model.transformer.h[0].attn = FSDP(
                model.transformer.h[0].attn, use_orig_params=True, device_id=torch.device("cpu")
            )
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        out[f"fsdp1_{name}_registered"] = distributed.register_fsdp1(wrapped)
        params = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in wrapped.named_parameters()}
        out[f"fsdp1_{name}_kinds"] = sorted({type(distributed.matrix_of(params[n])).__name__ for n in role_map})
        entries = entries_for(model, model.config, shadow=params, role_map=role_map)
        out[f"fsdp1_{name}"] = {
            "dist": fits_json(fit_entries(entries, "histogram")),
            "ref": fits_json(reference),
        }
        values = gathered_share_values(entries)
        out[f"fsdp1_{name}_values"] = {
            key: [values[key] == sorted(full[key].reshape(-1).float().tolist()), len(values[key])]
            for key in values
        }


def check_agree(out: dict) -> None:
    from weibull_monitor import distributed

    rank = dist.get_rank()
    out["agree"] = [distributed.agree(rank == 1), distributed.agree(False), distributed.agree(True)]


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"world": dist.get_world_size()}
    errors = {}
    timing = {}
    for check in (
        check_agree,
        check_many_small,  # early: its memory check reads the process's high-water mark
        check_ddp,
        check_fsdp2,
        check_fused_fsdp2,
        check_dtensor_placements,
        check_zero3_standin,
        check_fsdp1,
        check_monitor_fsdp2,
        check_zero3_deepspeed,
    ):
        start = time.perf_counter()
        try:
            check(out)
        except Exception:
            errors[check.__name__] = traceback.format_exc()
        dist.barrier()
        timing[check.__name__] = round(time.perf_counter() - start, 2)
    out["errors"] = errors
    out["timing_s"] = timing
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
