"""The corpus of the loader fuzz harness: real files written by the formats' own libraries, the hostile inputs the
issue-19 trial found, and structure-aware mutations of the real files (tests/robustness/mutators.py).

Each :class:`Case` is a folder with its inputs and the ``weibull-monitor`` command line to run in it. Built in the
fork server before any case runs (writing files only, never fitting: the server must stay single-threaded).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mutators
import torch

LLAMA = "model.layers.{}.{}.weight"
PARTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class Case:
    """One input: ``build(folder)`` writes it, ``argv`` is run in that folder.

    ``check``: how an exit-0 scan is verified against the format's own library ("safetensors", "torch", "gguf" or
    None); ``owned``: paths (relative) the command may create or change; ``fsize``: a file-size limit (bytes) that
    simulates a full disk; ``expect``: "error" or "ok" where the outcome is known.
    """

    name: str
    structure: str
    build: Callable[[Path], None]
    argv: list[str]
    check: str | None = None
    owned: tuple[str, ...] = ()
    fsize: int | None = None
    expect: str | None = None
    notes: dict = field(default_factory=dict)


def state(seed: int = 0, layers: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float32)
    out = {"model.embed_tokens.weight": torch.randn(64, 32, generator=gen) * 0.02}
    for layer in range(layers):
        for part, dtype in zip(PARTS, dtypes):
            shape = (48, 32) if "up" in part else (32, 48) if "down" in part else (32, 32)
            out[LLAMA.format(layer, part)] = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
        out[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(32)
    out["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    out["model.layers.0.mlp.gate_proj.weight"] = torch.randint(-3, 3, (48, 32), dtype=torch.int8)
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor], folder: Path) -> bytes:
    from safetensors.torch import save_file

    path = folder / ".base.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    raw = path.read_bytes()
    path.unlink()
    return raw


def torch_bytes(obj: object, folder: Path, legacy: bool = False) -> bytes:
    path = folder / ".base.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    path.unlink()
    return raw


def gguf_bytes(folder: Path, big_endian: bool = False, quantised: bool = True) -> bytes:
    import gguf
    import numpy as np

    path = folder / ".base.gguf"
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(32)
    rng = np.random.default_rng(0)
    for layer in range(2):
        for name, dtype in (("attn_q", np.float32), ("attn_k", np.float16), ("ffn_up", np.float32)):
            values = (rng.standard_normal((32, 32)) * 0.02).astype(dtype)
            writer.add_tensor(f"blk.{layer}.{name}.weight", values, raw_dtype=None)
        if quantised:
            values = (rng.standard_normal((32, 64)) * 0.02).astype(np.float32)
            q8 = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(f"blk.{layer}.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = path.read_bytes()
    path.unlink()
    return raw


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


SCAN = ["scan", "--json", "--no-progress"]


def fused(folder: Path, config: dict) -> None:
    """A GPT-NeoX checkpoint (fused QKV) with ``config`` as its config.json."""
    gen = torch.Generator().manual_seed(2)
    tensors = {
        f"gpt_neox.layers.{i}.attention.query_key_value.weight": torch.randn(96, 32, generator=gen)
        for i in range(2)
    }
    tensors.update(
        {f"gpt_neox.layers.{i}.attention.dense.weight": torch.randn(32, 32, generator=gen) for i in range(2)}
    )
    write(folder / "model.safetensors", safetensors_bytes(tensors, folder))
    write(folder / "config.json", json.dumps(config))


# ---------------------------------------------------------------------------------------------------------------
# The inputs the trial found (one case each), named as in the issue


def named_cases(scratch: Path, big: bool) -> list[Case]:
    cases: list[Case] = []

    def add(name: str, structure: str, build: Callable[[Path], None], argv: list[str], **kw) -> None:
        cases.append(Case(name, structure, build, argv, **kw))

    # --- denial of service from tiny files
    def nested(folder: Path) -> None:
        cur: dict = {"w": torch.randn(16, 16)}
        for _ in range(40):
            cur = {"a": cur, "b": cur}
        torch.save(cur, folder / "nested.pt")

    add("dos/shared-dicts-40-deep", "torch", nested, [*SCAN, "nested.pt"], check="torch", expect="ok")

    def expand(folder: Path) -> None:
        torch.save({"w": torch.randn(1).expand(2**20, 2**20)}, folder / "expand.pt")

    add("dos/expand-2^40-elements", "torch", expand, [*SCAN, "expand.pt"], expect="ok")
    add(
        "dos/expand-2^40-elements-exact",
        "torch",
        expand,
        [*SCAN, "--method", "exact", "expand.pt"],
        expect="ok",
    )

    def fifo_shard(folder: Path) -> None:
        index = {"weight_map": {"model.layers.0.mlp.up_proj.weight": "model-00001.safetensors"}}
        write(folder / "model.safetensors.index.json", json.dumps(index))
        os.mkfifo(folder / "model-00001.safetensors")

    add("dos/index-shard-is-a-fifo", "index", fifo_shard, [*SCAN, "."], expect="error")

    def fifo_file(folder: Path) -> None:
        os.mkfifo(folder / "weights.safetensors")

    add("dos/fifo-as-the-file", "safetensors", fifo_file, [*SCAN, "weights.safetensors"], expect="error")

    def many(folder: Path, count: int = 100_000 if big else 20_000) -> None:
        entries = {
            f"t{i}": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]}
            for i in range(count)
        }
        write(folder / "many.safetensors", mutators.join_safetensors(json.dumps(entries), bytes(4 * count)))

    add(
        f"dos/{100_000 if big else 20_000}-entries-of-1x1",
        "safetensors",
        many,
        [*SCAN, "many.safetensors"],
        check="safetensors",
        expect="ok",
    )

    # --- silent wrong answers
    def negative_offsets(folder: Path) -> None:
        raw = safetensors_bytes({"model.layers.0.mlp.up_proj.weight": torch.randn(32, 32)}, folder)
        header, data = mutators.split_safetensors(raw)
        header["model.layers.0.mlp.up_proj.weight"]["data_offsets"] = [-200, 4096 - 200]
        write(folder / "neg.safetensors", mutators.join_safetensors(json.dumps(header), data))

    add(
        "wrong/negative-data-offsets",
        "safetensors",
        negative_offsets,
        [*SCAN, "neg.safetensors"],
        expect="error",
    )

    def duplicate(folder: Path) -> None:
        raw = safetensors_bytes({"model.layers.0.mlp.up_proj.weight": torch.randn(32, 32)}, folder)
        _, data = mutators.split_safetensors(raw)
        text = '{"model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [32, 32], "data_offsets": [0, 4096]}, '
        text += '"model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [16, 16], "data_offsets": [0, 1024]}}'
        write(folder / "dup.safetensors", mutators.join_safetensors(text, data))

    add("wrong/duplicate-tensor-names", "safetensors", duplicate, [*SCAN, "dup.safetensors"], expect="error")

    def overlap(folder: Path) -> None:
        raw = safetensors_bytes({"a.weight": torch.randn(32, 32), "b.weight": torch.randn(32, 32)}, folder)
        header, data = mutators.split_safetensors(raw)
        header["b.weight"]["data_offsets"] = header["a.weight"]["data_offsets"]
        write(folder / "overlap.safetensors", mutators.join_safetensors(json.dumps(header), data))

    add("wrong/overlapping-tensors", "safetensors", overlap, [*SCAN, "overlap.safetensors"], expect="error")

    add(
        "wrong/big-endian-gguf",
        "gguf",
        lambda f: write(f / "be.gguf", gguf_bytes(f, big_endian=True)),
        [*SCAN, "be.gguf"],
        check="gguf",
        expect="ok",
    )

    def extreme_fp64(folder: Path) -> None:
        gen = torch.Generator().manual_seed(1)
        tensors = {
            "model.layers.0.mlp.up_proj.weight": torch.randn(64, 64, generator=gen, dtype=torch.float64)
            * 1e-300,
            "model.layers.0.mlp.down_proj.weight": torch.randn(64, 64, generator=gen, dtype=torch.float64)
            * 1e300,
            "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen) * 1e-42,
        }
        write(folder / "extreme.safetensors", safetensors_bytes(tensors, folder))

    add(
        "wrong/fp64-1e-300-1e300-fp32-subnormal",
        "safetensors",
        extreme_fp64,
        [*SCAN, "extreme.safetensors"],
        check="safetensors",
        expect="ok",
    )

    # --- data touched or lost
    def foreign_db(folder: Path) -> None:
        conn = sqlite3.connect(folder / "other-app.sqlite")
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('alice')")
        conn.commit()
        conn.close()

    add(
        "data/report-on-another-apps-database",
        "store",
        foreign_db,
        ["report", "other-app.sqlite", "-o", "out"],
        owned=("out",),
        expect="error",
    )
    add(
        "data/scan-store-into-another-apps-database",
        "store",
        lambda f: (foreign_db(f), write(f / "w.safetensors", safetensors_bytes(state(), f))),
        [*SCAN, "w.safetensors", "--store", "other-app.sqlite"],
        expect="error",
    )

    # --- clear errors: stores and reports
    add(
        "store/a-directory",
        "store",
        lambda f: (f / "store.sqlite").mkdir(),
        ["report", "store.sqlite", "-o", "out"],
        owned=("out",),
        expect="error",
    )
    add(
        "store/not-sqlite",
        "store",
        lambda f: write(f / "store.sqlite", "hello, not a database\n" * 50),
        ["report", "store.sqlite", "-o", "out"],
        owned=("out",),
        expect="error",
    )
    add(
        "store/scan-into-a-directory",
        "store",
        lambda f: ((f / "store.sqlite").mkdir(), write(f / "w.safetensors", safetensors_bytes(state(), f))),
        [*SCAN, "w.safetensors", "--store", "store.sqlite"],
        expect="error",
    )
    add(
        "store/scan-into-not-sqlite",
        "store",
        lambda f: (
            write(f / "store.sqlite", "x" * 4096),
            write(f / "w.safetensors", safetensors_bytes(state(), f)),
        ),
        [*SCAN, "w.safetensors", "--store", "store.sqlite"],
        expect="error",
    )
    for value in ("'one'", "99", "NULL", "1.5", "X'00'"):

        def text_version(folder: Path, value: str = value) -> None:
            shutil.copy(scratch / "store.sqlite", folder / "store.sqlite")
            conn = sqlite3.connect(folder / "store.sqlite")
            conn.execute(
                "DELETE FROM schema_version"
                if value == "NULL"
                else f"UPDATE schema_version SET version = {value}"
            )
            conn.commit()
            conn.close()

        add(
            f"store/schema_version-{value}",
            "store",
            text_version,
            ["report", "store.sqlite", "-o", "out"],
            owned=("out",),
            expect="error" if value != "NULL" else None,
        )

    def copy_store(folder: Path) -> None:
        shutil.copy(scratch / "store.sqlite", folder / "store.sqlite")

    add(
        "report/output-path-is-a-file",
        "report",
        lambda f: (copy_store(f), write(f / "out", "a file")),
        ["report", "store.sqlite", "-o", "out"],
        expect="error",
    )
    add(
        "report/full-disk",
        "report",
        copy_store,
        ["report", "store.sqlite", "-o", "out"],
        owned=("out",),
        fsize=20_000,
        expect="error",
    )
    add(
        "report/mathtext-run-name",
        "report",
        lambda f: shutil.copy(scratch / "mathtext.sqlite", f / "store.sqlite"),
        ["report", "store.sqlite", "-o", "out"],
        owned=("out",),
        expect="ok",
    )

    # --- clear errors: torch files
    def no_data_pkl(folder: Path) -> None:
        raw = torch_bytes({"w": torch.randn(16, 16)}, folder)
        name = next(
            n for n in mutators.zipfile.ZipFile(mutators.io.BytesIO(raw)).namelist() if n.endswith("data.pkl")
        )
        write(folder / "nopkl.pt", mutators.rewrite_zip(raw, {name: None}))

    add("torch/zip-without-data.pkl", "torch", no_data_pkl, [*SCAN, "nopkl.pt"], expect="error")
    add(
        "torch/truncated",
        "torch",
        lambda f: write(f / "cut.pt", torch_bytes(state(), f)[:3000]),
        [*SCAN, "cut.pt"],
        expect="error",
    )

    def self_reference(folder: Path) -> None:
        d: dict = {"w": torch.randn(16, 16)}
        d["self"] = d
        torch.save(d, folder / "selfref.pt")

    add(
        "torch/self-referencing-dict",
        "torch",
        self_reference,
        [*SCAN, "selfref.pt"],
        check="torch",
        expect="ok",
    )
    add(
        "torch/sparse",
        "torch",
        lambda f: torch.save(
            {"model.layers.0.mlp.up_proj.weight": torch.randn(20, 20).to_sparse()}, f / "sparse.pt"
        ),
        [*SCAN, "sparse.pt"],
        expect="ok",
    )
    add(
        "torch/sparse-csr",
        "torch",
        lambda f: torch.save(
            {"model.layers.0.mlp.up_proj.weight": torch.randn(20, 20).to_sparse_csr()}, f / "csr.pt"
        ),
        [*SCAN, "csr.pt"],
        expect="ok",
    )
    add(
        "torch/fnuz-float8",
        "torch",
        lambda f: torch.save(
            {
                LLAMA.format(0, "mlp.up_proj"): torch.randn(64, 64).to(torch.float8_e4m3fnuz),
                LLAMA.format(0, "mlp.down_proj"): torch.randn(64, 64).to(torch.float8_e5m2fnuz),
            },
            f / "fnuz.pt",
        ),
        [*SCAN, "fnuz.pt"],
        check="torch",
        expect="ok",
    )
    add(
        "torch/garbage",
        "torch",
        lambda f: write(f / "garbage.pt", random.Random(0).randbytes(2000)),
        [*SCAN, "garbage.pt"],
        expect="error",
    )
    add(
        "torch/overlapping-view",
        "torch",
        lambda f: torch.save({"w": torch.randn(200).as_strided((100, 100), (1, 1))}, f / "overlap.pt"),
        [*SCAN, "overlap.pt"],
        expect="ok",
    )

    # --- clear errors: index files and configs
    def index_self(folder: Path) -> None:
        write(
            folder / "model.safetensors.index.json",
            json.dumps({"weight_map": {"w": "model.safetensors.index.json"}}),
        )

    add("index/names-itself", "index", index_self, [*SCAN, "."], expect="error")
    add(
        "index/weight_map-not-a-dict",
        "index",
        lambda f: write(f / "model.safetensors.index.json", json.dumps({"weight_map": ["a", "b"]})),
        [*SCAN, "."],
        expect="error",
    )

    def shard_dir(folder: Path) -> None:
        write(folder / "model.safetensors.index.json", json.dumps({"weight_map": {"w": "shard.safetensors"}}))
        (folder / "shard.safetensors").mkdir()

    add("index/shard-is-a-directory", "index", shard_dir, [*SCAN, "."], expect="error")

    neox = {"model_type": "gpt_neox", "num_attention_heads": 4, "hidden_size": 32, "num_hidden_layers": 2}
    for key, value in (
        ("num_attention_heads", 0),
        ("num_attention_heads", -4),
        ("num_attention_heads", "4"),
        ("hidden_size", 0),
        ("num_attention_heads", 1e300),
        ("num_attention_heads", True),
    ):
        add(
            f"config/fused-qkv-{key}-{value!r}",
            "config",
            lambda f, key=key, value=value: fused(f, {**neox, key: value}),
            [*SCAN, "."],
            check="safetensors",
            expect="ok",
        )
    add(
        "config/deep-nesting",
        "config",
        lambda f: (fused(f, neox), write(f / "config.json", mutators.deep_json(100_000))),
        [*SCAN, "."],
        expect="error",
    )

    # --- GGUF counts
    def gguf_counts(folder: Path, offset: int, value: int) -> None:
        raw = bytearray(gguf_bytes(folder))
        raw[offset : offset + 8] = struct.pack("<Q", value)
        write(folder / "bogus.gguf", bytes(raw))

    for offset, what in ((8, "tensor"), (16, "key")):
        for value in (2**63, 2**32, 10_000):
            add(
                f"gguf/bogus-{what}-count-{value}",
                "gguf",
                lambda f, o=offset, v=value: gguf_counts(f, o, v),
                [*SCAN, "bogus.gguf"],
                expect="error",
            )

    # --- smaller
    def escapes(folder: Path) -> None:
        name = "model.layers.0.mlp.up_proj.weight\x1b[2J\x1b[Hforged\nline"
        write(
            folder / "esc.safetensors",
            safetensors_bytes(
                {name: torch.randn(32, 32), "x\x1b]0;title\x07.weight": torch.randn(2, 2)}, folder
            ),
        )

    add(
        "smaller/terminal-escapes-in-names",
        "safetensors",
        escapes,
        ["scan", "--no-progress", "esc.safetensors"],
        expect="ok",
    )
    add(
        "smaller/terminal-escapes-in-names-csv",
        "safetensors",
        escapes,
        ["scan", "--no-progress", "--csv", "esc.safetensors"],
        expect="ok",
    )

    def incomplete_series(folder: Path) -> None:
        for step in (10, 20):
            write(folder / f"checkpoint-{step}" / "model.safetensors", safetensors_bytes(state(step), folder))
        write(folder / "checkpoint-30" / "model.safetensors", safetensors_bytes(state(30), folder)[:500])

    add(
        "smaller/incomplete-checkpoint-in-series",
        "series",
        incomplete_series,
        [*SCAN, "."],
        check=None,
        expect="ok",
    )

    def bool_step(folder: Path) -> None:
        for step in (1, 2):
            write(folder / f"checkpoint-{step}" / "model.safetensors", safetensors_bytes(state(step), folder))
            write(
                folder / f"checkpoint-{step}" / "trainer_state.json",
                json.dumps({"global_step": True if step == 1 else -5}),
            )

    add("smaller/trainer-state-global_step-true", "series", bool_step, [*SCAN, "."], expect="ok")

    def multi_path(folder: Path) -> None:
        write(folder / "good.safetensors", safetensors_bytes(state(), folder))
        write(folder / "bad.safetensors", b"\x00" * 3)

    add(
        "smaller/multi-path-later-fails",
        "safetensors",
        multi_path,
        [*SCAN, "good.safetensors", "bad.safetensors", "--store", "runs.sqlite"],
        owned=("runs.sqlite", "runs.sqlite-wal", "runs.sqlite-shm"),
        expect="error",
    )
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Mutations of real files


def mutated_cases(count: int, seed: int, scratch: Path) -> list[Case]:
    rng = random.Random(seed)
    bases = {
        "safetensors": safetensors_bytes(state(), scratch),
        "torch": torch_bytes({"state_dict": state(), "global_step": 7, "optimizer": {"lr": 0.1}}, scratch),
        "torch-legacy": torch_bytes({"state_dict": state(), "global_step": 7}, scratch, legacy=True),
        "gguf": gguf_bytes(scratch),
    }
    index_doc = {
        "metadata": {"total_size": 1},
        "weight_map": {name: "model-00001-of-00001.safetensors" for name in state()},
    }
    config_doc = {
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 32,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    kinds = (
        ["safetensors"] * 4
        + ["torch"] * 4
        + ["torch-legacy", "gguf", "gguf", "index", "config", "trainer-state"]
    )
    cases = []
    for i in range(count):
        kind = rng.choice(kinds)
        local = random.Random(rng.getrandbits(64))
        if kind == "safetensors":
            how, data = mutators.mutate_safetensors(bases["safetensors"], local)
            cases.append(
                Case(
                    f"mutated/{i}/safetensors-{how}",
                    "safetensors",
                    lambda f, d=data: write(f / "m.safetensors", d),
                    [*SCAN, "m.safetensors", *(["--method", "exact"] if local.random() < 0.3 else [])],
                    check="safetensors",
                )
            )
        elif kind == "torch":
            how, data = mutators.mutate_torch_zip(bases["torch"], local)
            cases.append(
                Case(
                    f"mutated/{i}/torch-{how}",
                    "torch",
                    lambda f, d=data: write(f / "m.pt", d),
                    [*SCAN, "m.pt"],
                    check="torch",
                )
            )
        elif kind == "torch-legacy":
            how, data = mutators.mutate_legacy_torch(bases["torch-legacy"], local)
            cases.append(
                Case(
                    f"mutated/{i}/torch-{how}",
                    "torch",
                    lambda f, d=data: write(f / "m.bin", d),
                    [*SCAN, "m.bin"],
                    check="torch",
                )
            )
        elif kind == "gguf":
            how, data = mutators.mutate_gguf(bases["gguf"], local)
            cases.append(
                Case(
                    f"mutated/{i}/gguf-{how}",
                    "gguf",
                    lambda f, d=data: write(f / "m.gguf", d),
                    [*SCAN, "m.gguf"],
                    check="gguf",
                )
            )
        elif kind == "index":
            text = mutators.mutate_json(index_doc, local)
            shard = bases["safetensors"]

            def build(f: Path, text: str = text, shard: bytes = shard) -> None:
                write(f / "model.safetensors.index.json", text)
                write(f / "model-00001-of-00001.safetensors", shard)

            cases.append(Case(f"mutated/{i}/index-json", "index", build, [*SCAN, "."], check="safetensors"))
        elif kind == "config":
            text = mutators.mutate_json(config_doc, local)

            def build(f: Path, text: str = text) -> None:
                write(f / "config.json", text)
                write(f / "model.safetensors", bases["safetensors"])

            cases.append(Case(f"mutated/{i}/config-json", "config", build, [*SCAN, "."], check="safetensors"))
        else:
            text = mutators.mutate_json({"global_step": 10, "log_history": [{"loss": 1.0}]}, local)

            def build(f: Path, text: str = text) -> None:
                for step in (10, 20):
                    write(f / f"checkpoint-{step}" / "model.safetensors", bases["safetensors"])
                write(f / "checkpoint-10" / "trainer_state.json", text)

            cases.append(Case(f"mutated/{i}/trainer-state-json", "series", build, [*SCAN, "."]))
    return cases
