"""The loader fuzz harness (issue 19): run ``weibull-monitor`` on every case of the corpus and check the targets.

    python tests/robustness/fuzz_runner.py OUT [--cases N] [--seed S] [--big] [--only PREFIX]

For each case (tests/robustness/fuzz_corpus.py) a child forked from this process (which imported everything once and
never fits, so it stays single-threaded) runs the CLI in the case's folder, with its stdout and stderr in files and
these budgets: 10 s of CPU time (wall time is recorded too, but a machine shared with other jobs stretches it; a
child still running after 120 s is killed and reported as a hang, never waited for), 500 MB of resident memory
above this process (its address space is capped 1.5 GB above, so a runaway
allocation fails fast instead of taking the machine). Then, for each case:

- the outcome is exit 0, or exit 2 with exactly one ``error:`` line (other stderr lines are warnings or notes); never
  a traceback, never an error worded as a bug ("unexpected");
- every "ok" row of an exit-0 scan equals the fit of the same tensor as the format's own library reads it
  (``safetensors.safe_open``, ``torch.load(weights_only=True)``, ``gguf.GGUFReader``), checked in a second child;
  a file the library refuses must not have been scanned;
- no file of the case changed, and nothing was created but what the command owns (the report folder, the store).

Writes OUT/summary.json: per-case outcome, CPU and wall seconds, memory growth, violations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import fuzz_corpus  # noqa: E402
import torch  # noqa: E402 - after the path setup

CPU_BUDGET_S = 10.0
KILL_AFTER_S = 120.0  # a hang; the 10 s budget is checked on CPU time, which a loaded machine does not stretch
MEMORY_BUDGET_MB = 500
ADDRESS_SPACE_MARGIN = 1536 << 20


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (not following links): kind, size, mtime and a content hash of small files."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        st = path.lstat()
        if path.is_symlink() or not path.is_file():
            out[rel] = (st.st_mode, 0, 0, "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size < 64 << 20 else ""
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def in_child(
    target, folder: Path, stdout: Path, stderr: Path, fsize: int | None = None
) -> tuple[int, float, float, int, bool]:
    """Run ``target()`` in a forked child: (exit status, wall s, CPU s, peak RSS growth KB, killed)."""
    base_rss = rss_kb()
    limit = vm_bytes() + ADDRESS_SPACE_MARGIN
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            os.chdir(folder)
            for fd, path in ((1, stdout), (2, stderr)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            resource.setrlimit(resource.RLIMIT_CPU, (int(KILL_AFTER_S), int(KILL_AFTER_S)))
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            status = target()
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status if isinstance(status, int) else 1)
    killed = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - started > KILL_AFTER_S:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            killed = True
            break
        time.sleep(0.005)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    return code, wall, usage.ru_utime + usage.ru_stime, max(0, usage.ru_maxrss - base_rss), killed


# ---------------------------------------------------------------------------------------------------------------
# Verification against the format's own library (run in a child: it fits)


def library_tensors(kind: str, path: Path) -> dict[str, torch.Tensor]:
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if kind == "torch":
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        out: dict[str, torch.Tensor] = {}
        roots = [payload] + (
            [v for v in payload.values() if isinstance(v, dict)] if isinstance(payload, dict) else []
        )
        for root in roots:
            stack, seen = [(root, "")], set()
            while stack:
                obj, prefix = stack.pop()
                if isinstance(obj, torch.Tensor):
                    out.setdefault(prefix, obj)
                elif isinstance(obj, dict) and id(obj) not in seen:
                    seen.add(id(obj))
                    stack += [(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()]
        return out
    if kind == "gguf":
        import gguf
        import numpy as np

        reader = gguf.GGUFReader(str(path))
        out = {}
        for tensor in reader.tensors:
            name = tensor.tensor_type.name
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            if name in ("F32", "F16", "F64"):
                values = np.asarray(tensor.data).astype(tensor.data.dtype.newbyteorder("="))
            elif reader.byte_order == "S":
                continue
            else:
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            values = torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
            # bf16 dequantised to float32 is exact; as bf16 it is fitted by the same (exact) histogram kind
            out[tensor.name] = values.to(torch.bfloat16) if name == "BF16" else values
        return out
    raise ValueError(kind)


def verify(kind: str, folder: Path, stdout: Path) -> dict:
    """Compare every ok row of the scan with the fit of the library's tensor: violations (empty when right)."""
    from weibull_monitor.estimator import fit_weibull

    rows = json.loads(stdout.read_text())
    problems: list[str] = []
    checked = 0
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        if row["ok"] and row["fused_parent"] is None:
            by_path.setdefault(row["path"], []).append(row)
    for path, chosen in by_path.items():
        where = Path(path)  # relative to the case folder, where this child runs
        files = sorted(where.parent.glob("*.safetensors")) if where.name.endswith(".index.json") else [where]
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                tensors.update(library_tensors(kind, file))
            except Exception as exc:
                problems.append(
                    f"{file}: scanned, but the format's library refuses it ({type(exc).__name__}: {str(exc)[:200]})"
                )
        for row in chosen:
            tensor = tensors.get(row["name"])
            if tensor is None:
                continue
            fit = fit_weibull(
                tensor, method=row["method"] if row["method"] in ("histogram", "exact") else "histogram"
            )
            checked += 1
            same = (fit.n, fit.n_zero, fit.n_nonfinite) == (
                row["n"],
                row["n_zero"],
                row["n_nonfinite"],
            ) and fit.ok
            for name in ("k", "scale"):
                same = same and abs(getattr(fit, name) - row[name]) <= 1e-12 * abs(getattr(fit, name))
            if not same or list(tensor.shape) != row["shape"]:
                problems.append(
                    f"{row['name']!r}: scan k={row['k']} n={row['n']} shape={row['shape']}, library k={fit.k} n={fit.n} shape={list(tensor.shape)}"
                )
    return {"checked": checked, "problems": problems}


