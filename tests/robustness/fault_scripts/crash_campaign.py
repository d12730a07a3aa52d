"""Kill a training run with SIGKILL again and again while it writes snapshots; restart it from its checkpoint.

Run by tests/test_crash_safety.py:  python crash_campaign.py OUT_DIR KILLS SEED

This process imports torch and transformers once and forks one child per life of the training run (a restart
without paying the imports again); it never touches torch or SQLite itself, so forking is safe. Each child resumes
from the last checkpoint (model, optimizer, monitor state; written atomically every CHECKPOINT_EVERY steps),
trains, observes every step into OUT_DIR/crash.sqlite, and tells the parent through a pipe when a store write
begins ("B step") and ends ("E step"). Three ways to die, drawn at random per life:

- ``timed``: the parent sends SIGKILL after a random delay (anywhere: training, fitting, writing);
- ``in_write``: the parent waits for the start of a random write, then kills after 0-3 ms;
- ``vm``: the child SIGKILLs itself from SQLite's progress handler after a random number of VM instructions
  inside a snapshot transaction (always mid-transaction).

After each kill the store files are copied to OUT_DIR/after_kill_<i>/ for the test to inspect. Then the last
life runs to the end. An uninterrupted reference run goes to OUT_DIR/reference.sqlite. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import sys
import time

TOTAL_STEPS = 200  # long enough that no life outruns the timed kill window (0-0.4 s) before 20 kills
CHECKPOINT_EVERY = 4


def build(store_path: str, ckpt_path: str | None):
    import torch

    from weibull_monitor.alerts import Breach, Rule
    from weibull_monitor.demos.toy import tiny_llama
    from weibull_monitor.monitor import WeibullMonitor
    from weibull_monitor.store import RunStore

    class Streak(Rule):
        """Breaches at every snapshot; fires after 3 in a row, then waits 5 steps: alert steps depend on the
        restored counters (streak, last fired)."""

        name = "streak"
        level = "warning"
        patience = 3
        cooldown = 5

        def evaluate(self, snapshot):
            return [Breach(key="all", matrices=(), values={"step": float(snapshot.step)}, message="streak")]

    torch.set_num_threads(int(os.environ.get("WEIBULL_TEST_THREADS", "1")))  # conftest.py: 1 unless asked
    model = tiny_llama(0, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    store = RunStore(store_path, timeout=5.0)
    monitor = WeibullMonitor(model, optimizer, every=1, store=store, run_name="crash", rules=[Streak()])
    start = 0
    if ckpt_path and os.path.exists(ckpt_path):
        saved = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        monitor.load_state_dict(
            saved["monitor"]
        )  # counters as they were at the checkpoint, like a real resume
        start = saved["step"]
    return model, optimizer, monitor, store, start


def batch(step: int):
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 256, (2, 16), generator=gen)


def save_checkpoint(path: str, model, optimizer, monitor, step: int) -> None:
    import torch

    tmp = path + ".tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "monitor": monitor.state_dict(),
            "step": step,
        },
        tmp,
    )
    os.replace(tmp, path)  # a kill leaves the old checkpoint or the new one, never half of one


def life(store_path: str, ckpt_path: str | None, pipe_fd: int | None, vm_kill_after: int | None) -> None:
    """One life of the training run (in a forked child)."""
    model, optimizer, monitor, store, start = build(store_path, ckpt_path)
    write = store.write_snapshot

    def say(text: str) -> None:
        if pipe_fd is not None:
            os.write(pipe_fd, (text + "\n").encode())

    budget = [vm_kill_after or 0]  # VM instructions left, counted across the writes of this life

    def progress():
        budget[0] -= 1
        if budget[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    def traced_write(run_id, snapshot, state=None, **kwargs):
        say(f"B {snapshot.step}")
        if vm_kill_after is not None:
            store._conn.set_progress_handler(progress, 1)
        try:
            return write(run_id, snapshot, state, **kwargs)
        finally:
            store._conn.set_progress_handler(None, 1)
            say(f"E {snapshot.step}")

    store.write_snapshot = traced_write
    if ckpt_path and start == 0 and not os.path.exists(ckpt_path):
        save_checkpoint(ckpt_path, model, optimizer, monitor, 0)  # fresh monitor state for a restart at 0
    if start == 0:
        monitor.observe(0)
    for step in range(start + 1, TOTAL_STEPS + 1):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        monitor.observe(step)
        if ckpt_path and step % CHECKPOINT_EVERY == 0:
            save_checkpoint(ckpt_path, model, optimizer, monitor, step)
    monitor.close()
    say("DONE")


def fork_life(*args) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            life(*args[:2], write_fd, *args[2:])
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def read_lines(fd: int, timeout: float) -> list[str]:
    """Everything the child says within the next ``timeout`` seconds (until it ends or the time is up)."""
    out = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode().splitlines()


def main() -> None:
    out_dir, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    import torch  # noqa: F401  (imported once here, inherited by every forked life)
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (transformers imports models lazily: ~4 s)

    import weibull_monitor.estimator.histogram
    import weibull_monitor.models
    import weibull_monitor.monitor
    import weibull_monitor.store  # noqa: F401

    # reference: the same run, never interrupted
    pid, fd = fork_life(os.path.join(out_dir, "reference.sqlite"), None, None)
    lines = read_lines(fd, 600)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and lines[-1:] == ["DONE"], (status, lines[-3:])

    store_path = os.path.join(out_dir, "crash.sqlite")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    records = []
    lives = 0
    while len(records) < kills and lives < 10 * kills:
        lives += 1
        mode = rng.choice(["timed", "in_write", "vm", "vm"])
        vm_after = rng.randint(1, 3000) if mode == "vm" else None
        pid, fd = fork_life(store_path, ckpt_path, vm_after)
        seen: list[str] = []
        if mode == "timed":
            seen += read_lines(fd, rng.uniform(0.0, 0.4))
            if seen[-1:] == ["DONE"]:
                os.waitpid(pid, 0)
                os.close(fd)
                break
            os.kill(pid, signal.SIGKILL)
        elif mode == "in_write":
            target, begun, buffer = rng.randint(1, 3), 0, b""
            while begun < target and b"DONE" not in buffer:
                chunk = os.read(fd, 1)  # byte by byte: react to the marker as soon as it arrives
                if not chunk:
                    break
                buffer += chunk
                begun += buffer.endswith(b"\nB ") or buffer == b"B "
            time.sleep(rng.uniform(0.0, 0.001))
            os.kill(pid, signal.SIGKILL)
            seen += buffer.decode().splitlines()
        _, status = os.waitpid(pid, 0)
        seen += read_lines(fd, 0.2)
        os.close(fd)
        if "DONE" in seen:
            break
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed, f"life ended without SIGKILL: status {status}, last lines {seen[-3:]}"
        markers = [line for line in seen if line[:2] in ("B ", "E ")]
        in_write = bool(markers) and markers[-1].startswith("B ")
        copy = os.path.join(out_dir, f"after_kill_{len(records)}")
        os.makedirs(copy)
        for suffix in ("", "-wal"):
            if os.path.exists(store_path + suffix):
                shutil.copy2(store_path + suffix, os.path.join(copy, "crash.sqlite" + suffix))
        records.append(
            {
                "mode": mode,
                "in_write": in_write,
                "last_marker": markers[-1] if markers else None,
                "copy": copy,
            }
        )

    # the last life: resume and run to the end
    pid, fd = fork_life(store_path, ckpt_path, None)
    lines = read_lines(fd, 600)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and lines[-1:] == ["DONE"], (status, lines[-3:])
    print(json.dumps({"kills": records, "lives": lives + 1, "total_steps": TOTAL_STEPS}))


if __name__ == "__main__":
    main()
