"""The report of a run that was rewound: it draws the live timeline, marks the rewind on its time axes (a vertical
line labelled with the step) and draws the abandoned branch faintly beside the live one."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("matplotlib")

from weibull_monitor.demos.toy import tiny_llama
from weibull_monitor.monitor import WeibullMonitor
from weibull_monitor.offline.report import figures, load_run, write_report
from weibull_monitor.store import RunStore

# These tests train (optimizer steps): .ci/run runs them again under another ATEN_CPU_CAPABILITY.
pytestmark = pytest.mark.trains


@pytest.fixture(scope="module")
def rewound_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewound") / "w.sqlite"
    model = tiny_llama(0, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    monitor = WeibullMonitor(model, optimizer, every=5, store=path, run_name="rewound", rules=[])
    saved = None
    for step in range(0, 31):
        if step:
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        monitor.observe(step)
        if step == 20:
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), monitor.state_dict())
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    monitor.load_state_dict(saved[2])
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    for step in range(21, 41):
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step + 500))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.observe(step)
    monitor.close()
    return path


def test_report_marks_the_rewind_and_draws_the_abandoned_branch(rewound_store, tmp_path, monkeypatch):
    drawn = []
    original = figures._figure

    def keep(*args, **kwargs):
        figure = original(*args, **kwargs)
        drawn.append(figure)
        return figure

    monkeypatch.setattr(figures, "_figure", keep)
    with RunStore(rewound_store) as store:
        data = load_run(store, store.runs()[0])
    assert data.steps == list(range(0, 41, 5))  # the live timeline only
    assert [r["step"] for r in data.rewinds] == [20]
    (branch,) = data.abandoned.values()
    assert sorted(branch["weibull/transmission/k_median"]) == [20, 25, 30]  # from the fork point on

    figures.fig_class_medians(data, tmp_path / "medians.png")
    figures.fig_t_over_tau(data, tmp_path / "ttau.png")
    figures.fig_scale(data, tmp_path / "scale.png")
    medians, ttau, scale = drawn
    (ax,) = medians.axes
    marks = [line for line in ax.lines if line.get_linestyle() == "-." and list(line.get_xdata()) == [20, 20]]
    assert len(marks) == 1 and any(t.get_text() == "rewind to 20" for t in ax.texts)
    faint = [line for line in ax.lines if line.get_alpha() == 0.3]
    assert faint and all(list(line.get_xdata()) == [20, 25, 30] for line in faint)
    live_t = data.t_over_tau[20]
    (ax,) = ttau.axes
    assert any(line.get_linestyle() == "-." and list(line.get_xdata()) == [live_t, live_t] for line in ax.lines)
    faint = [line for line in ax.lines if line.get_alpha() == 0.3]
    assert faint and faint[0].get_xdata()[0] == pytest.approx(live_t)  # forks from the live point
    assert faint[0].get_xdata()[-1] != pytest.approx(data.t_over_tau[30])  # its own T/τ, not the live one's
    growth_ax = scale.axes[0]
    assert any(t.get_text() == "rewind to 20" for t in growth_ax.texts)


def test_report_page_lists_the_rewind_and_can_leave_branches_out(rewound_store, tmp_path):
    page = write_report(rewound_store, tmp_path / "with").read_text()
    assert "rewind to step 20" in page and "steps 25-30 of the abandoned timeline" in page
    write_report(rewound_store, tmp_path / "without", branches=False)
    assert (tmp_path / "without" / "run1_class_medians.png").stat().st_size > 0
