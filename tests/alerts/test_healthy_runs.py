"""Healthy runs raise no warning or critical with the default rules: ``weibull-monitor demo`` (its default 600 steps
and ``--steps 60``), and a model with PyTorch's default (uniform, non-Gaussian) initialisation trained in a plain
loop at lr 1e-3, including its step-0 snapshot. docs/alerts.md §4 and §7 have the margins measured."""

from __future__ import annotations

import pytest
import torch

from weibull_monitor.demos.toy import byte_batches
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.store import RunStore


def _warnings(path) -> list[tuple[int, str, str]]:
    with RunStore(path, read_only=True) as store:
        return [(a["step"], a["rule"], a["level"]) for a in store.alerts() if a["level"] != "info"]


@pytest.mark.trains
@pytest.mark.parametrize("steps", [None, 60])
def test_demo_raises_no_warning(tmp_path, steps, capsys):
    from weibull_monitor.cli import main

    argv = ["demo", "--out", str(tmp_path / "demo")] + ([] if steps is None else ["--steps", str(steps)])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert _warnings(tmp_path / "demo" / "weibull.sqlite") == []
    assert "alerts: none fired" in printed or "warning" not in printed.split("alerts:")[-1].splitlines()[0]


class EncoderLM(torch.nn.Module):
    """A causal byte-level LM around ``nn.TransformerEncoder``: every weight keeps PyTorch's default init
    (``nn.Linear`` uniform: k = 1.36 at step 0; the attention's in_proj Xavier-uniform)."""

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, width)
        self.pos = torch.nn.Embedding(seq, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, 256)
        self.register_buffer(
            "mask", torch.nn.Transformer.generate_square_subsequent_mask(seq), persistent=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        n = ids.shape[1]
        return self.head(self.encoder(x, mask=self.mask[:n, :n], is_causal=True))


@pytest.mark.trains
def test_pytorch_default_init_encoder_raises_no_warning(tmp_path):
    torch.manual_seed(0)
    model = EncoderLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    path = tmp_path / "w.sqlite"
    monitor = WeibullMonitor(model, optimizer, every=10, store=str(path), run_name="encoder")
    batches = byte_batches(16, 64, seed=0)
    first = monitor.snapshot(0)
    assert first.alerts == []  # uniform init is where the run starts, not a departure
    losses = []
    for step in range(1, 201):
        ids = next(batches)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        monitor.observe(step)
    monitor.close()
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:5]) / 5  # it learned
    assert _warnings(path) == []
