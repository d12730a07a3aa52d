"""Security: no unpickling of untrusted files, bound SQL parameters, no escaping symlinks, no network,
meta/offloaded parameters skipped and never materialised."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from weibull_monitor.cli import main
from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.store import RunStore


def save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def cli_process(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in its own process (as a user runs it; ~4 s of imports, so used once)."""
    return subprocess.run(
        [sys.executable, "-m", "weibull_monitor.cli", *args], capture_output=True, text=True, timeout=120
    )


class Done:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """The CLI's entry point in this process, with its exit status and output."""

    def run(*args: str) -> Done:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Done(code, out.out, out.err)

    return run


# ---------------------------------------------------------------------------------------------------------------
# Pickle: a payload that would create a file is refused, in every place a checkpoint can hide one


class CreatesFile:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))  # unpickling this creates a directory at the marker path


def test_crafted_pickles_are_refused_by_the_cli_and_run_nothing(tmp_path, cli):
    marker = tmp_path / "PWNED"
    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 16)}
    places = []
    # torch.save zip archives with the payload next to real weights, under every name the CLI reads
    for name in ("evil.pt", "evil.pth", "evil.ckpt", "evil.bin"):
        torch.save({"state_dict": weights, "x": CreatesFile(marker)}, tmp_path / name)
        places.append(tmp_path / name)
    # a raw (legacy, non-zip) pickle as a Hugging Face directory's weights
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": CreatesFile(marker)}))
    places.append(hf_dir)
    # a series whose second checkpoint carries the payload
    series = tmp_path / "series"
    save_safetensors(series / "checkpoint-1" / "model.safetensors", weights)
    (series / "checkpoint-2").mkdir()
    torch.save({"w": CreatesFile(marker)}, series / "checkpoint-2" / "pytorch_model.bin")
    places.append(series)
    # a zip named .pt whose data.pkl is the payload alone
    raw_zip = tmp_path / "handmade.pt"
    with zipfile.ZipFile(raw_zip, "w") as archive:
        archive.writestr("handmade/data.pkl", pickle.dumps(CreatesFile(marker)))
        archive.writestr("handmade/version", "3\n")
    places.append(raw_zip)
    for i, place in enumerate(places):
        done = (cli_process if i == 0 else cli)("scan", str(place), "--json", "--no-progress")
        assert done.returncode == 2, (place, done.returncode, done.stderr[-500:])
        assert "Traceback" not in done.stderr and "pickle" in done.stderr.lower(), done.stderr
        assert not marker.exists(), place
    # and the payload is real: unpickling it does create the file (so the refusal above is what saved us)
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# SQL: names with quotes and SQL in them are stored verbatim


EVIL_NAMES = (
    "w'); DROP TABLE fits; --",
    'q"k" OR 1=1',
    "Robert'); DELETE FROM snapshots WHERE ('1'='1",
    "name with spaces; and ` backticks ` and \\ backslash",
)


class OddNames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i, name in enumerate(EVIL_NAMES):
            self.register_parameter(name, torch.nn.Parameter(torch.randn(32 + i, 32)))


def test_parameter_and_run_names_with_sql_are_stored_verbatim(tmp_path):
    path = tmp_path / "w.sqlite"
    run_name = "run'; DROP TABLE runs; --"
    model = OddNames()
    with WeibullMonitor(model, every=1, store=path, run_name=run_name, rules=[]) as monitor:
        monitor.observe(0)
        monitor.observe(1)
    with RunStore(path) as store:
        assert [r["name"] for r in store.runs()] == [run_name]
        assert store.steps() == [0, 1]
        names = {r["name"] for r in store.fits(step=1)}
        assert names == set(EVIL_NAMES)
        assert all(r["ok"] for r in store.fits())
        assert len(store.fits()) == 2 * len(EVIL_NAMES)
        # every table is still there
        assert {t for (t,) in store._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {
            "runs", "snapshots", "fits", "aggregates", "alerts", "state",
        }  # fmt: skip
    # the CLI's scan --store with such names in a checkpoint
    ckpt = tmp_path / "odd.safetensors"
    save_safetensors(ckpt, {name: torch.randn(40, 40) for name in EVIL_NAMES})
    assert main(["scan", str(ckpt), "--store", str(tmp_path / "scan.sqlite"), "--no-progress", "--json"]) == 0
    with RunStore(tmp_path / "scan.sqlite") as store:
        assert {r["name"] for r in store.fits()} == set(EVIL_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# Symlinks: nothing outside the checkpoint directory is read through a link


def test_symlinks_out_of_the_checkpoint_are_not_followed(tmp_path, cli):
    outside = tmp_path / "outside"
    save_safetensors(
        outside / "secret.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 16)}
    )
    (outside / "config.json").write_text(json.dumps({"model_type": "llama", "secret": "leaked"}))
    inside_weights = {"model.layers.0.mlp.down_proj.weight": torch.randn(16, 16)}

    # 1. the weights file is a link out
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").symlink_to(outside / "secret.safetensors")
    # 2. an index whose shard is a link out
    b = tmp_path / "b"
    save_safetensors(b / "part-1.safetensors", inside_weights)
    (b / "part-2.safetensors").symlink_to(outside / "secret.safetensors")
    (b / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.layers.0.mlp.down_proj.weight": "part-1.safetensors",
                    "model.layers.0.mlp.up_proj.weight": "part-2.safetensors",
                }
            }
        )
    )
    # 3. an index that names a shard with ../
    c = tmp_path / "c"
    save_safetensors(c / "part-1.safetensors", inside_weights)
    (c / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.layers.0.mlp.up_proj.weight": "../outside/secret.safetensors"}})
    )
    # 4. a series whose member directory is a link out
    d = tmp_path / "d"
    save_safetensors(d / "checkpoint-1" / "model.safetensors", inside_weights)
    (d / "checkpoint-2").symlink_to(outside, target_is_directory=True)
    for place in (a, b, c, d):
        done = cli("scan", str(place), "--json", "--no-progress")
        assert done.returncode == 2, (place, done.stdout[-300:], done.stderr[-300:])
        assert "outside" in done.stderr and "up_proj" not in done.stdout, (place, done.stderr)
    # 5. a config.json that links out is not read: the scan works and knows nothing of the secret
    e = tmp_path / "e"
    save_safetensors(e / "model.safetensors", inside_weights)
    (e / "config.json").symlink_to(outside / "config.json")
    done = cli("scan", str(e), "--json", "--no-progress")
    assert "leaked" not in done.stdout + done.stderr
    # with --follow-symlinks the user opts in, and case 1 reads the linked file
    done = cli("scan", str(a), "--json", "--no-progress", "--follow-symlinks")
    assert done.returncode == 0 and "up_proj" in done.stdout


