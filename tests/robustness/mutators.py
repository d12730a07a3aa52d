"""Structure-aware mutations of checkpoint files, for the loader fuzz harness (tests/robustness/fuzz_runner.py).

Not random bytes only: each format is taken apart into the structure its reader trusts and one piece is changed.

- safetensors: the JSON header (dtype, shape, data_offsets of one entry; ``__metadata__``; duplicate names; deep
  nesting; NaN literals), the 8-byte header length, the data section (truncated, extended, flipped);
- PyTorch zip files: the archive's records (dropped, truncated), and the pickle stream of ``data.pkl`` re-encoded
  op by op with one op changed: an integer (storage size, offset, shape, stride) set to a hostile value, a string
  (tensor name, storage key, device) replaced, a GLOBAL redirected, an op dropped or duplicated, a dict made to hold
  itself;
- GGUF: the tensor and key counts, string lengths, dimension counts, dimensions, types and offsets of the header,
  located by parsing it;
- JSON side files (index, config, trainer state): a value replaced by another type, nesting, huge numbers.

Every mutator takes a ``random.Random`` and returns new bytes (or a new object); none touches the disk.
"""

from __future__ import annotations

import io
import json
import pickletools
import random
import struct
import zipfile
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Values that break readers that trust what they read


HOSTILE_INTS = (-1, -(2**31), 0, 1, 255, 256, 2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30)
HOSTILE_STRINGS = (
    "",
    "\x1b[2J\x1b[Hforged line",
    "a\nb",
    "../../etc/passwd",
    "x" * 5000,
    "\u202eevil",
    "model.layers.0.self_attn.q_proj.weight",
)
WRONG_TYPES = (None, True, 1.5, "8", [], {}, [[1]], -3)


def deep_json(levels: int) -> str:
    return "[" * levels + "]" * levels


def hostile_value(rng: random.Random) -> Any:
    return rng.choice([*HOSTILE_INTS, *WRONG_TYPES, *HOSTILE_STRINGS[:3]])


# ---------------------------------------------------------------------------------------------------------------
# safetensors


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header_text: str | bytes, data: bytes, header_len: int | None = None) -> bytes:
    text = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(text) if header_len is None else header_len % 2**64) + text + data


