"""activation-offload to disk: its files are private (0600 in a 0700 folder with an unpredictable name,
created O_EXCL | O_NOFOLLOW), a bad folder or a full disk is one line, and nothing is left behind: not at
the end of training, not after SIGTERM, and a SIGKILLed run's folder is removed by the next run."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_lowmem import LowMemTrainer, PluginError
from tests.faults.conftest import small_disk  # noqa: F401 - a fixture: a tmpfs when one can be mounted
from tests.tiny import RandomTokens, tiny_model, train_args

REPO = Path(__file__).resolve().parents[1]


def disk_opts(folder, **kw):
    return {"activation-offload": {"target": "disk", "dir": str(folder), "min_bytes": 0, "keep_bytes": 0, **kw}}


def offloaded_forward(off):
    """A forward under the offloader's hooks whose saved tensors all go to files; returns the loss."""
    torch.manual_seed(0)
    w = torch.randn(64, 64, requires_grad=True)
    off.begin_forward()
    with off.hooks():
        h = torch.randn(8, 64)
        for _ in range(4):
            h = torch.tanh(h @ w)
        loss = h.square().sum()
    off.end_forward()
    off._writer_pool().submit(lambda: None).result()  # every file written
    return loss, w


def test_files_are_private_and_their_folder_goes_when_training_ends(tmp_path):
    from hf_lowmem.signals import OWNER_FILE, registered_cleanups
    from hf_lowmem_plugins.activation_offload import ActivationOffloader

    parent = tmp_path / "act"
    off = ActivationOffloader("disk", str(parent), min_bytes=0, prefetch_bytes=0, keep_bytes=0)
    loss, w = offloaded_forward(off)
    (folder,) = parent.iterdir()
    assert folder.name.startswith("hf_lowmem-activations-") and len(folder.name) > len("hf_lowmem-activations-") + 6
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and (folder / OWNER_FILE).is_file()
    files = [f for f in folder.iterdir() if f.name != OWNER_FILE]
    assert len(files) >= 4 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert folder in registered_cleanups()  # a signal or the interpreter's exit removes it
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    off.close()
    assert list(parent.iterdir()) == [] and folder not in registered_cleanups()


def test_a_planted_file_or_symlink_is_never_written_through(tmp_path):
    from hf_lowmem_plugins.activation_files import write_file

    secret = tmp_path / "secret"
    secret.write_text("mine")
    link = tmp_path / "0.bin"
    link.symlink_to(secret)
    with pytest.raises(FileExistsError):
        write_file(str(link), torch.zeros(8, dtype=torch.uint8))
    assert secret.read_text() == "mine" and link.is_symlink()


def test_training_leaves_the_users_folder_empty(tmp_path):
    parent = tmp_path / "act"
    trainer = LowMemTrainer(model=tiny_model(), train_dataset=RandomTokens(), args=train_args(
        tmp_path / "out", max_steps=2, lowmem_offload=["activation-offload"], lowmem_options=disk_opts(parent)))
    trainer.train()
    assert trainer.lowmem_ctx.state["activation-offload"]["offloader"].stats["offloaded"] > 0
    assert list(parent.iterdir()) == []  # before: files in a folder left until exit


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PluginError, match=r"activation-offload: cannot create the directory .*a-file/act.* set "
                                          r"lowmem_options=") as info:
        LowMemTrainer(model=tiny_model(), train_dataset=RandomTokens(), args=train_args(
            tmp_path / "out", lowmem_offload=["activation-offload"], lowmem_options=disk_opts(blocker / "act")))
    assert "\n" not in str(info.value) and blocker.read_text() == "not a folder"  # before: NotADirectoryError


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, small_disk, monkeypatch):  # noqa: F811
    """On a tiny tmpfs when this machine lets the test mount one, else with an injected ENOSPC."""
    import hf_lowmem_plugins.activation_offload as ao

    disk = small_disk("64k")
    if disk is None:
        def full(path, data):
            raise OSError(errno.ENOSPC, "No space left on device", path)

        monkeypatch.setattr(ao, "write_file", full)
        disk = tmp_path / "disk"
    trainer = LowMemTrainer(model=tiny_model(hidden_size=64, intermediate_size=128), train_dataset=RandomTokens(seq=64),
                            args=train_args(tmp_path / "out", max_steps=1, lowmem_offload=["activation-offload"],
                                            lowmem_options=disk_opts(disk)))
    with pytest.raises(PluginError, match=r"activation-offload: saved activations could not be written to or read back "
                                          r"from '.*hf_lowmem-activations-.*': the disk holding .* is full .*"
                                          r"lowmem_options=.*target \"cpu\"") as info:
        trainer.train()  # before: a raw OSError out of backward
    assert "\n" not in str(info.value)
    assert [p for p in disk.iterdir() if p.name.startswith("hf_lowmem-activations-")] == []  # cleaned up


# ---- signals -------------------------------------------------------------------------------------------------------
_RUN = r"""
import sys, time
from pathlib import Path
from hf_lowmem import LowMemTrainer
from tests.tiny import RandomTokens, tiny_model, train_args
parent, out, marker, wait = sys.argv[1:5]
opts = {"activation-offload": {"target": "disk", "dir": parent, "min_bytes": 0, "keep_bytes": 0}}
model = tiny_model()
trainer = LowMemTrainer(model=model, train_dataset=RandomTokens(), args=train_args(
    out, max_steps=50, lowmem_offload=["activation-offload"], lowmem_options=opts))

def hold(module, args, output):  # after the decoder's forward: its activations are in files
    if trainer.state.global_step == 2 and not Path(marker).exists():
        trainer.lowmem_ctx.state["activation-offload"]["offloader"]._writer_pool().submit(lambda: None).result()
        Path(marker).write_text("held")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (wait == "signal" and trainer._lowmem_stopper.received):
            time.sleep(0.02)

model.lm_head.register_forward_hook(hold)
trainer.train()
"""


def _spawn(tmp_path, parent, wait):
    marker = tmp_path / "held"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(parent), str(tmp_path / "out"), str(marker), wait],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended before holding: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    return proc


def _files(parent):
    return [f for f in parent.rglob("*") if f.is_file()]


@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm", "sigterm-twice"])
def test_sigterm_leaves_no_activation_file(tmp_path, signals):
    """One SIGTERM stops at the end of the step; a second one stops at once, mid-forward: either way the
    files are gone (before: 37-47 files left per SIGTERMed run, forever)."""
    parent = tmp_path / "act"
    proc = _spawn(tmp_path, parent, "signal" if signals == 1 else "forever")
    try:
        assert len(_files(parent)) > 4  # the held forward's activations, and the owner marker
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert _files(parent) == [] and list(parent.iterdir()) == []


def test_the_next_run_removes_what_a_sigkilled_run_left(tmp_path):
    parent = tmp_path / "act"
    proc = _spawn(tmp_path, parent, "forever")
    proc.kill()
    proc.wait(60)
    (stale,) = parent.iterdir()
    assert len(_files(stale)) > 4
    trainer = LowMemTrainer(model=tiny_model(), train_dataset=RandomTokens(), args=train_args(
        tmp_path / "out2", max_steps=1, lowmem_offload=["activation-offload"], lowmem_options=disk_opts(parent)))
    trainer.train()
    assert not stale.exists() and list(parent.iterdir()) == []
