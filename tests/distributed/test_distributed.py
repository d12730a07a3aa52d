"""Shard-aware snapshots on real torch.distributed gloo processes (2 CPU ranks).

Start-up dominates, so each spawned job runs several checks (tests/distributed/dist_scripts/*.py) and writes JSON that the
tests below read. Every job has a hard timeout: a hung collective fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "dist_scripts"
K_TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    script: str, out_dir: Path, world: int = 2, timeout: float = 150.0, args: tuple[str, ...] = ()
) -> None:
    """Run ``world`` ranks of a script as plain processes (env:// rendezvous), fail on error or timeout."""
    port = free_port()
    procs = []
    logs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / script), str(out_dir), *args], env=env, stdout=log, stderr=log
            )
        )
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{script} timed out after {timeout} s:\n{_tails(out_dir, world)}")
    finally:
        for log in logs:
            log.close()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        pytest.fail(f"{script} ranks exited with {codes}:\n{_tails(out_dir, world)}")


def run_job(cmd: list[str], log_path: Path, timeout: float, port: int) -> str | None:
    """Run a launcher (torchrun, or a script whose framework starts the other ranks) in its own process group,
    killed whole on timeout. Returns None on success, else what went wrong with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout} s:\n{log_path.read_text()[-6000:]}"
    if proc.returncode:
        return f"exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}"
    return None


def _tails(out_dir: Path, world: int) -> str:
    return "\n".join(
        f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-3000:]
        for r in range(world)
        if (out_dir / f"rank{r}.log").exists()
    )


@pytest.fixture(scope="module")
def shard_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("shards")
    launch("shard_checks.py", out_dir)
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["errors"] == {}, "\n".join(result["errors"].values())
    return results


def assert_same_fits(check: dict, tolerance: float = K_TOLERANCE) -> None:
    """Distributed fits equal the single-process fits of the same full weights, key for key."""
    dist_fits, ref_fits = check["dist"], check["ref"]
    assert set(dist_fits) == set(ref_fits)
    assert len(dist_fits) > 0
    for key, ref in ref_fits.items():
        got = dist_fits[key]
        assert got[6] == ref[6] is True, (key, got, ref)
        assert got[3:6] == ref[3:6], (key, "element counts differ", got, ref)
        assert abs(got[0] - ref[0]) <= tolerance, (key, got[0], ref[0])
        assert math.isclose(got[1], ref[1], rel_tol=1e-9), (key, got[1], ref[1])
        assert math.isclose(got[2], ref[2], rel_tol=1e-9, abs_tol=1e-12), (key, got[2], ref[2])


def assert_same_extra_fields(check: dict) -> None:
    """Standard errors and quantiles (exact reprs in the rows) equal the single-process ones too."""
    for key, ref in check["ref"].items():
        for got_field, ref_field in zip(check["dist"][key][9:], ref[9:]):
            got_value, ref_value = float(got_field), float(ref_field)
            assert (math.isnan(got_value) and math.isnan(ref_value)) or math.isclose(
                got_value, ref_value, rel_tol=1e-9, abs_tol=1e-15
            ), (key, got_field, ref_field)


def assert_identical_on_ranks(results: list[dict], name: str) -> None:
    assert results[0][name]["dist"] == results[1][name]["dist"], f"{name}: fits differ between ranks"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    [
        "ddp",
        "ddp_exact",
        "fsdp2_llama",
        "fsdp2_neox",
        "fsdp2_gpt2",
        "zero3_neox",
        "zero3_gpt2",
        "fsdp1_neox",
        "fsdp1_gpt2",
        "monitor_fsdp2",
        "dtensor_shard_cols_neox",
        "dtensor_shard_cols_gpt2",
        "dtensor_replicate_neox",
        "dtensor_replicate_gpt2",
        "dtensor_mesh2d_neox",
        "dtensor_mesh2d_gpt2",
    ],
)
def test_distributed_fits_equal_single_process_fits(shard_results, name):
    for result in shard_results:
        assert_same_fits(result[name])
        assert_same_extra_fields(result[name])
    assert_identical_on_ranks(shard_results, name)


@pytest.mark.distributed
def test_a_fit_that_is_not_ok_crosses_ranks_with_the_ok_ones(shard_results):
    # ok histogram fits are shared as float64 table rows, a not-ok fit (all-zero matrix) as an object: every rank
    # must hold both, equal to the single-process fits, field for field.
    for result in shard_results:
        check = result["ddp_mixed"]
        zero, ref = check["dist"]["all_zero"], check["ref"]["all_zero"]
        assert zero[6] is False and zero[7] == ref[7] and zero[3:6] == ref[3:6], (zero, ref)
        assert_same_fits(
            {key: {k: v for k, v in part.items() if k != "all_zero"} for key, part in check.items()}
        )
        assert_same_extra_fields(check)
    assert_identical_on_ranks(shard_results, "ddp_mixed")


@pytest.mark.distributed
def test_many_small_matrices_fit_right_without_a_full_width_table_per_rank(shard_results):
    # 2,000 16x16 matrices under DDP: the fits equal the single-process fits, and no rank ever builds the
    # 256 KB-per-matrix count table (500 MiB here): the counts are cut to their used codes and fitted in slices.
    # Measured peak growth per rank: ~44 MB with int32 counts and the all-to-all (the [M, span] buffer sent, gloo's
    # copy, the one received); ~110-135 MB with int64 counts and the reduce-scatter; the full-width code before the
    # cut-and-slice fix grew ~375 MB, over the bound.
    for result in shard_results:
        assert_same_fits(result["many_small"])
        assert len(result["many_small"]["dist"]) == result["many_small_memory"]["matrices"]
        memory = result["many_small_memory"]
        assert memory["peak_extra_bytes"] < memory["full_width_bytes"] / 3, memory
    assert_identical_on_ranks(shard_results, "many_small")


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    [
        "ds_neox",
        "ds_gpt2",
        pytest.param("ds_neox_after_step", marks=pytest.mark.trains),  # one optimizer step
        pytest.param("ds_gpt2_after_step", marks=pytest.mark.trains),
    ],
)
def test_deepspeed_zero3_partitions_give_the_single_process_fits(shard_results, name):
    # Real DeepSpeed ZeRO-3 (CPU accelerator, gloo): fits read from the ds_tensor partitions, before and after a
    # training step, equal the fits of the full weights. DeepSpeed is optional (not in the package's extras).
    if str(shard_results[0]["deepspeed"]).startswith("unavailable"):
        pytest.skip(f"DeepSpeed {shard_results[0]['deepspeed']}: only the stand-in partitions were checked")
    base = name.removesuffix("_after_step")
    assert shard_results[0][f"{base}_partitioned"] is True  # every matrix really was a ZeRO-3 partition
    for result in shard_results:
        assert_same_fits(result[name])
    assert_identical_on_ranks(shard_results, name)


@pytest.mark.distributed
def test_weibull_monitor_on_a_deepspeed_zero3_model(shard_results):
    if str(shard_results[0]["deepspeed"]).startswith("unavailable"):
        pytest.skip(f"DeepSpeed {shard_results[0]['deepspeed']}")
    for result in shard_results:
        assert_same_fits(result["ds_monitor_neox"])


@pytest.mark.distributed
def test_fsdp_parameters_are_read_as_shards(shard_results):
    # Every matrix under fully_shard (DTensor) or registered FSDP1 is read shard by shard, none as "replicated".
    for name in ("fsdp2_llama", "fsdp1_neox", "fsdp1_gpt2"):
        expected = ["ShardedMatrix"] if name.startswith("fsdp1") else ["sharded"]
        assert shard_results[0][f"{name}_kinds"] == expected, name
    assert shard_results[0]["fsdp1_neox_registered"] > 0


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["fsdp2_neox", "fsdp2_gpt2", "zero3_neox", "zero3_gpt2", "fsdp1_neox", "fsdp1_gpt2"]
)
def test_split_views_of_shards_cover_exactly_the_component(shard_results, name):
    # The union over ranks of each split view's local slices is exactly the component's elements (as a multiset).
    values = shard_results[0][f"{name}_values"]
    assert values, "no split views were checked"
    for key, (equal, count) in values.items():
        assert equal, f"{key}: the shares of the ranks are not exactly the component ({count} values)"
        assert count > 0


@pytest.mark.distributed
def test_ddp_splits_the_elements_between_ranks(shard_results):
    load = shard_results[0]["ddp_load"]
    assert min(load) > 0.4 * sum(load), load


@pytest.mark.distributed
def test_mismatched_entry_lists_give_a_recorded_skip_not_a_hang(shard_results):
    for result in shard_results:
        fits = result["mismatch"]
        assert fits and all(row[6] is False and "different" in row[7] for row in fits.values())


@pytest.mark.distributed
def test_a_failure_on_one_rank_is_an_agreed_skip_not_a_hang(shard_results):
    for result in shard_results:
        failure = result["local_failure"]
        victim = failure["victim"]
        ok, reason = failure["fits"][victim][6:8]
        assert ok is False and "could not be read or counted on some rank" in reason, reason
        others = {k: v for k, v in failure["fits"].items() if k != victim}
        assert others and all(row[6] for row in others.values())
        assert all(others[k][:6] == failure["ref"][k][:6] for k in others)
    assert shard_results[0]["local_failure"]["fits"] == shard_results[1]["local_failure"]["fits"]


@pytest.mark.distributed
def test_agree_is_a_logical_or_over_ranks(shard_results):
    for result in shard_results:
        assert result["agree"] == [True, False, True]


# --- HF Trainer and Lightning under DDP (torchrun, gloo, CPU) -----------------------------------------------------


def framework_job(out_dir: Path, framework: str) -> tuple[list[dict], str | None]:
    script = [str(SCRIPTS / "frameworks_ddp.py"), str(out_dir), framework]
    port = free_port()
    if framework == "hf":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), *script]
    else:  # Lightning starts the second rank itself, as it does for a user's `python train.py`
        cmd = [sys.executable, *script]
    problem = run_job(cmd, out_dir / f"{framework}.log", timeout=150, port=port)
    results = []
    for rank in range(2):
        path = out_dir / f"{framework}_rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"errors": {}})
    return results, problem


@pytest.fixture(scope="module")
def framework_results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("frameworks")
    jobs = {framework: framework_job(out_dir, framework) for framework in ("hf", "lit")}
    return {"dir": out_dir, "jobs": jobs}


def results_of(framework_results: dict, name: str) -> list[dict]:
    results, problem = framework_results["jobs"][name.split("_")[0]]
    for result in results:
        assert name in result, f"no result for {name}: the job {problem}"
        assert name not in result["errors"], result["errors"][name]
    return [result[name] for result in results]


def store_steps(path: Path) -> tuple[list[dict], list[int], int]:
    from weibull_monitor.store import RunStore

    store = RunStore(str(path))
    try:
        runs = store.runs()
        steps = store.steps()
        fits_at_last = len(store.fits(step=steps[-1])) if steps else 0
    finally:
        store.close()
    return runs, steps, fits_at_last


@pytest.mark.trains
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf", "lit"])
def test_callbacks_under_ddp_write_one_store_from_rank_zero(framework_results, name):
    results = results_of(framework_results, name)
    assert [result["global_step"] for result in results] == [12, 12]
    if name == "lit":
        assert results[0]["strategy"] == "DDPStrategy" and results[0]["world_size"] == 2
    runs, steps, fits_at_last = store_steps(framework_results["dir"] / f"{name}.sqlite")
    assert len(runs) == 1  # rank 1 (writer=False) opened no run of its own
    assert steps == [0, 4, 8, 12]  # every due step once: a second writer would have doubled or raced them
    # The last snapshot: same fits on both ranks, and the store holds one row per fit.
    last = [result["last_fits"] for result in results]
    assert last[0]["step"] == last[1]["step"] == 12
    assert last[0]["fits"] == last[1]["fits"]
    assert fits_at_last == len(last[0]["fits"]) > 0


@pytest.mark.trains
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_stop", "lit_stop"])
def test_a_critical_alert_on_one_rank_stops_every_rank_at_the_same_step(framework_results, name):
    # The rule fires on rank 1 only, from step 8; agree() makes rank 0 stop too (else DDP would hang).
    results = results_of(framework_results, name)
    assert [result["global_step"] for result in results] == [8, 8]
