"""``weibull-monitor report``: figures and the HTML page from real run stores (a training run and a checkpoint scan)."""

from __future__ import annotations

import html.parser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from weibull_monitor.cli import main

SERIES_FIGURES = ("k_heatmap", "class_medians", "scale", "t_over_tau", "alerts")
SINGLE_FIGURES = ("layer_profile", "components")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def training_store(tmp_path_factory) -> Path:
    """A real run: tiny LLaMA, AdamW with weight decay, the monitor's store and alert engine, 24 steps."""
    from weibull_monitor import WeibullMonitor
    from weibull_monitor.alerts import ScaleRunaway, default_rules
    from weibull_monitor.demos.toy import byte_batches, tiny_llama

    path = tmp_path_factory.mktemp("store") / "run.sqlite"
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=32, intermediate_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    # A sensitive growth rule so that this short run raises alerts the timeline must show.
    rules = [
        *default_rules(),
        ScaleRunaway(
            max_growth=1.1, patience=1, cooldown=100, name="scale_growth_watch", level="warning"
        ),
    ]
    batches = byte_batches(4, 32)
    with WeibullMonitor(
        model, optimizer, every=4, store=str(path), rules=rules, run_name="toy run"
    ) as monitor:
        for step in range(1, 25):
            batch = next(batches)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.observe(step)
    return path


@pytest.fixture(scope="module")
def scan_store(tmp_path_factory) -> Path:
    """A single checkpoint scanned into a store (one snapshot)."""
    from weibull_monitor.demos.toy import tiny_llama

    root = tmp_path_factory.mktemp("scan")
    tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=3).save_pretrained(root / "model")
    path = root / "scan.sqlite"
    assert main(["scan", str(root / "model"), "--store", str(path), "--json", "--no-progress"]) == 0
    return path


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if re.match(r"^[a-z]+://", value):
                self.external.append(value)


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 200
    assert image.std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def training_report(training_store, tmp_path_factory) -> tuple[Path, str]:
    """The report of the training run, written through the command line; (its directory, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("report") / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["report", str(training_store), "-o", str(out)]) == 0
    return out, printed.getvalue()


@pytest.mark.trains
def test_training_report_writes_every_figure_and_the_page(training_store, training_report):
    from weibull_monitor.store import RunStore

    out, printed = training_report
    assert str(out / "index.html") in printed and "webbrowser" in printed
    with RunStore(training_store) as store:
        (run,) = store.runs()
        alerts = store.alerts()
        steps = store.steps()
    assert alerts and steps == [4, 8, 12, 16, 20, 24]
    slug = f"run{run['run_id']}"
    expected = {f"{slug}_{name}.png" for name in SERIES_FIGURES}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        _check_png(out / name)
    page = _Page()
    text = (out / "index.html").read_text()
    page.feed(text)
    assert set(page.images) == expected
    assert page.external == []  # self-contained: nothing fetched from the network
    assert "toy run" in text and "gqa" in text
    assert "scale_growth_watch" in text  # the alert table lists the rule
    assert "1.186-1.204" in text  # the paper's band beside the measured class median


def test_single_scan_report_draws_the_layer_profile(scan_store, tmp_path):
    from weibull_monitor.offline.report import write_report

    page = write_report(scan_store, tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert names == sorted(f"run1_{n}.png" for n in SINGLE_FIGURES)
    for name in names:
        _check_png(tmp_path / "r" / name)
    parsed = _Page()
    parsed.feed(page.read_text())
    assert sorted(parsed.images) == names
    assert "a single snapshot" in page.read_text()


@pytest.mark.trains
def test_report_of_several_runs_and_a_chosen_run(training_store, scan_store, tmp_path):
    from weibull_monitor.offline.report import write_report
    from weibull_monitor.store import RunStore

    both = tmp_path / "both.sqlite"
    shutil.copy(training_store, both)
    from weibull_monitor.demos.toy import tiny_llama

    tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(tmp_path / "m")
    assert (
        main(
            [
                "scan",
                str(tmp_path / "m"),
                "--store",
                str(both),
                "--run-name",
                "scanned",
                "--csv",
                "--no-progress",
            ]
        )
        == 0
    )
    with RunStore(both) as store:
        assert [r["name"] for r in store.runs()] == ["toy run", "scanned"]
    page = write_report(both, tmp_path / "all")
    assert len(list((tmp_path / "all").glob("*.png"))) == len(SERIES_FIGURES) + len(SINGLE_FIGURES)
    assert "toy run" in page.read_text() and "scanned" in page.read_text()
    write_report(both, tmp_path / "one", run="scanned")
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == sorted(
        f"run2_{n}.png" for n in SINGLE_FIGURES
    )


@pytest.mark.trains
def test_report_errors_are_one_line(tmp_path, training_store, capsys):
    assert main(["report", str(tmp_path / "missing.sqlite")]) == 2
    assert "no such run store" in capsys.readouterr().err
    assert main(["report", str(training_store), "-o", str(tmp_path / "x"), "--run", "nope"]) == 2
    assert "no run named" in capsys.readouterr().err
    from weibull_monitor.store import RunStore

    empty = tmp_path / "empty.sqlite"
    RunStore(empty).close()
    assert main(["report", str(empty), "-o", str(tmp_path / "y")]) == 2
    assert "no snapshots" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The page in a real browser.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _load_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """(the DOM after load, the console messages chromium logged)."""
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


@pytest.mark.trains
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_loads_in_headless_chromium_without_console_errors(training_report, tmp_path):
    shutil.copytree(training_report[0], tmp_path / "r")
    page = tmp_path / "r" / "index.html"
    dom, console = _load_in_chromium(page, tmp_path / "profile")
    assert console == [], console
    loaded = re.search(r'data-figures-loaded="(\d+)"', dom)
    total = re.search(r'data-figures-total="(\d+)"', dom)
    assert loaded and total and loaded.group(1) == total.group(1) == str(len(SERIES_FIGURES))
    # The check itself works: a figure that is gone is reported as a console error.
    next(iter((tmp_path / "r").glob("*_scale.png"))).unlink()
    dom, console = _load_in_chromium(page, tmp_path / "profile2")
    assert any("figure failed to load" in line and "scale.png" in line for line in console), console


@pytest.mark.trains
def test_report_of_a_scanned_series_says_what_a_checkpoint_cannot_tell(tmp_path):
    """A series scanned from disk has no optimizer: the λ-vs-√(η/λ_wd) and T/τ panels say so, the rest is drawn."""
    from weibull_monitor.demos.toy import byte_batches, tiny_llama
    from weibull_monitor.offline.report import write_report

    model = tiny_llama(hidden_size=32, intermediate_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    batches = byte_batches(4, 32)
    for step in range(1, 13):
        batch = next(batches)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 4 == 0:
            model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    store = tmp_path / "scan.sqlite"
    assert main(["scan", str(tmp_path / "run"), "--store", str(store), "--json", "--no-progress"]) == 0
    page = write_report(store, tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == sorted(
        f"run1_{n}.png" for n in SERIES_FIGURES
    )
    text = page.read_text()
    assert "4 to 12 (3 snapshots)" in text
    from weibull_monitor.store import RunStore

    with RunStore(store) as runs:
        growth = {r["metric"]: r["value"] for r in runs.aggregates(step=12)}
    assert growth["weibull/transmission/scale_growth"] > 1.0  # measured from the first checkpoint
