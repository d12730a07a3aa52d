"""FSDP2 with one process: sharded parameters (DTensor, world size 1) are fitted from their local pieces, equal to
the plain fits of the same weights (issue 19). A real gloo process group in a subprocess, with a hard timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp2_world_one.py"


@pytest.mark.distributed
def test_fully_shard_at_world_size_one_fits_every_matrix(tmp_path):
    pytest.importorskip("transformers")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["parameter_types"] == ["DTensor"]  # really sharded
    assert result["matrices"] == 16 and result["ok"] == 16, result
    assert result["skipped"] == {}
    assert result["aggregates"] > 0
    assert result["max_dk"] == 0.0 and result["max_dscale"] == 0.0  # the same counts as the plain tensors
    # the weights-only logit bound never gathers a sharded Q/K: each layer is skipped, with the reason recorded
    assert result["logit_bounds"] == 0
    assert sorted(result["logit_bounds_skipped"]) == ["0", "1"]
    assert all("sharded" in reason for reason in result["logit_bounds_skipped"].values())