def mutate_safetensors(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """(what was changed, the mutated file)."""
    header, data = split_safetensors(raw)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    spec = header[name]
    how = rng.choice(
        [
            "dtype",
            "shape",
            "offsets",
            "offsets-overlap",
            "duplicate-name",
            "deep-json",
            "metadata",
            "header-length",
            "truncate",
            "append",
            "flip-header",
            "flip-data",
            "nan-literal",
            "not-object",
            "bad-utf8",
            "drop-key",
            "swap-entries",
            "many-entries",
        ]
    )
    text: str | bytes
    if how == "dtype":
        spec["dtype"] = rng.choice(
            [1, None, [], {}, True, "F32 ", "f32", "FLOAT", "F4", "C64", "U64", "BF16", "F8_E8M0"]
        )
    elif how == "shape":
        dims = list(spec["shape"])
        spec["shape"] = rng.choice(
            [
                [-d for d in dims] or [-1],
                [d + 0.5 for d in dims],
                [str(d) for d in dims],
                [True] * max(1, len(dims)),
                [2**64, *dims],
                [10**30, 0],
                [2**63, 1],
                [2**32, 2**32],
                "32",
                None,
                [dims],
                [],
                [0, *dims],
                dims + dims,
                list(reversed(dims)),
            ]
        )
    elif how == "offsets":
        begin, end = spec["data_offsets"]
        spec["data_offsets"] = rng.choice(
            [
                [-8, end],
                [end, begin],
                [begin, end + 1],
                [begin - 1, end],
                [0, len(data)],
                [begin, 2**64],
                [begin, 2**63],
                [float(begin), float(end)],
                [str(begin), str(end)],
                [begin],
                [begin, end, 0],
                None,
                {"0": begin},
            ]
        )
    elif how == "offsets-overlap":
        other = header[rng.choice(names)]
        spec["data_offsets"] = list(other["data_offsets"])
    elif how == "duplicate-name":
        body = json.dumps(header)
        clone = json.dumps(
            {name: {**spec, "data_offsets": [0, spec["data_offsets"][1] - spec["data_offsets"][0]]}}
        )
        text = body[:-1] + ", " + clone[1:]
        return how, join_safetensors(text, data)
    elif how == "deep-json":
        levels = rng.choice([1000, 100_000])
        body = json.dumps(header)
        text = body[:-1] + f', "__deep__": {deep_json(levels)}}}'
        return how, join_safetensors(text, data)
    elif how == "metadata":
        header["__metadata__"] = rng.choice([1, [], {"a": 1}, {"a": {"b": "c"}}, "x", {"format": "pt"}, None])
    elif how == "header-length":
        n = len(json.dumps(header).encode())
        return how, join_safetensors(
            json.dumps(header), data, rng.choice([0, 1, 7, n - 1, n + 1, 2**40, 2**63, 2**64 - 1])
        )
    elif how == "truncate":
        whole = join_safetensors(json.dumps(header), data)
        return how, whole[: rng.randrange(0, len(whole))]
    elif how == "append":
        return how, join_safetensors(json.dumps(header), data + bytes(rng.randrange(1, 64)))
    elif how == "flip-header":
        body = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return how, join_safetensors(bytes(body), data)
    elif how == "flip-data":
        body = bytearray(data)
        for _ in range(rng.randint(1, 64)):
            if body:
                body[rng.randrange(len(body))] = rng.choice([0xFF, 0x7F, 0x80, 0x00, rng.randrange(256)])
        return how, join_safetensors(json.dumps(header), bytes(body))
    elif how == "nan-literal":
        body = json.dumps(header)
        target = str(spec["data_offsets"][1])
        text = body.replace(target, rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "1" * 5000]), 1)
        return how, join_safetensors(text, data)
    elif how == "not-object":
        return how, join_safetensors(json.dumps(rng.choice([[1, 2], "x", 3, None, [header]])), data)
    elif how == "bad-utf8":
        body = bytearray(json.dumps(header).encode())
        body.insert(rng.randrange(1, len(body)), 0xFF)
        return how, join_safetensors(bytes(body), data)
    elif how == "drop-key":
        spec.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif how == "swap-entries":
        other = rng.choice(names)
        header[name]["data_offsets"], header[other]["data_offsets"] = (
            header[other]["data_offsets"],
            header[name]["data_offsets"],
        )
    elif how == "many-entries":
        count = rng.choice([1000, 20_000])
        many = {
            f"t{i}": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]}
            for i in range(count)
        }
        return how, join_safetensors(json.dumps(many), bytes(4 * count))
    return how, join_safetensors(json.dumps(header), data)


# ---------------------------------------------------------------------------------------------------------------
# Pickle streams, op by op


def pickle_ops(raw: bytes) -> list[tuple[str, Any, bytes]]:
    """(op name, argument, raw bytes of the op) for every op of a pickle stream."""
    ops = list(pickletools.genops(raw))
    out = []
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(raw)
        out.append((op.name, arg, raw[pos:end]))
    return out


def encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    n = (value.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + value.to_bytes(n, "little", signed=True)


def encode_str(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def mutate_pickle(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One op of the stream changed: (what, the new stream)."""
    ops = pickle_ops(raw)
    ints = [i for i, (name, _, _) in enumerate(ops) if name in ("BININT1", "BININT2", "BININT", "LONG1")]
    strings = [i for i, (name, _, _) in enumerate(ops) if name in ("BINUNICODE", "SHORT_BINUNICODE")]
    globals_ = [i for i, (name, _, _) in enumerate(ops) if name == "GLOBAL"]
    choices = ["drop-op", "duplicate-op"]
    choices += ["int"] * 6 if ints else []
    choices += ["string"] * 2 if strings else []
    choices += ["global"] if globals_ else []
    choices += ["self-reference"] if any(name == "SETITEMS" for name, _, _ in ops) else []
    how = rng.choice(choices)
    pieces = [piece for _, _, piece in ops]
    if how == "int":
        i = rng.choice(ints)
        value = ops[i][1]
        pieces[i] = encode_int(rng.choice([*HOSTILE_INTS[:12], value + 1, value - 1, value * 1000, -value]))
    elif how == "string":
        i = rng.choice(strings)
        pieces[i] = encode_str(rng.choice([*HOSTILE_STRINGS, ops[i][1] + "x", "1", "0", "meta", "cuda"]))
    elif how == "global":
        i = rng.choice(globals_)
        module, name = rng.choice(
            [
                ("os", "system"),
                ("builtins", "eval"),
                ("torch._utils", "_rebuild_tensor_v2"),
                ("torch", "FloatStorage"),
                ("torch", "BFloat16Storage"),
                ("torch", "ByteStorage"),
                ("collections", "OrderedDict"),
                ("torch._utils", "_rebuild_sparse_tensor"),
                ("torch", "Size"),
                ("nonexistent", "thing"),
            ]
        )
        pieces[i] = b"c" + f"{module}\n{name}\n".encode()
    elif how == "drop-op":
        del pieces[rng.randrange(1, len(pieces) - 1)]
    elif how == "duplicate-op":
        i = rng.randrange(1, len(pieces) - 1)
        pieces.insert(i, pieces[i])
    elif how == "self-reference":
        # the dict memoised first (BINPUT 0 after the top EMPTY_DICT) is stored into itself under a new key
        i = next(i for i, (name, _, _) in enumerate(ops) if name == "SETITEMS")
        pieces.insert(i, encode_str("self") + b"h\x00")
    return f"pickle-{how}", b"".join(pieces)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch zip archives


def rewrite_zip(raw: bytes, change: dict[str, bytes | None]) -> bytes:
    """The archive with members replaced (bytes) or dropped (None)."""
    source = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = change.get(info.filename, source.read(info.filename))
            if data is not None:
                target.writestr(info.filename, data)
    return out.getvalue()


def mutate_torch_zip(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    source = zipfile.ZipFile(io.BytesIO(raw))
    names = source.namelist()
    pkl = next(n for n in names if n.endswith("data.pkl"))
    how = rng.choice(
        ["pickle"] * 6 + ["drop-record", "truncate", "flip-pickle", "shrink-storage", "flip-archive"]
    )
    if how == "pickle":
        what, stream = mutate_pickle(source.read(pkl), rng)
        return what, rewrite_zip(raw, {pkl: stream})
    if how == "drop-record":
        return how, rewrite_zip(raw, {rng.choice(names): None})
    if how == "truncate":
        return how, raw[: rng.randrange(0, len(raw))]
    if how == "flip-pickle":
        stream = bytearray(source.read(pkl))
        for _ in range(rng.randint(1, 3)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        return how, rewrite_zip(raw, {pkl: bytes(stream)})
    if how == "shrink-storage":
        records = [n for n in names if "/data/" in n]
        victim = rng.choice(records)
        data = source.read(victim)
        return how, rewrite_zip(raw, {victim: data[: rng.randrange(0, max(1, len(data)))]})
    body = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return how, bytes(body)


def mutate_legacy_torch(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A legacy (non-zip) torch file: magic pickle, protocol pickle, system-info pickle, object pickle, storage
    keys pickle, then raw storages. One op of the object pickle (the 4th stream) is changed, or the file cut."""
    streams = []
    position = 0
    for _ in range(5):
        ops = list(pickletools.genops(raw[position:]))
        end = position + ops[-1][2] + 1
        streams.append(raw[position:end])
        position = end
    tail = raw[position:]
    if rng.random() < 0.2:
        return "legacy-truncate", raw[: rng.randrange(0, len(raw))]
    what, stream = mutate_pickle(streams[3], rng)
    return f"legacy-{what}", b"".join(streams[:3]) + stream + streams[4] + tail


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_fields(raw: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the header fields a mutation may target: counts, string lengths, n_dims, dims, types and
    offsets of tensor infos (little-endian files, the layout of GGUF v3)."""
    out: dict[str, list[tuple[int, int]]] = {
        "counts": [(8, 8), (16, 8)],
        "lengths": [],
        "n_dims": [],
        "dims": [],
        "types": [],
        "offsets": [],
        "value_types": [],
    }
    pos = 24
    (n_tensors,) = struct.unpack_from("<Q", raw, 8)
    (n_kv,) = struct.unpack_from("<Q", raw, 16)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos: int) -> int:
        out["lengths"].append((pos, 8))
        (n,) = struct.unpack_from("<Q", raw, pos)
        return pos + 8 + n

    def value(pos: int, kind: int) -> int:
        if kind == 8:
            return string(pos)
        if kind == 9:
            (item,) = struct.unpack_from("<I", raw, pos)
            (count,) = struct.unpack_from("<Q", raw, pos + 4)
            out["lengths"].append((pos + 4, 8))
            pos += 12
            for _ in range(count):
                pos = value(pos, item)
            return pos
        return pos + sizes[kind]

    for _ in range(n_kv):
        pos = string(pos)
        (kind,) = struct.unpack_from("<I", raw, pos)
        out["value_types"].append((pos, 4))
        pos = value(pos + 4, kind)
    for _ in range(n_tensors):
        pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        out["n_dims"].append((pos, 4))
        pos += 4
        for _ in range(n_dims):
            out["dims"].append((pos, 8))
            pos += 8
        out["types"].append((pos, 4))
        out["offsets"].append((pos + 4, 8))
        pos += 12
    return out


def mutate_gguf(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    fields = gguf_fields(raw)
    how = rng.choice(
        ["counts", "lengths", "n_dims", "dims", "types", "offsets", "value_types", "truncate", "flip"]
    )
    body = bytearray(raw)
    if how == "truncate":
        return how, raw[: rng.randrange(0, len(raw))]
    if how == "flip" or not fields[how]:
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return "flip", bytes(body)
    pos, width = rng.choice(fields[how])
    bits = 8 * width
    value = rng.choice([0, 1, 2, 3, 5, 7, 64, 1000, 2**31 - 1, 2**32 - 1, 2 ** (bits - 1), 2**bits - 1])
    if how == "types":
        value = rng.choice([0, 1, 8, 30, 31, 39, 40, 99, 2**31])
    body[pos : pos + width] = (value % 2**bits).to_bytes(width, "little")
    return how, bytes(body)


# ---------------------------------------------------------------------------------------------------------------
# JSON side files


def mutate_json(document: Any, rng: random.Random) -> str:
    """A JSON text derived from ``document``: one value replaced by a hostile one, or nesting, or a bad literal."""
    how = rng.random()
    if how < 0.15:
        return deep_json(rng.choice([1000, 100_000]))
    if how < 0.25:
        return rng.choice(["[]", "3", '"x"', "null", "{", '{"a": NaN}', "{}" * 2, '{"a": 1e999}', "1" * 5000])
    document = json.loads(json.dumps(document))
    target = document
    path = []
    while isinstance(target, dict) and target:
        key = rng.choice(list(target))
        path.append(key)
        if not isinstance(target[key], dict) or rng.random() < 0.5:
            break
        target = target[key]
    if isinstance(target, dict) and path:
        target[path[-1]] = hostile_value(rng) if rng.random() < 0.8 else json.loads(deep_json(50))
    return json.dumps(document)