# ---------------------------------------------------------------------------------------------------------------
# One case


def judge(case: fuzz_corpus.Case, code: int, killed: bool, out: str, err: str) -> list[str]:
    problems = []
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    if killed:
        problems.append("killed: no answer within the hard limit (a hang)")
    elif code == 0:
        if case.expect == "error":
            problems.append("exit 0 where an error was expected")
    elif code == 2:
        if len(errors) != 1:
            problems.append(f"exit 2 with {len(errors)} error lines")
        if case.expect == "ok":
            problems.append("exit 2 where a result (or a recorded skip) was expected")
    else:
        problems.append(f"exit status {code}")
    text = out + err
    for bad in ("Traceback", "unexpected ", "not enough memory", "\x1b"):
        if bad in (err if bad != "\x1b" else text):
            problems.append(f"output holds {bad!r}")
    for line in lines:
        if not line.startswith(("weibull-monitor ", "stored ", "report: ", "open it with")):
            problems.append(f"stray stderr line: {line[:120]!r}")
            break
    return problems


def run_case(case: fuzz_corpus.Case, folder: Path) -> dict:
    from weibull_monitor.cli import main

    folder.mkdir(parents=True)
    logs = folder.parent / f"{folder.name}.logs"
    logs.mkdir()
    case.build(folder)
    before = tree(folder)
    stdout, stderr = logs / "stdout", logs / "stderr"
    code, wall, cpu, grew_kb, killed = in_child(lambda: main(case.argv), folder, stdout, stderr, case.fsize)
    out, err = stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
    problems = judge(case, code, killed, out, err)
    if cpu > CPU_BUDGET_S:
        problems.append(f"{cpu:.1f} s of CPU (budget {CPU_BUDGET_S:.0f} s)")
    if grew_kb > MEMORY_BUDGET_MB * 1024:
        problems.append(f"resident memory grew {grew_kb // 1024} MB (budget {MEMORY_BUDGET_MB} MB)")
    after = tree(folder)
    owned = tuple(case.owned)
    for rel in sorted(set(before) | set(after)):
        if rel.split("/")[0] in owned or rel in owned:
            continue
        if before.get(rel) != after.get(rel):
            problems.append(
                f"file {'changed' if rel in before and rel in after else 'created' if rel in after else 'removed'}: {rel}"
            )
    verified = None
    if code == 0 and case.check and "--json" in case.argv and not killed:
        report = logs / "verify.json"

        def check() -> int:
            report.write_text(json.dumps(verify(case.check, folder, stdout)))
            return 0

        vcode, *_ = in_child(check, folder, logs / "verify.out", logs / "verify.err")
        if vcode != 0 or not report.exists():
            problems.append(f"verification failed to run: {(logs / 'verify.err').read_text()[-500:]}")
        else:
            verified = json.loads(report.read_text())
            problems += verified["problems"]
    last_error = next((line for line in reversed(err.splitlines()) if ": error: " in line), "")
    return {
        "name": case.name,
        "structure": case.structure,
        "exit": code,
        "outcome": "hang" if killed else "ok" if code == 0 else "error" if code == 2 else "crash",
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "memory_growth_mb": round(grew_kb / 1024, 1),
        "rows_checked": verified["checked"] if verified else 0,
        "error": last_error[:300],
        "problems": problems,
    }