def test_series_step_file_linking_out_is_not_read(tmp_path, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "trainer_state.json").write_text(json.dumps({"global_step": 777}))
    series = tmp_path / "series"
    for step in (10, 20):
        save_safetensors(
            series / f"checkpoint-{step}" / "model.safetensors",
            {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 16)},
        )
    (series / "checkpoint-20" / "trainer_state.json").symlink_to(outside / "trainer_state.json")
    done = cli("scan", str(series), "--json", "--no-progress")
    steps = {row.get("step") for row in json.loads(done.stdout)} if done.returncode == 0 else set()
    assert 777 not in steps, "a trainer_state.json outside the checkpoint directory was read through a link"


# ---------------------------------------------------------------------------------------------------------------
# Network: none of the package's own


def test_no_network_connection_during_snapshot_store_and_scan(tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse(*args)

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    from weibull_monitor.sinks import LoggingSink

    model = tiny_llama(0, num_hidden_layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with WeibullMonitor(
        model, optimizer, every=1, store=tmp_path / "w.sqlite", sinks=[LoggingSink()]
    ) as monitor:
        snapshot = monitor.observe(0)
        assert monitor.flush(timeout=10)
    assert snapshot is not None and all(f.ok for f in snapshot.fits.values())
    save_safetensors(tmp_path / "m" / "model.safetensors", dict(model.state_dict()))
    assert (
        main(["scan", str(tmp_path / "m"), "--json", "--no-progress", "--store", str(tmp_path / "s.sqlite")])
        == 0
    )
    with RunStore(tmp_path / "w.sqlite") as store:
        assert store.steps() == [0]
    assert attempts == []
    with pytest.raises(OSError, match="blocked"):  # and the block was real
        socket.create_connection(("example.com", 80))


# ---------------------------------------------------------------------------------------------------------------
# Meta / offloaded parameters: skipped with a reason, never materialised


def test_meta_and_offloaded_parameters_are_skipped_never_materialised(tmp_path):
    model = tiny_llama(0, num_hidden_layers=2)
    layer = model.model.layers[1]
    # what accelerate's disk/CPU offload leaves in the module: parameters on the meta device
    offloaded = {
        "model.layers.1.mlp.up_proj.weight": layer.mlp.up_proj,
        "model.layers.1.self_attn.q_proj.weight": layer.self_attn.q_proj,
    }
    for module in offloaded.values():
        module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"))
    with WeibullMonitor(model, every=1, store=tmp_path / "w.sqlite", rules=[], run_name="meta") as monitor:
        snapshot = monitor.observe(0)
    for name, module in offloaded.items():
        assert "meta" in snapshot.skipped[name]
        assert name not in snapshot.fits or not snapshot.fits[name].ok
        assert module.weight.device.type == "meta"  # still not materialised
    assert snapshot.fits["model.layers.0.mlp.up_proj.weight"].ok
    with RunStore(tmp_path / "w.sqlite") as store:
        row = store.snapshots()[0]
        assert set(offloaded) <= set(row["skipped"]) and row["n_skipped"] >= len(offloaded)

    # a whole model built on the meta device (e.g. before loading weights): every matrix skipped, no error
    with torch.device("meta"):
        ghost = tiny_llama(0, num_hidden_layers=1)
    with WeibullMonitor(ghost, every=1, store=None, rules=[]) as monitor:
        snapshot = monitor.observe(0)
    assert snapshot is not None and not any(f.ok for f in snapshot.fits.values())
    assert snapshot.skipped and all("meta" in reason for reason in snapshot.skipped.values())
    assert all(p.device.type == "meta" for p in ghost.parameters())
