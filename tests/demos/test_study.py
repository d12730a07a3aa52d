"""The scaling study: the quick run end to end (real training, real store, real figures), and its statistics."""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weibull_monitor.demos import study
from weibull_monitor.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "scaling_study.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``examples/scaling_study.py --quick`` (its ``main``, in this process to spare a second torch import):
    the printed output and the output directory."""
    out = tmp_path_factory.mktemp("study")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert study.main(["--quick", "--out", str(out)]) == 0
    return printed.getvalue(), out


@pytest.mark.slow
def test_quick_study_recovers_the_sqrt_lr_over_wd_law(quick_run):
    stdout, out = quick_run
    result = study.analyse_store(out / "study.sqlite")
    assert len(result.runs) == len(study.quick_config().settings) == 4
    assert result.sqrt_span >= 4 - 1e-6
    assert result.pearson_r >= 0.9
    assert result.slope > 0
    # the printed figures are the store's figures
    assert f"Pearson r = {result.pearson_r:.4f}" in stdout
    assert f"slope = {result.slope:.4f}" in stdout


@pytest.mark.slow
def test_quick_study_scale_rises_with_t_over_tau_in_every_run(quick_run):
    _, out = quick_run
    result = study.analyse_store(out / "study.sqlite")
    for run in result.runs:
        assert run.steps[0] == 0 and run.t_over_tau[0] == 0.0 and run.growth[0] == pytest.approx(1.0)
        assert run.t_over_tau[-1] >= 3.0
        assert len(run.steps) >= 31  # the initial snapshot and at least 30 during training
        assert run.t_over_tau == sorted(run.t_over_tau)
        # start against end, and the last third of the run against the first third: λ saturates at its
        # equilibrium, so a rank correlation over the flat part is mostly noise (measured: +0.18 to +0.80)
        assert run.terminal_growth > 1.5, run.name
        third = len(run.growth) // 3
        assert statistics.fmean(run.growth[-third:]) > 1.2 * statistics.fmean(run.growth[:third]), run.name
    # the same seed: every run starts from the same weights
    assert len({round(r.scale[0], 12) for r in result.runs}) == 1


@pytest.mark.slow
def test_quick_study_writes_one_run_per_setting_and_the_figures(quick_run):
    stdout, out = quick_run
    with RunStore(out / "study.sqlite") as store:
        names = sorted(r["name"] for r in store.runs())
    assert names == sorted(s.name for s in study.quick_config().settings)
    for name in study.FIGURE_NAMES:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figure: {path}" in stdout
    for run in study.analyse_store(out / "study.sqlite").runs:
        for klass in ("selection", "value", "transmission"):
            assert sum(math.isfinite(v) for v in run.k[klass]) == len(run.steps)


@pytest.mark.slow
def test_example_script_analyses_the_same_store_again(quick_run):
    stdout, out = quick_run
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--analyse-only", "--no-figures", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(x for x in stdout.splitlines() if "Pearson r" in x)
    assert line in completed.stdout


@pytest.mark.slow
def test_neox_fused_qkv_is_followed_through_the_study(tmp_path):
    config = study.StudyConfig(
        settings=(study.Setting(5e-2, 2.0), study.Setting(0.2, 0.5)),  # τ = 10 steps
        arch="neox",
        model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        batch_size=2,
        seq_len=16,
        t_over_tau=1.0,
        snapshots=3,
    )
    result = study.run_study(config, tmp_path, figures=True, log=lambda _: None)
    assert [r.name for r in result.runs] == [s.name for s in config.settings]
    for run in result.runs:
        assert run.attention_kind == "fused"
        fused = run.k["qkv (fused)"]
        assert len(fused) == len(run.steps) >= 4 and all(math.isfinite(v) for v in fused)
    assert "qkv k" in study.format_summary(result) and not result.skipped
    with pytest.raises(FileExistsError):
        study.run_study(config, tmp_path, figures=False, log=lambda _: None)


def test_pearson_and_spearman_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert study.pearson(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # a monotone but nonlinear relation has rank correlation 1; ties share their mean rank
    assert study.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert study.spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(study.pearson([1.0, 1.0], [2.0, 3.0]))
    slope, intercept = study.linear_fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert (slope, intercept) == pytest.approx((2.0, 1.0))


def test_settings_and_schedule():
    setting = study.Setting.from_ratio(0.08, 100)
    assert setting.sqrt_lr_over_wd == pytest.approx(0.08)
    assert setting.tau == pytest.approx(100)
    assert study.Setting.parse("4e-3:2.5") == study.Setting(4e-3, 2.5)
    for bad in ("4e-3", "a:b", "0:1", "1e-3:-1", "nan:1"):
        with pytest.raises(ValueError):
            study.Setting.parse(bad)
    config = study.default_config()
    spans = [s.sqrt_lr_over_wd for s in config.settings]
    assert max(spans) / min(spans) >= 4 - 1e-6
    for s in config.settings:
        steps = config.steps(s)
        budget = sum(config.lr_at(s, u) * s.weight_decay for u in range(1, steps + 1))
        assert budget >= config.t_over_tau - 1e-9 > budget - config.lr_at(s, steps) * s.weight_decay
        assert steps // config.every(s) >= 30
    with pytest.raises(ValueError):
        study.StudyConfig(settings=(setting,))
    with pytest.raises(ValueError):
        study.StudyConfig(settings=(setting, study.Setting(1e-3, 1.0)), arch="gpt2")
    with pytest.raises(study.StudyError, match="share a run name"):
        study.StudyConfig(settings=(study.Setting(1e-3, 1.0), study.Setting(1.0001e-3, 1.0)))


def test_command_line_errors_are_one_line_messages(tmp_path, capsys):
    assert study.main(["--analyse-only", "--out", str(tmp_path)]) == study.EXIT_USAGE
    assert "no such run store" in capsys.readouterr().err
    assert study.main(["--setting", "1e-3:1", "--out", str(tmp_path)]) == study.EXIT_USAGE
    assert "at least two" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--setting", "fast:slow"])
    assert exit_info.value.code == 2 and "LR:WD" in capsys.readouterr().err
    assert not (tmp_path / "study.sqlite").exists()


def test_analyse_store_needs_two_usable_runs(tmp_path):
    with pytest.raises(FileNotFoundError):
        study.analyse_store(tmp_path / "missing.sqlite")
    RunStore(tmp_path / "empty.sqlite").close()
    with pytest.raises(study.StudyError, match="at least two"):
        study.analyse_store(tmp_path / "empty.sqlite")
    # a run without an optimizer (no η, no λ_wd) is named with its reason, not silently dropped
    from weibull_monitor.demos.toy import tiny_llama
    from weibull_monitor.monitor import WeibullMonitor

    model = tiny_llama(0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    with WeibullMonitor(
        model, None, every=1, store=tmp_path / "plain.sqlite", run_name="no-optimizer"
    ) as monitor:
        monitor.observe(0)
        monitor.observe(1)
    with pytest.raises(study.StudyError, match="no-optimizer: no Transmission matrix in an optimizer group"):
        study.analyse_store(tmp_path / "plain.sqlite")
