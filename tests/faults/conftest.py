"""Fixtures of the fault matrix: a reference run, a small tmpfs when this machine lets the test mount one,
and subprocess runs of :mod:`tests.faults.tinyrun` that the tests signal or kill on a marker file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.faults.tinyrun import build, loss_logger, read_losses, rng_owner

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run (6 steps, a checkpoint every 2): its losses by step, and its output folder."""
    out = tmp_path_factory.mktemp("reference")
    log = out.parent / "reference.jsonl"
    draws: dict[int, float] = {}
    owner = rng_owner(draws)
    trainer = build(out, callbacks=[loss_logger(log), owner])
    owner.trainer = trainer
    trainer.train()
    losses = read_losses(log)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return {"losses": losses, "out": out, "draws": draws}


@pytest.fixture
def trained(reference, tmp_path):
    """A copy of the reference run's output folder (checkpoint-2, -4, -6), plus a file of the user's."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    (out / "NOTES.md").write_text("the user's own notes\n")
    return out


def _mount_tmpfs(path: Path, size: str) -> bool:
    if sys.platform != "linux" or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """``make(size) -> Path``: a tmpfs of ``size`` ("600k") when this machine lets the test mount one,
    else ``None`` (the caller falls back to a fault-injected writer)."""
    mounted: list[Path] = []

    def make(size: str):
        path = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        if _mount_tmpfs(path, size):
            mounted.append(path)
            return path
        return None

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def dead_owner() -> dict:
    """An owner marker naming a process of this host that has ended."""
    import socket

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {"host": socket.gethostname(), "pid": proc.pid, "start": "1"}


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail if ``proc`` ends first or ``timeout`` passes (generous: the
    test waits on conditions, never on the machine being fast)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{_tail(proc)}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _tail(proc) -> str:
    err = getattr(proc, "stderr_path", None)
    return Path(err).read_text()[-3000:] if err and Path(err).exists() else ""


@pytest.fixture
def spawn(tmp_path):
    """``spawn(out, *flags, env=None) -> Popen`` of ``python -m tests.faults.tinyrun``; killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(out: Path, *flags: str, env: dict | None = None) -> subprocess.Popen:
        err = tmp_path / f"stderr-{len(procs)}.txt"
        full_env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        **(env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "tests.faults.tinyrun", "--out", str(out),
                                 "--log", str(out) + ".jsonl", *flags], cwd=REPO, env=full_env,
                                stdout=subprocess.DEVNULL, stderr=open(err, "w"))
        proc.stderr_path = err
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> tuple[int, str]:
    """Wait for the run to end; its return code and stderr."""
    rc = proc.wait(timeout)
    return rc, Path(proc.stderr_path).read_text()