def prepare_stores(scratch: Path) -> None:
    """A small run store and one whose run name is invalid mathtext, written by the CLI in a child."""
    from weibull_monitor.cli import main

    fuzz_corpus.write(scratch / "w.safetensors", fuzz_corpus.safetensors_bytes(fuzz_corpus.state(), scratch))
    for store, name in (("store.sqlite", "plain"), ("mathtext.sqlite", "lr=$1e-3$ \\frac{a}{ $x^{")):
        argv = ["scan", "--no-progress", "--json", "w.safetensors", "--store", store, "--run-name", name]
        code, *_ = in_child(lambda argv=argv: main(argv), scratch, scratch / "prep.out", scratch / "prep.err")
        assert code == 0, (scratch / "prep.err").read_text()
        import sqlite3

        conn = sqlite3.connect(scratch / store)  # one store per file, checkpointed: no -wal to copy along
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cases", type=int, default=300, help="mutated cases (besides the named ones)")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--big", action="store_true", help="the 100,000-entry file instead of 20,000")
    parser.add_argument("--only", default="", help="run only cases whose name starts with this")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "scratch"
    scratch.mkdir(exist_ok=True)
    import weibull_monitor.cli
    import weibull_monitor.offline.report
    import weibull_monitor.offline.scan
    import weibull_monitor.offline.tables  # noqa: F401

    prepare_stores(scratch)
    cases = fuzz_corpus.named_cases(scratch, args.big) + fuzz_corpus.mutated_cases(
        args.cases, args.seed, scratch
    )
    cases = [c for c in cases if c.name.startswith(args.only)]
    results = []
    for i, case in enumerate(cases):
        result = run_case(case, out / f"{i:05d}")
        results.append(result)
        mark = "FAIL" if result["problems"] else result["outcome"]
        print(
            f"{i:5d} {mark:5s} {result['cpu_s']:6.2f}s {result['memory_growth_mb']:6.1f}MB {case.name}",
            flush=True,
        )
        for problem in result["problems"]:
            print(f"        {problem}", flush=True)
    summary = {
        "cases": len(results),
        "violations": sum(1 for r in results if r["problems"]),
        "outcomes": {
            o: sum(1 for r in results if r["outcome"] == o) for o in ("ok", "error", "hang", "crash")
        },
        "rows_checked": sum(r["rows_checked"] for r in results),
        "worst_cpu_s": max((r["cpu_s"], r["name"]) for r in results),
        "worst_wall_s": max((r["wall_s"], r["name"]) for r in results),
        "worst_memory_growth_mb": max((r["memory_growth_mb"], r["name"]) for r in results),
        "structures": sorted({r["structure"] for r in results}),
        "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    return 0 if summary["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
